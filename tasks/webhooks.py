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
import time
from typing import Any
from urllib.parse import urlencode

import redis

from config.keys import FairKeys, StateKeys
from config.settings import Settings, get_settings
from tasks import scripts
from tasks.limiter import broker_redis
from tasks.state import hold_through_outage, per_process, redis_client

PATH = "/runware/webhook"
HOOKED_FOR_S = 3600  # how long a webhook's mark lets the job's next run pass without a grant
_RECEIVED = "@received"  # inbox fields that are not items: when the first item came
_WOKEN = "@woken"  # ... and whether the job was woken for it
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
    return hmac.compare_digest(token(secret, task_uuid, job_id, expected), given)


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


def item_id(item: dict[str, Any]) -> str:
    """What tells one result item from another (a repeated POST brings the same id)."""
    for field in ("videoUUID", "imageUUID", "audioUUID"):
        if item.get(field):
            return str(item[field])
    if str(item.get("status", "")).lower() == "error" or "error" in item:
        return "error"
    canonical = json.dumps(item, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def without_eta(raw: bytes) -> bytes:
    """A Celery message (kombu's JSON envelope, protocol 2) due now: its ETA taken out, or a
    worker would hold it until then."""
    envelope = json.loads(raw)
    headers = envelope.get("headers") if isinstance(envelope, dict) else None
    if isinstance(headers, dict) and headers.get("eta") is not None:
        headers["eta"] = None
        return json.dumps(envelope).encode()
    return raw


class Inbox:
    """The items webhooks brought, per taskUUID (state Redis), and the wake of their job
    (broker Redis)."""

    def __init__(self, state: redis.Redis, broker: redis.Redis, settings: Settings) -> None:
        self.state, self.broker, self.settings = state, broker, settings
        self.keys, self.fair = StateKeys(settings.key_prefix), FairKeys(settings.key_prefix)
        self._wake = scripts.register(broker, "webhook_wake")

    # --- the worker's side ---
    def expect(self, task_uuid: str) -> None:
        """A call that expects a webhook was submitted (counted until it ends)."""
        hold_through_outage(
            lambda: self.state.zadd(self.keys.hooks_awaited, {task_uuid: time.time()}, nx=True),
            "webhook inbox",
            30.0,
        )

    def read(self, task_uuid: str) -> tuple[list[dict[str, Any]], float | None]:
        """The items stored for `task_uuid` and when the first came (None: nothing came)."""
        raw: dict[bytes, bytes] = hold_through_outage(
            lambda: self.state.hgetall(self.keys.hook_items(task_uuid)),  # type: ignore[arg-type,return-value]
            "webhook inbox",
            30.0,
        )
        received = raw.pop(_RECEIVED.encode(), None)
        raw.pop(_WOKEN.encode(), None)
        items = [json.loads(value) for _field, value in sorted(raw.items())]
        return items, float(received) if received is not None else None

    def done(self, task_uuid: str) -> None:
        """The call ended (its job has its result): no longer awaited."""
        hold_through_outage(
            lambda: self.state.zrem(self.keys.hooks_awaited, task_uuid), "webhook inbox", 30.0
        )

    # --- the receiver's side ---
    def store(self, task_uuid: str, items: list[dict[str, Any]], expected: int) -> tuple[int, bool]:
        """Keep `items` (each once): how many were new, and whether the call is complete (every
        expected item, or an error) so that its job should run now."""
        key = self.keys.hook_items(task_uuid)
        pipe = self.state.pipeline(transaction=True)
        for item in items:
            pipe.hsetnx(key, item_id(item), json.dumps(item, separators=(",", ":")))
        pipe.hsetnx(key, _RECEIVED, repr(time.time()))
        pipe.expire(key, self.settings.runware_items_retention_s)
        pipe.hkeys(key)
        *added, _received, _expire, fields = pipe.execute()
        stored = {f.decode() if isinstance(f, bytes) else f for f in fields}
        stored -= {_RECEIVED, _WOKEN}
        complete = len(stored) >= expected or "error" in stored
        if complete:
            self.state.zrem(self.keys.hooks_awaited, task_uuid)
        return sum(1 for new in added[: len(items)] if new), complete

    def wake_once(self, task_uuid: str, job_id: str) -> bool:
        """Wake the job unless an earlier delivery already did; True when woken now."""
        key = self.keys.hook_items(task_uuid)
        if self.state.hexists(key, _WOKEN):
            return False
        fair = self.fair
        parked: bytes | None = self.broker.hget(fair.parked_polls, job_id)  # type: ignore[assignment]
        scripts.run(
            self._wake,
            [fair.parked_polls, fair.delayed, fair.hooked, fair.wake],
            [job_id, HOOKED_FOR_S, parked or b"", without_eta(parked) if parked else b""],
        )
        self.state.hset(key, _WOKEN, "1")
        return True


def _make_inbox() -> Inbox:
    settings = get_settings()
    return Inbox(redis_client(settings), broker_redis(settings), settings)


get_inbox = per_process(_make_inbox)  # this process's Inbox
