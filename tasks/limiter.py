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
import logging
import random
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis

from config.settings import Settings, get_settings, parse_rate
from tasks.errors import LimiterBusy
from tasks.state import hold_through_outage, redis_client

logger = logging.getLogger(__name__)

ACQUIRE = """
-- KEYS: 1 tat, 2 cooldown, 3 leases, 4 overrides, 5 waiting, 6 strikes
-- ARGV: 1 rate per s (0: none), 2 burst, 3 cap (0: none), 4 max wait s, 5 lease s, 6 lease id
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local o = redis.call('HMGET', KEYS[4], 'rate', 'burst', 'max_in_flight')
local rate = tonumber(o[1] or ARGV[1]) or 0
local burst = math.max(1, tonumber(o[2] or ARGV[2]) or 1)
local cap = tonumber(o[3] or ARGV[3]) or 0
local max_wait = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if cap > 0 and redis.call('ZCARD', KEYS[3]) >= cap then
  redis.call('SET', KEYS[5], '1', 'PX', 2000)
  return {0, '-1'}
end
local slot = now
local cool = tonumber(redis.call('GET', KEYS[2]) or '0')
if cool > slot then slot = cool end
if rate > 0 then
  local interval = 1 / rate
  local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
  if tat - (burst - 1) * interval > slot then slot = tat - (burst - 1) * interval end
  if slot - now > max_wait then return {0, tostring(slot - now)} end
  local new_tat = math.max(tat, slot) + interval
  redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil((new_tat - now + 60) * 1000))
elseif slot - now > max_wait then
  return {0, tostring(slot - now)}
end
-- A lease is kept only under a cap; the caller must release when it holds one, or when
-- strikes of an earlier 429/503 wait to be cleared by a success (the third value).
if cap > 0 then
  local lease_s = tonumber(ARGV[5])
  redis.call('ZADD', KEYS[3], slot + lease_s, ARGV[6])
  redis.call('PEXPIRE', KEYS[3], math.ceil((slot - now + lease_s + 60) * 1000))
  return {1, tostring(slot - now), 1}
end
return {1, tostring(slot - now), redis.call('EXISTS', KEYS[6])}
"""

RELEASE = """
-- KEYS: 1 leases, 2 cooldown, 3 strikes, 4 wake, 5 waiting
-- ARGV: 1 lease id, 2 outcome (ok|throttled|none), 3 cooldown base s, 4 cooldown max s,
--       5 retry-after s (0: none), 6 longest retry-after honoured
redis.call('ZREM', KEYS[1], ARGV[1])
if redis.call('EXISTS', KEYS[5]) == 1 then
  redis.call('LPUSH', KEYS[4], '1')
  redis.call('LTRIM', KEYS[4], 0, 63)
  redis.call('PEXPIRE', KEYS[4], 5000)
end
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


class Limiter:
    """The fleet-wide rate limit, in-flight cap and cool-down, in one namespace of Redis keys."""

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
        base = f"{settings.key_prefix}:limit:{namespace}"
        self.keys = {
            name: f"{base}:{name}"
            for name in ("tat", "cooldown", "leases", "overrides", "waiting", "strikes", "wake")
        }
        self._acquire = client.register_script(ACQUIRE)
        self._release = client.register_script(RELEASE)

    # --- one call ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def slot(self, task_type: str = "call") -> Iterator[Permit]:
        """Hold one call slot: wait for it (at most RUNWARE_LIMIT_MAX_WAIT_S, else LimiterBusy),
        yield a Permit for the call, and release it afterwards."""
        permit = self._wait_for_grant()
        try:
            yield permit
        finally:
            self._give_back(permit)

    def _wait_for_grant(self) -> Permit:
        settings = self.settings
        lease = uuid.uuid4().hex
        started = time.monotonic()
        deadline = started + settings.runware_limit_max_wait_s
        while True:
            granted, wait, needs_release = self._try_acquire(lease)
            if granted:
                if wait > 0:
                    time.sleep(wait)
                return Permit(lease, time.monotonic() - started, needs_release=needs_release)
            remaining = deadline - time.monotonic()
            if wait >= 0:  # the rate limit or a cool-down: the next slot is `wait` away
                countdown = max(0.5, wait - settings.runware_limit_max_wait_s / 2)
                raise LimiterBusy(f"next Runware call slot is {wait:.1f}s away", countdown)
            if remaining <= 0:  # the in-flight cap stayed full
                raise LimiterBusy("all in-flight slots stayed taken", random.uniform(0.5, 2.0))
            # Block until a slot is given back (or briefly, to notice expired leases).
            self._blocking_wait(min(remaining, 0.25))

    def _try_acquire(self, lease: str) -> tuple[bool, float, bool]:
        """One atomic decision; while Redis is unreachable, back off and try again (fail closed).
        (granted, seconds to the slot or -1 when the cap is full, whether to release)."""
        settings = self.settings
        names = ("tat", "cooldown", "leases", "overrides", "waiting", "strikes")
        keys = [self.keys[k] for k in names]
        args: list[str | int | float] = [
            settings.runware_rate_limit or 0,
            settings.runware_rate_burst,
            settings.runware_max_in_flight or 0,
            settings.runware_limit_max_wait_s,
            settings.lease_s,
            lease,
        ]
        answer = hold_through_outage(
            lambda: self._acquire(keys=keys, args=args), "limiter", self.outage_s
        )
        needs_release = len(answer) < 3 or bool(int(answer[2]))
        return bool(int(answer[0])), float(answer[1]), needs_release

    def _blocking_wait(self, timeout: float) -> None:
        try:
            self.redis.blpop([self.keys["wake"]], timeout=max(0.01, timeout))
        except (redis.ConnectionError, redis.TimeoutError):
            time.sleep(timeout)

    def _give_back(self, permit: Permit) -> None:
        if not permit.needs_release and permit.outcome != "throttled":
            return
        settings = self.settings
        keys = [self.keys[k] for k in ("leases", "cooldown", "strikes", "wake", "waiting")]
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

    def state(self) -> dict[str, Any]:
        """The configured and overridden limits, and what is in flight now."""
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
            },
            "overrides": overrides,
            "in_flight": int(in_flight),
            "cooldown_s": max(0.0, float(cooldown) - now) if cooldown else 0.0,
        }


# --- one limiter per process ------------------------------------------------------------------
_lock = threading.Lock()
_limiter: Limiter | None = None


def get_limiter() -> Limiter:
    """This process's fleet-wide Limiter."""
    global _limiter
    if _limiter is None:
        with _lock:
            if _limiter is None:
                settings = get_settings()
                _limiter = Limiter(redis_client(settings), settings)
    return _limiter
