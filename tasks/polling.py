"""Markers in Redis: which Runware tasks were submitted and are being polled, and which must
go to Runware in a request of their own ("send alone").

A finished task's items are kept with its cost in the ledger (tasks/ledger.py), so a job delivered
again after its worker died returns the known result without calling Runware.

A task delivered asynchronously (video always; anything with deliveryMethod "async"; and a task
whose answer was lost, 409 conflictTaskUUID) is polled with getResponse by re-scheduling its
job with a countdown, so no worker slot is held while Runware works. The marker, keyed by
taskUUID, tells the next run that the task is already submitted and since when (for the
back-off and the deadline); it survives redeliveries because the taskUUID does.
"""

from __future__ import annotations

import redis

from config.keys import StateKeys
from config.settings import Settings, get_settings
from tasks.state import hold_through_outage, per_process, redis_client
from tasks.state import seconds as redis_seconds


class PendingCalls:
    """Submission markers of asynchronous Runware tasks."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self.keys = StateKeys(settings.key_prefix)

    def mark(self, task_uuid: str, ttl_s: float) -> float:
        """Record the submission now (kept if already recorded); return its time."""
        key = self.keys.pending(task_uuid)

        def mark() -> float:
            # Redis's clock: the task's deadline is checked by whichever host polls it next.
            now = redis_seconds(self.redis.time())
            self.redis.set(key, repr(now), nx=True, ex=max(60, int(ttl_s) + 300))
            raw = self.redis.get(key)
            return now if raw is None else float(raw)

        return hold_through_outage(mark, "poller", 30.0)

    def clear(self, task_uuid: str) -> None:
        hold_through_outage(lambda: self.redis.delete(self.keys.pending(task_uuid)), "poller", 30.0)

    def send_alone(self, task_uuid: str) -> None:
        """The task's next call goes in a request of its own: its last request, shared with
        other tasks, was refused without saying whose fault it was."""
        key = self.keys.alone(task_uuid)
        hold_through_outage(lambda: self.redis.set(key, 1, ex=86_400), "poller", 30.0)

    def next_poll_in(self, elapsed_s: float) -> float:
        """The countdown to the next poll: about the first interval, growing with the time the
        task has taken so far, capped."""
        settings = self.settings
        return min(
            settings.runware_poll_max_interval_s,
            max(settings.runware_poll_interval_s, elapsed_s / 2),
        )


def _make_pending() -> PendingCalls:
    settings = get_settings()
    return PendingCalls(redis_client(settings), settings)


get_pending = per_process(_make_pending)  # this process's PendingCalls
