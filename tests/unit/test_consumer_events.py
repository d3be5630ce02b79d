"""The worker's buffered task events are flushed a window after the first of them, on kombu's
real event loop (its Hub and timer) and the project's Celery consumer; before the consumer's
teardown when the broker connection is lost; and never stay in the buffer for good."""

from __future__ import annotations

import time
import types

import pytest
from celery import Celery
from kombu.asynchronous import Hub

import workers.consumer
from workers.consumer import Consumer

# Longer than the worker's window, so that a loaded machine's pauses do not reach it.
WINDOW = 0.2


@pytest.fixture(autouse=True)
def _window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers.consumer, "EVENTS_FLUSH_S", WINDOW)


class Flushes:
    """Stands in for Celery's event dispatcher (what the consumer and its Events step read of it):
    counts the consumer's flushes until it is disabled."""

    groups = None
    connection = None

    def __init__(self) -> None:
        self.count = 0
        self.enabled = True

    def disable(self) -> None:
        self.enabled = False

    def flush(self) -> None:
        if self.enabled:
            self.count += 1


def _consumer() -> tuple[Consumer, Hub, Flushes]:
    """The project's consumer, built by Celery as a worker builds it (its worker stood in for:
    only what the consumer reads of it), on a broker nothing listens on: it never connects."""
    app = Celery("events-test", broker="redis://127.0.0.1:1/0", set_as_current=False)
    hub, flushes = Hub(), Flushes()
    worker = types.SimpleNamespace(use_eventloop=True, semaphore=None)
    consumer = Consumer(
        lambda *args: None, app=app, hub=hub, timer=hub.timer, controller=worker, hostname="t@h"
    )
    consumer.event_dispatcher = flushes
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
    time.sleep(WINDOW * 1.5)
    _turn(hub)
    assert flushes.count == 1
    time.sleep(WINDOW * 1.5)
    _turn(hub)
    assert flushes.count == 1  # nothing new, nothing armed


def test_a_flush_lost_with_the_loops_timer_is_armed_again() -> None:
    consumer, hub, flushes = _consumer()
    consumer.on_send_event_buffered()
    _turn(hub)  # armed on the loop's timer ...
    hub.timer.clear()  # ... which Celery clears when the broker connection is lost
    time.sleep(WINDOW * 2.5)
    _turn(hub)
    assert flushes.count == 0
    consumer.on_send_event_buffered()  # the next event
    _turn(hub)
    time.sleep(WINDOW * 1.5)
    _turn(hub)
    assert flushes.count == 1


def test_what_is_buffered_goes_out_before_the_consumer_is_torn_down() -> None:
    """On a lost broker connection Celery builds a new event dispatcher, and takes over only the
    events the old one failed to publish: the buffered ones are flushed before that."""
    consumer, hub, flushes = _consumer()
    consumer.on_send_event_buffered()
    _turn(hub)  # armed
    consumer.on_close()  # the connection was lost
    assert flushes.count == 1


def test_what_is_buffered_goes_out_when_the_consumer_shuts_down() -> None:
    """Jobs that finish while the worker stops have their events published: the armed flush's
    timer may never fire again."""
    consumer, hub, flushes = _consumer()
    consumer.on_send_event_buffered()
    _turn(hub)  # armed
    consumer.shutdown()
    assert flushes.count == 1
