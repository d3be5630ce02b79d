"""Async calls finished by Runware's webhook instead of polling.

With RUNWARE_WEBHOOK_URL set, every async call the project makes (videos, async images and
enhancements) carries a `webhookURL` of the project's receiver (`enhance-worker webhooks`,
workers/webhooks.py), unless the caller gave one of their own (that call polls). The URL names
the job and the items it expects and carries a token: an HMAC of the taskUUID, the job and that
count, under RUNWARE_WEBHOOK_SECRET (derived from the API key when unset). Runware POSTs each
result item there; the receiver checks the token, stores the items here (the inbox, in the state
Redis, deduplicated by item) and wakes the job: its parked poll becomes due at once and passes
without a grant (tasks/lua/webhook_wake.lua, pump.lua). The job's run then reads the inbox and
ends as a poll would have, without a call. Polling stays as the fallback, every
RUNWARE_WEBHOOK_POLL_S, for a webhook that never comes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import redis

from config.keys import FairKeys, StateKeys
from config.settings import Settings, get_settings
from tasks import scripts
from tasks.limiter import broker_redis
from tasks.state import hold_through_outage, per_process, redis_client, text

logger = logging.getLogger(__name__)

PATH = "/runware/webhook"
HOOKED_FOR_S = 3600  # how long a webhook's mark lets the job's next run pass without a grant
_RECEIVED = "@received"  # the inbox field that is not an item: when the first item came
_KEY_LABEL = b"enhance-worker webhook tokens"


def webhook_secret(settings: Settings) -> bytes | None:
    """The secret the tokens are made with, or None when there is none (no key either)."""
    if settings.runware_webhook_secret is not None:
        return settings.runware_webhook_secret.get_secret_value().encode()
    if settings.runware_api_key is not None:
        key = settings.runware_api_key.get_secret_value().encode()
        return hmac.new(key, _KEY_LABEL, hashlib.sha256).digest()
    return None


def token(secret: bytes, task_uuid: str, job_id: str, expected: int) -> str:
    """The token of one call's webhook URL."""
    message = f"{task_uuid}|{job_id}|{expected}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()[:40]


def token_is_valid(
    settings: Settings, given: str, task_uuid: str, job_id: str, expected: int
) -> bool:
    secret = webhook_secret(settings)
    if secret is None or not given:
        return False
    wanted = token(secret, task_uuid, job_id, expected).encode()
    return hmac.compare_digest(wanted, given.encode("utf-8", "replace"))


def expected_items(body: dict[str, Any]) -> int:
    """How many items a call's webhooks bring: one per result (or version)."""
    for field in ("numberResults", "promptVersions"):
        value = body.get(field)
        if isinstance(value, int) and value > 0:
            return value
    return 1


def webhook_url(settings: Settings, body: dict[str, Any], job_id: str) -> str | None:
    """The project-managed `webhookURL` for `body`, or None when webhooks are off (or the
    caller gave a webhookURL of their own)."""
    base, secret = settings.runware_webhook_url, webhook_secret(settings)
    if base is None or secret is None or body.get("webhookURL"):
        return None
    task_uuid, expected = str(body["taskUUID"]), expected_items(body)
    query = urlencode(
        {"job": job_id, "n": expected, "token": token(secret, task_uuid, job_id, expected)}
    )
    return f"{base.rstrip('/')}{PATH}?{query}"


def is_error(item: dict[str, Any]) -> bool:
    """Whether a result item says the task failed (it ends the call, whatever else came)."""
    return str(item.get("status", "")).lower() == "error"


