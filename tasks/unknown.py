"""Jobs of a task that no live worker of the fleet registers, parked instead of failed.

A message on one of the fleet's queues whose task no worker knows (another app's job routed to
the wrong queue, or one sent before the workers that register its task were deployed) would be
failed by Celery as "unregistered" and lost. The dispatcher's step sets it aside instead, and
the dispatcher parks it here, unchanged: it goes back to the fleet's queues by itself as soon
as a live worker registers its task, and `enhance-worker unknown` lists the parked jobs, moves
them to another queue (where the app that knows them reads) or drops them. The gauge
`enhance_unknown_task_jobs` and the alert `JobsOfUnknownTask` show that any wait.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis

from config.keys import FairKeys

CHUNK = 500  # messages read per round trip when the list is walked
# KEYS 1 the parked list, 2 the queue's list; ARGV 1 the parked message, 2 the one to push.
MOVE = """
local removed = redis.call('LREM', KEYS[1], -1, ARGV[1])
if removed > 0 then redis.call('LPUSH', KEYS[2], ARGV[2]) end
return removed
"""


@dataclass(frozen=True)
class Parked:
    """One parked message, as the CLI shows it."""

    raw: bytes
    task: str  # its task's name ("" when it names none)
    queue: str  # the queue it was sent to (its routing key)


def describe(raw: bytes) -> Parked:
    """The task and queue a parked message names (the dispatcher read it as a kombu message;
    a field it lacks reads as "")."""
    task = queue = ""
    try:
        env = json.loads(raw)
        headers = env.get("headers") or {}
        task = str(headers.get("task") or "")
        queue = str(env["properties"]["delivery_info"].get("routing_key") or "")
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    return Parked(raw, task, queue)


def sent_to(raw: bytes, queue: str) -> bytes:
    """The message as if it had been sent to `queue` (kombu puts a message back where its
    routing key says when its worker dies before acknowledging it)."""
    env: dict[str, Any] = json.loads(raw)
    props = env.setdefault("properties", {})
    props.setdefault("delivery_info", {}).update(exchange="", routing_key=queue)
    return json.dumps(env).encode()


class UnknownTasks:
    """The parked jobs of unknown tasks (a Redis list, newest first)."""

    def __init__(self, client: redis.Redis, keys: FairKeys) -> None:
        self.redis = client
        self.key = keys.unknown
        self._move = client.register_script(MOVE)

    def park(self, raw: bytes) -> None:
        self.redis.lpush(self.key, raw)

    def count(self) -> int:
        return int(self.redis.llen(self.key))

    def parked(self) -> Iterator[Parked]:
        """Every parked job, oldest first."""
        end = -1
        while True:
            chunk: list[bytes] = self.redis.lrange(self.key, end - CHUNK + 1, end)  # type: ignore[assignment]
            for raw in reversed(chunk):
                yield describe(raw)
            if len(chunk) < CHUNK:
                return
            end -= CHUNK

    def summary(self) -> Counter[tuple[str, str]]:
        """How many jobs wait, by task and by the queue they were sent to."""
        return Counter((p.task, p.queue) for p in self.parked())

    def move(self, to: Callable[[Parked], str | None]) -> int:
        """Send each parked job for which `to` names a queue there (to kombu's list of the
        queue's priority 0, its routing key set to the queue), oldest first, each in one
        transaction with its removal from this list; the number moved. The list is read before
        anything moves, so a job parked meanwhile stays."""
        moved = 0
        for parked in list(self.parked()):
            queue = to(parked)
            if queue is None:
                continue
            message = parked.raw if queue == parked.queue else sent_to(parked.raw, queue)
            # Pushed only if this walk is the one that removed it (another may move it too).
            moved += int(self._move(keys=[self.key, queue], args=[parked.raw, message]))
        return moved

    def drop(self, task: str | None) -> int:
        """Delete the parked jobs of `task` (every one when None); the number deleted."""
        chosen = [p for p in list(self.parked()) if task is None or p.task == task]
        dropped = 0
        for parked in chosen:
            dropped += int(self.redis.lrem(self.key, -1, parked.raw))  # type: ignore[arg-type]
        return dropped

    def return_known(self, known: frozenset[str]) -> int:
        """Send back, to the queue each was sent to, the jobs whose task a live worker now
        registers; the number sent back."""
        if not self.count():
            return 0
        return self.move(lambda p: p.queue if p.task in known and p.queue else None)
