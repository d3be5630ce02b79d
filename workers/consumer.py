"""The worker's Celery consumer: Celery's own, but no message it cannot run is thrown away.

Celery fails a message whose task the worker does not register ("unregistered task": the
result is marked failed and the message dropped), and acknowledges and drops one it cannot
decode or whose envelope is invalid, with a log line as the only trace. In this fleet every
worker consumes the one ready queue, so such a message either belongs to another worker (one
with other task modules) or reached the ready queue past the dispatcher, which sets such
messages aside before any worker sees them:
- a task this worker does not know goes back to the fleet's dispatcher: it grants it again (a
  worker that knows it takes it) or, if no live worker registers it, parks it
  (`enhance-worker unknown`);
- a message Celery cannot decode or run goes to the dead letters with the reason
  (`enhance-worker failed list`).

It also publishes the worker's task events (received, started, succeeded, ...) in fewer
messages: Celery flushes its buffer of them on the event loop's next turn, which under load is
one `PUBLISH` for every one or two events. Here a flush waits `EVENTS_FLUSH_S` for the events
of the jobs around it, so Flower sees a job's state up to that much later, and a burst's events
leave together. What is buffered is published before the consumer shuts down, and before it
is torn down when the broker connection is lost (Celery's next event dispatcher takes over only
the events the old one failed to publish).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

logger = logging.getLogger(__name__)

# How long a buffered task event waits for others before they are published together.
EVENTS_FLUSH_S = 0.01


class Consumer(CeleryConsumer):
    # Until when the armed flush is due (monotonic); 0: none armed. Should its timer entry be
    # lost (Celery 5.7 keeps the loop's timer across a reconnect, but cancels the entries it
    # registered itself), the next event after this passed arms another: none waits for good.
    _events_flush_due = 0.0

    def on_send_event_buffered(self) -> Any:
        """Called by whichever thread buffered an event (the pool's, or the loop's)."""
        hub = self._hub()
        now = time.monotonic()
        if hub is None or now < self._events_flush_due:
            return None
        self._events_flush_due = now + 2 * EVENTS_FLUSH_S  # a race arms two flushes: harmless
        hub.call_soon(self._arm_events_flush)
        return None

    def _arm_events_flush(self) -> None:
        # On the loop's thread: its timer is not safe to touch from another.
        self._hub().call_later(EVENTS_FLUSH_S, self._flush_armed_events)

    def _flush_armed_events(self) -> None:
        self._events_flush_due = 0.0  # first: an event buffered during the flush re-arms
        celery: Any = self  # celery-stubs lack the consumer's attributes
        celery._flush_events()

    def on_close(self) -> None:
        # The broker connection was lost. What is buffered goes out now (the broker being gone,
        # into the dispatcher's error buffer, which the next connection's dispatcher takes
        # over): the armed flush would fire on that next dispatcher, and these would be lost.
        self._flush_armed_events()
        super().on_close()

    def shutdown(self) -> None:
        self._flush_armed_events()
        super().shutdown()

    def _hub(self) -> Any:
        return getattr(self, "hub", None)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        name = (message.headers or {}).get("task") or "?"
        logger.warning(
            "Task %r is not registered in this worker: its job goes back to the fleet's "
            "dispatcher, which grants it again (a worker that registers it takes it) or parks it "
            "(give every worker of the fleet the same task modules).",
            name,
        )
        self._hand_back(message)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._set_aside(message, "a message that names no task")

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        self._set_aside(message, f"InvalidTaskError: {exc}")

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        self._set_aside(message, f"{type(exc).__name__}: {exc}")

    def _hand_back(self, message: Any) -> None:
        """Give the message to the dispatcher (its list of set-aside messages: it parks one of a
        task no live worker registers, and takes any other in again), then acknowledge it: never
        a requeue straight onto the ready queue, where the workers that cannot run it would pass
        it round for ever."""
        from config.keys import FairKeys
        from config.settings import get_settings
        from tasks.limiter import get_limiter

        keys = FairKeys(get_settings().key_prefix)
        with get_limiter().redis.pipeline(transaction=True) as pipe:
            pipe.lpush(keys.rejected, _raw(message))
            pipe.lpush(keys.wake, "1")
            pipe.ltrim(keys.wake, 0, 15)
            pipe.execute()
        message.ack()

    def _set_aside(self, message: Any, reason: str) -> None:
        from tasks.deadletter import get_dead_letters

        task = str((message.headers or {}).get("task") or "")
        ident = get_dead_letters().record_unreadable(_raw(message), reason, task)
        logger.error(
            "A message this worker cannot run (%s) was set aside: `enhance-worker failed list` "
            "shows it as %s.",
            reason[:200],
            ident,
        )
        message.ack()


def _raw(message: Any) -> bytes:
    """The message as kombu stored it in Redis (its envelope)."""
    return json.dumps(getattr(message, "_raw", None) or {}, default=str).encode()