def item_id(item: dict[str, Any]) -> str:
    """What tells one result item from another (a repeated POST brings the same id; every
    error item is the one `error`)."""
    for field in ("videoUUID", "imageUUID", "audioUUID"):
        if item.get(field):
            return str(item[field])
    if is_error(item):
        return "error"
    canonical = json.dumps(item, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


class Inbox:
    """The items webhooks brought, per taskUUID (state Redis), and the wake of their job
    (broker Redis)."""

    def __init__(self, state: redis.Redis, broker: redis.Redis, settings: Settings) -> None:
        self.state, self.broker, self.settings = state, broker, settings
        self.keys, self.fair = StateKeys(settings.key_prefix), FairKeys(settings.key_prefix)
        self._wake = scripts.register(broker, "webhook_wake")

    # --- the worker's side ---
    def expect(self, task_uuid: str) -> None:
        """A call that expects a webhook was submitted (counted until it ends; entries older
        than the longest call can take are dropped here, whatever left them)."""
        now = time.time()
        longest = self.settings.runware_video_timeout_s + self.settings.runware_webhook_poll_s

        def note() -> None:
            pipe = self.state.pipeline(transaction=False)
            pipe.zadd(self.keys.hooks_awaited, {task_uuid: now}, nx=True)
            pipe.zremrangebyscore(self.keys.hooks_awaited, "-inf", now - longest - 600)
            pipe.execute()

        _best_effort(note, "note a call that expects a webhook")

    def read(self, task_uuid: str) -> tuple[list[dict[str, Any]], float | None]:
        """The items stored for `task_uuid`, in the order they came, and when the first came
        (None: nothing came)."""
        raw: dict[bytes, bytes] = hold_through_outage(
            lambda: self.state.hgetall(self.keys.hook_items(task_uuid)),  # type: ignore[arg-type,return-value]
            "webhook inbox",
            30.0,
        )
        received = raw.pop(_RECEIVED.encode(), None)
        kept = sorted(json.loads(value) for value in raw.values())  # [came at, n, item]
        return [item for *_at, item in kept], float(received) if received is not None else None

    def finished(self, task_uuid: str, job_id: str) -> None:
        """The call ended, one way or another: no longer awaited, and no mark of its webhook
        left to let a later run of the same task id pass without a grant."""

        def clear() -> None:
            self.state.zrem(self.keys.hooks_awaited, task_uuid)
            self.broker.zrem(self.fair.hooked, job_id)

        _best_effort(clear, "clear a finished call's webhook records")

    # --- the receiver's side ---
    def store(self, task_uuid: str, items: list[dict[str, Any]], expected: int) -> tuple[int, bool]:
        """Keep `items` (each once): how many were new, and whether the call is complete (every
        expected item, or an error) so that its job should run now."""
        key, came = self.keys.hook_items(task_uuid), time.time()
        pipe = self.state.pipeline(transaction=True)
        for n, item in enumerate(items):
            pipe.hsetnx(key, item_id(item), json.dumps([came, n, item], separators=(",", ":")))
        pipe.hsetnx(key, _RECEIVED, repr(came))
        pipe.expire(key, self.settings.runware_items_retention_s)
        pipe.hkeys(key)
        *added, _received, _expire, fields = pipe.execute()
        stored = {text(field) for field in fields} - {_RECEIVED}
        complete = len(stored) >= expected or "error" in stored
        if complete:
            self.state.zrem(self.keys.hooks_awaited, task_uuid)
        return sum(map(bool, added)), complete

    def wake(self, job_id: str) -> int:
        """Wake the job (once: a repeated wake changes nothing). 1: its parked poll is due now;
        0: none was parked (the mark passes it when it comes); -1: woken before."""
        fair = self.fair
        return int(
            scripts.run(
                self._wake,
                [fair.parked_polls, fair.delayed, fair.hooked, fair.wake, fair.hook_woken(job_id)],
                [job_id, HOOKED_FOR_S],
            )
        )


def _best_effort(call: Callable[[], object], what: str) -> None:
    """Bookkeeping that must not turn a call Runware accepted into a retry: logged, not raised."""
    try:
        call()
    except redis.RedisError as exc:
        logger.warning("Could not %s: %s", what, exc)


def _make_inbox() -> Inbox:
    settings = get_settings()
    return Inbox(redis_client(settings), broker_redis(settings), settings)


get_inbox = per_process(_make_inbox)  # this process's Inbox
