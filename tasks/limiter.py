"""The fleet-wide limits on calls to Runware, kept in Redis and shared by every worker.

- A rate limit (RUNWARE_RATE_LIMIT, RUNWARE_RATE_BURST) as GCRA with reservations: each call
  atomically reserves the next free slot on one fleet-wide timeline and then sleeps until it,
  so calls leave evenly spaced, first come first served, and no waiter polls Redis.
- An in-flight cap (RUNWARE_MAX_IN_FLIGHT) as leases in a sorted set scored by expiry: a worker
  that dies without releasing loses its slots after RUNWARE_LEASE_S. Waiters block on a wake-up
  list (BLPOP) instead of polling.
- A shared cool-down: a 429 or 503 pauses the whole fleet, doubling with each strike
  (RUNWARE_COOLDOWN_S .. RUNWARE_COOLDOWN_MAX_S, at least Retry-After); a success clears it.

Each decision is one Lua script, timed by Redis's own clock (TIME), so machines with skewed
clocks share one timeline. Run-time overrides live in a Redis hash (`enhance-worker limits
global ...`) and are read by every decision, so limits change without restarting workers.

When Redis cannot be reached the limiter fails closed: no call is made without a grant; the
task waits in its worker for Redis to come back (backing off) and then retries.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis

from config.settings import Settings, get_settings, parse_rate
from tasks import fairness, metrics
from tasks.errors import LimiterBusy
from tasks.state import hold_through_outage, per_process, redis_client, run_script

logger = logging.getLogger(__name__)

RELEASE = """
-- KEYS: 1 leases, 2 cooldown, 3 strikes, 4 wake
-- ARGV: 1 lease id, 2 outcome (ok|throttled|none), 3 cooldown base s, 4 cooldown max s,
--       5 retry-after s (0: none), 6 longest retry-after honoured
redis.call('ZREM', KEYS[1], ARGV[1])
-- A freed lease may let a queued call go: wake the dispatcher.
redis.call('LPUSH', KEYS[4], '1')
redis.call('LTRIM', KEYS[4], 0, 15)
redis.call('PEXPIRE', KEYS[4], 10000)
if ARGV[2] == 'ok' then
  redis.call('DEL', KEYS[3])
elseif ARGV[2] == 'throttled' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  local strikes = redis.call('INCR', KEYS[3])
  redis.call('EXPIRE', KEYS[3], 600)
  local maximum = tonumber(ARGV[4])
  local pause = math.min(maximum, tonumber(ARGV[3]) * 2 ^ (strikes - 1))
  local retry_after = tonumber(ARGV[5])
  if retry_after > pause then pause = math.min(retry_after, tonumber(ARGV[6])) end
  local until_ = now + pause
  local current = tonumber(redis.call('GET', KEYS[2]) or '0')
  if until_ > current then
    redis.call('SET', KEYS[2], tostring(until_), 'PX', math.ceil(pause * 1000) + 1000)
  end
  return tostring(pause)
end
return '0'
"""

OVERRIDE_FIELDS = ("rate", "burst", "max_in_flight")
# Tickets name a waiting call fleet-wide: a random prefix per process (new after a fork), then
# a counter; cheaper than a uuid4 per call.
_TICKETS = ""
_ticket_numbers = itertools.count()


def _new_ticket_prefix() -> None:
    global _TICKETS, _ticket_numbers
    _TICKETS = f"{uuid.uuid4().hex[:16]}:"
    _ticket_numbers = itertools.count()


_new_ticket_prefix()
os.register_at_fork(after_in_child=_new_ticket_prefix)
PRIORITIES = {"interactive": "i", "batch": "b"}
DISPATCHER_LOCK_MS = 3000


@dataclass
class Permit:
    """A granted call slot; the client records how the call went before it is released."""

    lease: str
    waited_s: float
    outcome: str = "none"  # ok | throttled | none (no answer: timeout, connection error)
    retry_after: float | None = None
    # False when giving the slot back has nothing to do (no lease, no strikes to clear): a
    # round trip saved on every call when only a rate limit is in force.
    needs_release: bool = True


@dataclass
class Admission:
    """A call's place in the limits, asked for ahead of the call (tasks/admission.py asks in the
    same round trip as the ledger's begin). `status` 1: granted, 2: queued, 0: not asked."""

    account: str
    klass: str
    ticket: str
    args: list[str | int | float]  # the ENQUEUE script's ARGV
    started: float
    status: int = 0
    needs_release: bool = True
    used: bool = False


