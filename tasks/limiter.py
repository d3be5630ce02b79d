"""The fleet-wide limits on calls to Runware, as the worker threads see them.

A job reaches a worker thread only once the fleet's dispatcher (tasks/dispatcher.py) granted it
a slot: a lease named by the message's delivery tag, counted against RUNWARE_MAX_IN_FLIGHT and
against the fleet's worker threads, and taken on the fleet's rate timeline. The thread makes its
one call to Runware; the slot goes back when the job is acknowledged (config/transport.py), and
by itself after RUNWARE_LEASE_S if its worker died. What the fleet must hear is how the call
went (`Limiter.heard` wraps the call): a 429 or 503 starts a fleet-wide cool-down
(RUNWARE_COOLDOWN_S, doubling per strike up to RUNWARE_COOLDOWN_MAX_S, at least Retry-After)
that the dispatcher respects; a success clears the strikes (a round trip made only while there
are strikes, which each worker learns from its heartbeat).

Run-time overrides of the limits live in Redis and are read by every dispatcher step, so they
take effect without restarting workers (`enhance-worker limits ...`).

A refused API key (401/403, `invalidApiKey`, or none set) pauses the whole fleet instead of
failing every job of the backlog in turn: the first refusal records the key's fingerprint (a
digest, never the key) and a `paused` entry among the overrides, which stops every grant; the
jobs wait in the fair intake. A worker started with another key resumes the fleet, as does
`enhance-worker limits resume`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis

from config import redis as redis_urls
from config.keys import PRIORITY_CLASSES, FairKeys
from config.settings import Settings, get_settings, parse_rate
from tasks import scripts
from tasks.errors import AuthenticationError, RateLimited, WorkerError
from tasks.state import per_process, text
from tasks.state import seconds as redis_seconds

logger = logging.getLogger(__name__)
T = TypeVar("T")

OVERRIDE_FIELDS = ("rate", "burst", "max_in_flight")
PAUSED_FIELD = "paused"  # in the overrides hash, which every dispatcher step reads
KEY_TRY_WAIT_S = 2.0  # the longest a process's calls wait for its first answer
KEY_CHECK_S = 2.0  # how old a process's view of the refused keys may be


def key_fingerprint(settings: Settings) -> str:
    """A digest of the API key that tells keys apart without revealing one ("" for none)."""
    key = settings.runware_api_key
    if key is None:
        return ""
    return hashlib.sha256(key.get_secret_value().encode()).hexdigest()[:16]


class Limiter:
    """The fleet's limits in the broker's Redis: a call's outcome told to the fleet (the
    cool-down), run-time overrides, and their state."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self.keys = FairKeys(settings.key_prefix)
        self._outcome = scripts.register(client, "outcome")
        # Whether the fleet has cool-down strikes that a success must clear (from this
        # process's heartbeat, tasks/dispatcher.py, and from this process's own throttled calls).
        self.strikes = False
        self.fingerprint = key_fingerprint(settings)
        self._key_checked_at = 0.0  # when `refused` last asked the fleet (monotonic)
        self._first_call = threading.Lock()  # held by the one call that tries the key
        self._key_answered = False  # Runware answered a call without refusing the key
        # Whether Runware refused this process's key: it then makes no call (set by its own
        # refusal at once, and by `refused` from the fleet's record).
        self.key_refused = False

    def passed_without_a_grant(self, delivery_tag: str | None) -> bool:
        """Whether the dispatcher handed this delivery out without a grant (pump.lua's busy
        set): such a run must make no call to Runware."""
        if not delivery_tag:
            return False
        return self.redis.zscore(self.keys.busy, delivery_tag) is not None

    def heard(self, call: Callable[[], T]) -> T:
        """Make one call to Runware (in the slot the dispatcher granted) and tell the fleet how
        it went: throttled (the request's strike, once per request), answered, or no answer.

        Until Runware has answered one call of this process without refusing its key, calls go
        one at a time: a refused key then costs one call per process, not one per thread."""
        if self._key_answered:
            return self._heard(call)
        # A refusal comes back at once; a call slower than this has got past the key check,
        # and the others need not wait for its answer.
        tried = self._first_call.acquire(timeout=KEY_TRY_WAIT_S)
        if tried and (self._key_answered or self.key_refused):
            # Tried by another thread while this one waited: the threads queued behind it go
            # together now, not one call at a time.
            self._first_call.release()
            tried = False
        try:
            if self.key_refused:
                raise AuthenticationError(
                    "Runware refused this worker's API key (on an earlier call)",
                    code="invalidApiKey",
                )
            if not tried:
                return self._heard(call)
            try:
                result = self._heard(call)
            except AuthenticationError as exc:
                self.refuse_key(str(exc))  # before the next thread takes the lock
                raise
            except WorkerError as exc:
                self._key_answered = getattr(exc, "status", None) is not None
                raise
            self._key_answered = True
            return result
        finally:
            if tried:
                self._first_call.release()

    def _heard(self, call: Callable[[], T]) -> T:
        try:
            result = call()
        except RateLimited as exc:
            self.note("throttled" if exc.strike else "none", exc.retry_after)
            raise
        except WorkerError as exc:
            # Any other answer of Runware's (it has a status) shows it is not throttling us.
            self.note("ok" if getattr(exc, "status", None) else "none")
            raise
        self.note("ok")
        return result

    def note(self, outcome: str, retry_after: float | None = None) -> None:
        """Tell the fleet how a call went (`ok`, `throttled`, or `none` for no answer), when
        that changes anything: a throttled call starts or lengthens the cool-down; an answer
        clears the strikes, if there are any."""
        if outcome == "throttled":
            self.strikes = True
        elif not (outcome == "ok" and self.strikes):
            return
        else:
            self.strikes = False
        settings, keys = self.settings, self.keys
        try:
            pause = float(
                self._outcome(
                    keys=[keys.cooldown, keys.strikes],
                    args=[
                        outcome,
                        settings.runware_cooldown_s,
                        settings.runware_cooldown_max_s,
                        retry_after or 0,
                        settings.runware_retry_after_max_s,
                    ],
                )
            )
        except redis.RedisError as exc:
            logger.warning("Could not tell the fleet how a call went (%s).", exc)
            return
        if pause > 0:
            logger.warning("Runware is throttling: the whole fleet pauses for %.2fs.", pause)

    # --- a refused API key -------------------------------------------------------------------
    def refuse_key(self, reason: str) -> None:
        """Runware refused this process's key: record it and pause the fleet (once)."""
        self.key_refused = True
        paused = json.dumps({"reason": reason, "since": time.time(), "key": self.fingerprint})
        pipe = self.redis.pipeline(transaction=True)
        pipe.sadd(self.keys.refused_keys, self.fingerprint)
        pipe.hsetnx(self.keys.overrides, PAUSED_FIELD, paused)
        _, first = pipe.execute()
        if first:
            logger.error(
                "Runware refused the API key (%s): every call of the fleet is paused and the "
                "jobs wait. Set the right RUNWARE_API_KEY and restart the workers (a worker "
                "with another key resumes the fleet), or `enhance-worker limits resume`.",
                reason,
            )

    def refused(self) -> bool:
        """Whether this process's key is refused, from the fleet's record at most KEY_CHECK_S
        old (each process asks for itself: a prefork child has no heartbeat of its own)."""
        if time.monotonic() - self._key_checked_at >= KEY_CHECK_S:
            # On a Redis failure the last answer stands; the call's own Redis work waits or fails.
            with contextlib.suppress(redis.RedisError):
                self.check_key()
            self._key_checked_at = time.monotonic()
        return self.key_refused

    def check_key(self) -> None:
        """Learn whether the fleet recorded this process's key as refused. A
        process with no key, once refused, stays so: another worker's resume does not give it
        one."""
        if self.fingerprint:
            refused = self.redis.sismember(self.keys.refused_keys, self.fingerprint)
            self.key_refused = bool(refused)

    def resume_with_a_new_key(self) -> bool:
        """At a worker's start: if the fleet is paused for a refused key and this worker has
        another one, resume it. Whether it did."""
        if not self.paused() or not self.fingerprint:
            return False
        self.check_key()
        if self.key_refused:
            logger.error(
                "The fleet is paused: Runware refused this worker's API key too. Set the right "
                "RUNWARE_API_KEY and restart the workers."
            )
            return False
        # The pause goes; the refused keys stay recorded, so that workers still running with
        # one of them (a rolling deploy) make no call and cannot pause the fleet again.
        self.resume(forget_refused=False)
        logger.warning("This worker's API key is not the one Runware refused: the fleet resumes.")
        return True

    def paused(self) -> dict[str, Any] | None:
        """Why and since when the fleet is paused for a refused key (None: it is not)."""
        raw = self.redis.hget(self.keys.overrides, PAUSED_FIELD)
        return json.loads(raw) if raw else None

    def resume(self, forget_refused: bool = True) -> None:
        """Let the fleet call again: the pause goes, and (`forget_refused`) the record of
        refused keys."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hdel(self.keys.overrides, PAUSED_FIELD)
        if forget_refused:
            pipe.delete(self.keys.refused_keys)
        pipe.lpush(self.keys.wake, "1")
        pipe.ltrim(self.keys.wake, 0, 15)
        pipe.execute()
        if forget_refused:
            self.key_refused = False

    # --- run-time overrides and state ----------------------------------------------------------
    def set_overrides(self, **values: Any) -> None:
        """Override rate (N, N/s ...), burst or max_in_flight for every worker, at once.
        A value of None removes that override (the setting applies again)."""
        for name in values:
            if name not in OVERRIDE_FIELDS:
                raise ValueError(f"unknown limit {name!r}; known: {', '.join(OVERRIDE_FIELDS)}")
        mapping: dict[str | bytes, str | bytes] = {}
        removed: list[str] = []
        for name, value in values.items():
            if value is None:
                removed.append(name)
            elif name == "rate":
                mapping[name] = repr(parse_rate(value) or 0.0)
            else:
                number = int(value)
                if number < (1 if name == "burst" else 0):
                    raise ValueError(f"{name} must be >= {1 if name == 'burst' else 0}")
                mapping[name] = str(number)
        if removed:
            self.redis.hdel(self.keys.overrides, *removed)
        if mapping:
            self.redis.hset(self.keys.overrides, mapping=mapping)  # type: ignore[arg-type]

    def set_account(
        self,
        account: str,
        rate: str | float | None = None,
        weight: int | None = None,
        reset: bool = False,
    ) -> None:
        """Per-account overrides, in force at once everywhere: its rate (N, N/s ...; 0 for no
        limit of its own) and its weight in the fair share (an integer >= 1)."""
        from enhance_client.schemas import check_account

        check_account(account)
        keys = self.keys
        pipe = self.redis.pipeline(transaction=True)
        if reset:
            pipe.hdel(keys.account_rate, account)
            pipe.hdel(keys.account_weight, account)
        if rate is not None:
            pipe.hset(keys.account_rate, account, repr(parse_rate(rate) or 0.0))
        if weight is not None:
            if int(weight) < 1:
                raise ValueError("weight must be an integer >= 1")
            pipe.hset(keys.account_weight, account, str(int(weight)))
        if rate is not None or weight is not None:
            pipe.sadd(keys.accounts, account)
        elif reset:
            pipe.srem(keys.accounts, account)
        pipe.execute()

    def accounts(self) -> dict[str, dict[str, Any]]:
        """Every account with an override or waiting work: its rate, weight and queue depth."""
        keys = self.keys
        names = {
            text(n)
            for key in (keys.accounts, *(keys.active(c) for c in PRIORITY_CLASSES.values()))
            for n in self.redis.smembers(key)
        }
        default_rate = self.settings.runware_account_rate_limit
        result: dict[str, dict[str, Any]] = {}
        for name in sorted(names):
            raw_rate = self.redis.hget(keys.account_rate, name)
            rate = float(raw_rate) if raw_rate is not None else default_rate
            result[name] = {
                "rate": rate if rate else None,
                "weight": int(self.redis.hget(keys.account_weight, name) or 1),
                "waiting": {
                    priority: int(self.redis.llen(keys.queue(klass, name)))
                    for priority, klass in PRIORITY_CLASSES.items()
                },
            }
        return result

    def state(self) -> dict[str, Any]:
        """The configured and overridden limits, what is in flight now, and the accounts."""
        settings, keys = self.settings, self.keys
        pipe = self.redis.pipeline(transaction=False)
        pipe.time()
        pipe.hgetall(keys.overrides)
        pipe.get(keys.cooldown)
        pipe.hkeys(keys.transit)
        clock, raw_overrides, cooldown, untaken = pipe.execute()
        now = redis_seconds(clock)
        # A call holds a lease (by delivery tag) from its grant to its acknowledgement, renewed
        # while it runs: a lease past its expiry is a stopped worker's, and a granted job that
        # no worker has taken yet (its transit record stands) holds one but runs nowhere yet.
        leased = int(self.redis.zcount(keys.leases, now, "+inf"))
        scores = self.redis.zmscore(keys.leases, untaken) if untaken else []
        granted = sum(1 for score in scores if score is not None and score > now)
        in_flight = max(0, leased - granted)
        overrides = {text(k): float(v) for k, v in raw_overrides.items() if text(k) != PAUSED_FIELD}
        paused = raw_overrides.get(PAUSED_FIELD.encode())
        return {
            "settings": {
                "rate": settings.runware_rate_limit,
                "burst": settings.runware_rate_burst,
                "max_in_flight": settings.runware_max_in_flight,
                "account_rate": settings.runware_account_rate_limit,
            },
            "overrides": overrides,
            "in_flight": in_flight,
            "granted_waiting": int(granted),
            "cooldown_s": max(0.0, float(cooldown) - now) if cooldown else 0.0,
            "paused": json.loads(paused) if paused else None,
            "accounts": self.accounts(),
        }


def carry_over_old_overrides(client: redis.Redis, settings: Settings) -> int:
    """Copy run-time overrides set under the layout before the fair intake
    (`<prefix>:limit:global:overrides`, `<prefix>:limit:global:acct:<account>`) into the
    current keys, once, so that an upgrade keeps them; returns how many were carried over."""
    keys = FairKeys(settings.key_prefix)
    old = f"{settings.key_prefix}:limit:global"
    carried = 0
    overrides = client.hgetall(f"{old}:overrides")
    if overrides and not client.exists(keys.overrides):
        client.hset(keys.overrides, mapping=overrides)  # type: ignore[arg-type]
        carried += len(overrides)
    for raw in client.smembers(f"{old}:accounts"):
        account = text(raw)
        conf = {text(k): v for k, v in client.hgetall(f"{old}:acct:{account}").items()}
        for field, target in (("rate", keys.account_rate), ("weight", keys.account_weight)):
            if field in conf and client.hsetnx(target, account, conf[field]):
                client.sadd(keys.accounts, account)
                carried += 1
    if carried:
        client.delete(f"{old}:overrides", f"{old}:accounts")
    return carried


def broker_redis(settings: Settings) -> redis.Redis:
    """A client of the broker's Redis, where the fair queues and the limits live."""
    return redis_urls.client(settings.broker_url, settings.sentinel)


def _make_limiter() -> Limiter:
    settings = get_settings()
    return Limiter(broker_redis(settings), settings)


get_limiter = per_process(_make_limiter)  # this process's Limiter
