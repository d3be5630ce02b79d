"""The worker's buffered task events are flushed a window after the first of them, on kombu's
real event loop (its Hub and timer), and never stay in the buffer for good: Celery clears the
loop's timer when the broker connection is lost, taking an armed flush with it."""

from __future__ import annotations

import time

from kombu.asynchronous import Hub

from workers.consumer import EVENTS_FLUSH_S, Consumer


class Flushes:
    """Stands in for Celery's event dispatcher: counts the consumer's flushes."""

    def __init__(self) -> None:
        self.count = 0

    def flush(self) -> None:
        self.count += 1


def _consumer() -> tuple[Consumer, Hub, Flushes]:
    consumer = Consumer.__new__(Consumer)  # only the event-flush part is exercised
    hub, flushes = Hub(), Flushes()
    consumer.hub = hub
    consumer.event_dispatcher = flushes  # type: ignore[assignment]
    return consumer, hub, flushes


def _turn(hub: Hub) -> None:
    """One turn of the loop: its ready callbacks, then its due timers."""
    ready, hub._ready = hub._ready, set()
    for callback in ready:
        callback()
    hub.fire_timers()


def test_events_buffered_together_leave_in_one_flush_a_window_later() -> None:
    consumer, hub, flushes = _consumer()
    for _ in range(5):
        consumer.on_send_event_buffered()
    _turn(hub)
    assert flushes.count == 0  # not on the loop's next turn
    time.sleep(EVENTS_FLUSH_S * 1.5)
    _turn(hub)
    assert flushes.count == 1
    time.sleep(EVENTS_FLUSH_S * 1.5)
    _turn(hub)
    assert flushes.count == 1  # nothing new, nothing armed


def test_a_flush_lost_with_the_loops_timer_is_armed_again() -> None:
    consumer, hub, flushes = _consumer()
    consumer.on_send_event_buffered()
    _turn(hub)  # armed on the loop's timer ...
    hub.timer.clear()  # ... which Celery clears when the broker connection is lost
    time.sleep(EVENTS_FLUSH_S * 2.5)
    _turn(hub)
    assert flushes.count == 0
    consumer.on_send_event_buffered()  # the next event
    _turn(hub)
    time.sleep(EVENTS_FLUSH_S * 1.5)
    _turn(hub)
    assert flushes.count == 1
