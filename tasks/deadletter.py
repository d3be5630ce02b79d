"""Jobs that failed for good (permanent error, retries exhausted, budget, bad input), kept in a
Redis list with their reason so that nothing fails silently and any can be requeued.

Entries: {"taskUUID", "task", "reason", "failedAt", "taskId", "args", "kwargs"}, and for a
message no worker could read (filed by the dispatcher) its first bytes under "message"; the
list keeps the newest DEAD_LETTER_MAX.
"""

from __future__ import annotations

import hashlib
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
UNREADABLE_KEPT = 4096  # bytes of an unreadable message kept in its entry
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
        message: str | None = None,
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
        if message is not None:  # a message no worker could read: its first bytes
            entry["message"] = redact(message)
        pipe = self.redis.pipeline(transaction=True)
        pipe.lpush(self.key, json.dumps(entry, default=str))
        pipe.ltrim(self.key, 0, DEAD_LETTER_MAX - 1)
        pipe.execute()

    def record_unreadable(self, raw: bytes, reason: str, task: str = "") -> str:
        """File a message no worker could read, with its reason and its first
        UNREADABLE_KEPT bytes (as text); its id in the list ("message-" and a digest)."""
        ident = "message-" + hashlib.sha1(raw, usedforsecurity=False).hexdigest()[:16]
        kept = raw[:UNREADABLE_KEPT].decode(errors="replace")
        if len(raw) > UNREADABLE_KEPT:
            kept += f"... ({len(raw)} bytes in all)"
        why = f"UnreadableMessage: {reason}; set aside, no task ran"
        self.record(ident, task or "(unreadable message)", why, "", [], {}, message=kept)
        return ident

    def entries(self) -> list[dict[str, Any]]:
        """Every entry, newest first."""
        return [json.loads(raw) for raw in self.redis.lrange(self.key, 0, -1)]

    def retry(self, app: Celery, task_uuids: list[str] | None = None) -> list[str]:
        """Requeue the entries with these taskUUIDs (all when None) under their own Celery task
        id, so every task (one of the user's own too, whose taskUUID derives from that id) keeps
        its taskUUID and Runware never bills a call twice; remove them from the list. Returns
        the task ids."""
        requeued: list[str] = []
        for raw in self.redis.lrange(self.key, 0, -1):
            entry = json.loads(raw)
            if task_uuids is not None and entry["taskUUID"] not in task_uuids:
                continue
            if "message" in entry:  # an unreadable message: nothing to requeue, it stays
                continue
            kwargs = dict(entry["kwargs"])
            if entry["task"] in ("tasks.enhance_prompt", "tasks.enhance_batch_item") or (
                entry["task"].startswith("tasks.generate_")
            ):
                kwargs.setdefault("taskUUID", entry["taskUUID"])
            name = REQUEUE_AS.get(entry["task"], entry["task"])
            result = app.send_task(
                name, args=entry["args"], kwargs=kwargs, task_id=entry.get("taskId") or None
            )
            self.redis.lrem(self.key, 1, raw)  # type: ignore[arg-type]
            requeued.append(str(result.id))
        return requeued


def _make_dead_letters() -> DeadLetters:
    settings = get_settings()
    return DeadLetters(redis_client(settings), settings)


get_dead_letters = per_process(_make_dead_letters)  # this process's DeadLetters
