"""Jobs that failed for good (permanent error, retries exhausted, budget, bad input), kept in a
Redis list with their reason so that nothing fails silently and any can be requeued.

Entries: {"taskUUID", "task", "reason", "failedAt", "taskId", "args", "kwargs"}; the list keeps
the newest DEAD_LETTER_MAX.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import redis
from celery import Celery

from config.keys import StateKeys
from config.settings import Settings, get_settings
from tasks.redact import redact
from tasks.state import per_process, redis_client

DEAD_LETTER_MAX = 10_000
# A job that failed inside a batch is requeued on its own, as the task it stands for.
REQUEUE_AS = {"tasks.enhance_batch_item": "tasks.enhance_prompt"}


class DeadLetters:
    """The dead-letter list."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.key = StateKeys(settings.key_prefix).dead_letters

    def record(
        self,
        task_uuid: str,
        task: str,
        reason: str,
        task_id: str,
        args: list[Any],
        kwargs: dict[str, Any],
    ) -> None:
        entry = {
            "taskUUID": task_uuid,
            "task": task,
            "reason": redact(reason),
            "failedAt": datetime.now(UTC).isoformat(timespec="seconds"),
            "taskId": task_id,
            "args": args,
            "kwargs": kwargs,
        }
        pipe = self.redis.pipeline(transaction=True)
        pipe.lpush(self.key, json.dumps(entry, default=str))
        pipe.ltrim(self.key, 0, DEAD_LETTER_MAX - 1)
        pipe.execute()

    def entries(self) -> list[dict[str, Any]]:
        """Every entry, newest first."""
        return [json.loads(raw) for raw in self.redis.lrange(self.key, 0, -1)]

    def retry(self, app: Celery, task_uuids: list[str] | None = None) -> list[str]:
        """Requeue the entries with these taskUUIDs (all when None), keeping each taskUUID so
        Runware never bills it twice; remove them from the list. Returns the new task ids."""
        requeued: list[str] = []
        for raw in self.redis.lrange(self.key, 0, -1):
            entry = json.loads(raw)
            if task_uuids is not None and entry["taskUUID"] not in task_uuids:
                continue
            kwargs = dict(entry["kwargs"])
            if entry["task"] in ("tasks.enhance_prompt", "tasks.enhance_batch_item") or (
                entry["task"].startswith("tasks.generate_")
            ):
                kwargs.setdefault("taskUUID", entry["taskUUID"])
            name = REQUEUE_AS.get(entry["task"], entry["task"])
            result = app.send_task(name, args=entry["args"], kwargs=kwargs)
            self.redis.lrem(self.key, 1, raw)  # type: ignore[arg-type]
            requeued.append(str(result.id))
        return requeued


def _make_dead_letters() -> DeadLetters:
    settings = get_settings()
    return DeadLetters(redis_client(settings), settings)


get_dead_letters = per_process(_make_dead_letters)  # this process's DeadLetters
