"""Which Runware tasks were submitted and are being polled, and which finished, in Redis.

A finished task's items are kept (for CELERY_RESULT_EXPIRES_S), so a job delivered again after
its worker died returns the known result without calling Runware.

A task delivered asynchronously (video always; anything with deliveryMethod "async"; and a task
whose answer was lost, 409 conflictTaskUUID) is polled with getResponse by re-scheduling its
job with a countdown, so no worker slot is held while Runware works. The marker, keyed by
taskUUID, tells the next run that the task is already submitted and since when (for the
back-off and the deadline); it survives redeliveries because the taskUUID does.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import redis

from config.settings import Settings, get_settings
from tasks.state import hold_through_outage, redis_client


class PendingCalls:
    """Submission markers of asynchronous Runware tasks."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self.prefix = f"{settings.key_prefix}:pending"

    def submitted_at(self, task_uuid: str) -> float | None:
        """When the task was submitted (epoch seconds), or None if it was not."""
        raw = hold_through_outage(
            lambda: self.redis.get(f"{self.prefix}:{task_uuid}"), "poller", 30.0
        )
        return None if raw is None else float(raw)

    def mark(self, task_uuid: str, ttl_s: float) -> float:
        """Record the submission now (kept if already recorded); return its time."""
        now = time.time()
        key = f"{self.prefix}:{task_uuid}"

        def mark() -> float:
            self.redis.set(key, repr(now), nx=True, ex=max(60, int(ttl_s) + 300))
            raw = self.redis.get(key)
            return now if raw is None else float(raw)

        return hold_through_outage(mark, "poller", 30.0)

    def clear(self, task_uuid: str) -> None:
        hold_through_outage(lambda: self.redis.delete(f"{self.prefix}:{task_uuid}"), "poller", 30.0)

    def finished(self, task_uuid: str) -> list[dict[str, Any]] | None:
        """The items of a task that already finished, or None."""
        raw = hold_through_outage(
            lambda: self.redis.get(f"{self.prefix}:done:{task_uuid}"), "poller", 30.0
        )
        if raw is None:
            return None
        items: list[dict[str, Any]] = json.loads(raw)
        return items

    def finish(self, task_uuid: str, items: list[dict[str, Any]]) -> None:
        """Keep the finished task's items and drop its submission marker, in one round trip."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(
            f"{self.prefix}:done:{task_uuid}",
            json.dumps(items),
            ex=self.settings.celery_result_expires_s,
        )
        pipe.delete(f"{self.prefix}:{task_uuid}")
        hold_through_outage(pipe.execute, "poller", 30.0)

    def next_poll_in(self, elapsed_s: float) -> float:
        """The countdown to the next poll: about the first interval, growing with the time the
        task has taken so far, capped."""
        settings = self.settings
        return min(
            settings.runware_poll_max_interval_s,
            max(settings.runware_poll_interval_s, elapsed_s / 2),
        )


_lock = threading.Lock()
_pending: PendingCalls | None = None


def get_pending() -> PendingCalls:
    """This process's PendingCalls."""
    global _pending
    if _pending is None:
        with _lock:
            if _pending is None:
                settings = get_settings()
                _pending = PendingCalls(redis_client(settings), settings)
    return _pending