class Limiter:
    """The fleet-wide rate limit, in-flight cap, cool-down and fair share, in one namespace of
    Redis keys. Waiting calls are served by the fleet's dispatcher (tasks/fairness.py)."""

    def __init__(
        self,
        client: redis.Redis,
        settings: Settings,
        namespace: str = "global",
        outage_s: float = 30.0,
    ) -> None:
        self.redis = client
        self.settings = settings
        # How long a call is held while Redis is unreachable before the task retries instead.
        self.outage_s = outage_s
        self.prefix = f"{settings.key_prefix}:limit:{namespace}"
        self.keys = {
            name: f"{self.prefix}:{name}"
            for name in ("tat", "cooldown", "leases", "overrides", "strikes", "wake", "dispatcher")
        }
        self._enqueue = client.register_script(fairness.ENQUEUE)
        self._tick = client.register_script(fairness.TICK)
        self._cancel = client.register_script(fairness.CANCEL)
        self._release = client.register_script(RELEASE)
        self._dispatcher: Dispatcher | None = None

    def _limit_args(self) -> list[str | int | float]:
        settings = self.settings
        return [
            self.prefix,
            settings.runware_rate_limit or 0,
            settings.runware_rate_burst,
            settings.runware_max_in_flight or 0,
            settings.runware_account_rate_limit or 0,
            settings.lease_s,
            fairness.MAX_STREAK,
        ]

    # --- one call ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def slot(
        self,
        task_type: str = "call",
        account: str = "default",
        priority: str = "interactive",
        admitted: Admission | None = None,
    ) -> Iterator[Permit]:
        """Hold one call slot: wait for it (at most RUNWARE_LIMIT_MAX_WAIT_S, else LimiterBusy),
        yield a Permit for the call, and release it afterwards. With `admitted` (asked for
        already, unused), the call takes that place instead of asking again."""
        permit = self._wait_for_grant(account, priority, admitted)
        metrics.LIMIT_WAIT.labels(account, priority).observe(permit.waited_s)
        try:
            yield permit
        finally:
            self._give_back(permit)

    def admission(self, account: str = "default", priority: str = "interactive") -> Admission:
        """A new, not yet asked, place in the limits for one call."""
        ticket = f"{_TICKETS}{next(_ticket_numbers):x}"
        klass = PRIORITIES.get(priority, "i")
        args = [*self._limit_args(), account, klass, ticket]
        return Admission(account, klass, ticket, args, time.monotonic())

    def forfeit(self, admitted: Admission) -> None:
        """Give up an admission the call never used: its grant back, or its ticket withdrawn."""
        if admitted.used or admitted.status == 0:
            return
        admitted.used = True
        if admitted.status == 1:
            self._give_back(Permit(admitted.ticket, 0.0, needs_release=admitted.needs_release))
            return
        cancelled, value = hold_through_outage(
            lambda: self._cancel(
                keys=[], args=[self.prefix, admitted.account, admitted.klass, admitted.ticket]
            ),
            "limiter",
            self.outage_s,
        )
        if not int(cancelled):  # granted meanwhile
            self._give_back(Permit(admitted.ticket, 0.0, needs_release=bool(int(value))))

    def _wait_for_grant(
        self,
        account: str = "default",
        priority: str = "interactive",
        admitted: Admission | None = None,
    ) -> Permit:
        settings = self.settings
        if admitted is None or admitted.used or admitted.status == 0:
            admitted = self.admission(account, priority)
            args = admitted.args
            status, needs = hold_through_outage(
                lambda: run_script(self._enqueue, [], args), "limiter", self.outage_s
            )
            admitted.status, admitted.needs_release = int(status), bool(int(needs))
        admitted.used = True
        ticket, klass, started = admitted.ticket, admitted.klass, admitted.started
        if admitted.status == 1:  # nobody waited and a slot was free: go now
            return Permit(ticket, 0.0, needs_release=admitted.needs_release)
        self.ensure_dispatcher()
        deadline = started + settings.runware_limit_max_wait_s
        grant_key = f"{self.prefix}:grant:{ticket}"
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                answer = self.redis.blpop([grant_key], timeout=min(remaining, 4.0))
            except (redis.ConnectionError, redis.TimeoutError):
                time.sleep(min(remaining, 0.5))
                continue
            if answer is not None:
                return Permit(
                    ticket, time.monotonic() - started, needs_release=bool(int(answer[1]))
                )
        cancelled, value = hold_through_outage(
            lambda: self._cancel(keys=[], args=[self.prefix, account, klass, ticket]),
            "limiter",
            self.outage_s,
        )
        if not int(cancelled):  # granted just as we gave up: go ahead
            return Permit(ticket, time.monotonic() - started, needs_release=bool(int(value)))
        # Come back about when this job's turn would have come, so that the queue stays fed
        # and no slot goes unused while the re-scheduled jobs are away.
        rate = settings.runware_rate_limit or 0.0
        ahead = int(value)
        countdown = 0.8 * ahead / rate if rate > 0 else 0.0
        countdown = max(countdown, random.uniform(0.2, 0.5) * settings.runware_limit_max_wait_s)
        raise LimiterBusy(
            f"no call slot for account {account!r} ({priority}) within "
            f"{settings.runware_limit_max_wait_s:g}s",
            countdown,
        )

    # --- the dispatcher ------------------------------------------------------------------------
    def ensure_dispatcher(self) -> None:
        """Run this process's dispatcher candidate (one per process; one active in the fleet)."""
        if self._dispatcher is None or not self._dispatcher.is_alive():
            with _lock:
                if self._dispatcher is None or not self._dispatcher.is_alive():
                    self._dispatcher = Dispatcher(self)
                    self._dispatcher.start()

    def stop_dispatcher(self) -> None:
        """Stop this process's dispatcher candidate and wait for it (at most ~1 s)."""
        if self._dispatcher is not None:
            self._dispatcher.stop()
            self._dispatcher.join(timeout=3.0)

    def tick(self, dispatcher_id: str, client: redis.Redis | None = None) -> tuple[float, int]:
        """Grant what the limits allow now; (seconds to the next possible grant, or -1 nobody
        waits, -2 cap full, -3 not the dispatcher; how many were granted)."""
        args = [
            *self._limit_args(),
            dispatcher_id,
            DISPATCHER_LOCK_MS,
            50,
            self.settings.runware_limit_max_wait_s + 1.0,
        ]
        wait, granted = self._tick(keys=[], args=args, client=client)
        return float(wait), int(granted)

    def _give_back(self, permit: Permit) -> None:
        if not permit.needs_release and permit.outcome != "throttled":
            return
        settings = self.settings
        keys = [self.keys[k] for k in ("leases", "cooldown", "strikes", "wake")]
        args: list[str | int | float] = [
            permit.lease,
            permit.outcome,
            settings.runware_cooldown_s,
            settings.runware_cooldown_max_s,
            permit.retry_after or 0,
            settings.runware_retry_after_max_s,
        ]
        try:
            pause = float(self._release(keys=keys, args=args))
        except redis.RedisError as exc:
            # The lease expires by itself; the call's result must not be lost over this.
            logger.warning("Could not release an in-flight slot (%s); it will expire.", exc)
            return
        if pause > 0:
            logger.warning("Runware is throttling: the whole fleet pauses for %.2fs.", pause)

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
            self.redis.hdel(self.keys["overrides"], *removed)
        if mapping:
            self.redis.hset(self.keys["overrides"], mapping=mapping)  # type: ignore[arg-type]

    def set_account(
        self,
        account: str,
        rate: str | float | None = None,
        weight: int | None = None,
        reset: bool = False,
    ) -> None:
        """Per-account overrides, in force at once everywhere: its rate (N, N/s ...; 0 for no
        limit of its own) and its weight in the fair share (an integer >= 1)."""
        key = f"{self.prefix}:acct:{account}"
        if reset:
            self.redis.delete(key)
        mapping: dict[str | bytes, str | bytes] = {}
        if rate is not None:
            mapping["rate"] = repr(parse_rate(rate) or 0.0)
        if weight is not None:
            if int(weight) < 1:
                raise ValueError("weight must be an integer >= 1")
            mapping["weight"] = str(int(weight))
        if mapping:
            self.redis.hset(key, mapping=mapping)  # type: ignore[arg-type]
            self.redis.sadd(f"{self.prefix}:accounts", account)

    def accounts(self) -> dict[str, dict[str, Any]]:
        """Every account with an override or waiting work: its rate, weight and queue depth."""
        names = {
            (n.decode() if isinstance(n, bytes) else str(n))
            for key in ("accounts", "active:i", "active:b")
            for n in self.redis.smembers(f"{self.prefix}:{key}")
        }
        default_rate = self.settings.runware_account_rate_limit
        result: dict[str, dict[str, Any]] = {}
        for name in sorted(names):
            raw = self.redis.hgetall(f"{self.prefix}:acct:{name}")
            conf = {_text(k): _text(v) for k, v in raw.items()}
            rate = float(conf["rate"]) if "rate" in conf else default_rate
            result[name] = {
                "rate": rate if rate else None,
                "weight": int(conf.get("weight", 1)),
                "waiting": {
                    priority: int(self.redis.llen(f"{self.prefix}:q:{klass}:{name}"))
                    for priority, klass in PRIORITIES.items()
                },
            }
        return result

    def state(self) -> dict[str, Any]:
        """The configured and overridden limits, what is in flight now, and the accounts."""
        settings = self.settings
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.keys["overrides"])
        pipe.zcard(self.keys["leases"])
        pipe.get(self.keys["cooldown"])
        pipe.time()
        raw_overrides, in_flight, cooldown, (sec, usec) = pipe.execute()
        now = sec + usec / 1e6
        overrides = {
            (k.decode() if isinstance(k, bytes) else k): float(v) for k, v in raw_overrides.items()
        }
        return {
            "settings": {
                "rate": settings.runware_rate_limit,
                "burst": settings.runware_rate_burst,
                "max_in_flight": settings.runware_max_in_flight,
                "account_rate": settings.runware_account_rate_limit,
            },
            "overrides": overrides,
            "in_flight": int(in_flight),
            "cooldown_s": max(0.0, float(cooldown) - now) if cooldown else 0.0,
            "accounts": self.accounts(),
        }


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Dispatcher(threading.Thread):
    """A candidate for the fleet's one dispatcher: it takes the role when the lock in Redis is
    free (the active one died or stopped), then hands out slots to waiting tickets as the
    limits allow, sleeping until the next slot or until a new ticket or a release wakes it."""

    def __init__(self, limiter: Limiter) -> None:
        super().__init__(name="limit-dispatcher", daemon=True)
        self.limiter = limiter
        self.id = uuid.uuid4().hex
        self._stopped = threading.Event()

    def stop(self) -> None:
        self._stopped.set()

    def run(self) -> None:
        limiter, holding = self.limiter, False
        # A connection of its own: the shared pool may be full of threads blocked on grants.
        client = redis.Redis(
            connection_pool=redis.ConnectionPool(**limiter.redis.connection_pool.connection_kwargs)
        )
        while not self._stopped.is_set():
            try:
                if not holding:
                    holding = bool(
                        client.set(
                            limiter.keys["dispatcher"], self.id, nx=True, px=DISPATCHER_LOCK_MS
                        )
                    )
                    if not holding:
                        self._stopped.wait(random.uniform(0.3, 0.7))
                        continue
                wait, _ = limiter.tick(self.id, client)
                if wait == -3:
                    holding = False
                    continue
                if wait == 0:
                    continue
                if 0 < wait <= 0.25:
                    # The next slot is near: sleep here. Redis checks a blocked command's
                    # timeout only every 1/hz s (100 ms by default), far too coarse for this.
                    self._stopped.wait(wait)
                    continue
                # Nobody waits, the cap is full, or the next slot is far: block until a ticket
                # or a release wakes us (or a second, to renew the role).
                timeout = 1.0 if wait < 0 else min(wait, 1.0)
                client.blpop([limiter.keys["wake"]], timeout=timeout)
            except (redis.RedisError, ValueError, OSError) as exc:
                if self._stopped.is_set():
                    return
                logger.warning("The limit dispatcher lost Redis (%s); retrying.", exc)
                holding = False
                self._stopped.wait(0.5)


# --- one limiter per process ------------------------------------------------------------------
_lock = threading.Lock()  # one dispatcher candidate per process


def _make_limiter() -> Limiter:
    settings = get_settings()
    return Limiter(redis_client(settings), settings)


get_limiter = per_process(_make_limiter)  # this process's fleet-wide Limiter
