"""The Redis that holds the fleet's state (the ledger, poll markers, dead letters), and how
outages are met.

Every command has a timeout. While that Redis cannot be reached, callers hold their work and try
again with back-off for a bounded time (fail closed: no call without a budget check), then let
the Redis error go up: the retry policy (tasks/errors.py's `for_policy`) makes it a retry of
the job.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from config import redis as redis_urls
from config.settings import Settings

logger = logging.getLogger(__name__)
T = TypeVar("T")

OUTAGE_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


def per_process(make: Callable[[], T]) -> Callable[[], T]:
    """A getter of one `make()` for the whole process, built by its first caller (the others
    wait for it rather than building a second)."""
    lock = threading.Lock()
    made: list[T] = []

    def get() -> T:
        if not made:
            with lock:
                if not made:
                    made.append(make())
        return made[0]

    return get


def seconds(time_reply: tuple[int, int]) -> float:
    """Redis's TIME reply (seconds, microseconds) as epoch seconds: the clock every host of the
    fleet shares, where hosts' own clocks may disagree."""
    whole, micro = time_reply
    return whole + micro / 1e6


def text(value: bytes | str) -> str:
    """A Redis reply's string (redis-py gives bytes unless told to decode)."""
    return value.decode() if isinstance(value, bytes) else value


def redis_client(settings: Settings) -> redis.Redis:
    """A client of the state Redis (LIMITER_REDIS_URL, default REDIS_URL: the ledger, poll
    markers and dead letters), with timeouts on every command and a pool sized for the
    worker's real concurrency (config/redis.py)."""
    return redis_urls.client(settings.limiter_url, settings.sentinel)


def hold_through_outage(call: Callable[[], T], what: str, outage_s: float) -> T:
    """Run `call`; while Redis is unreachable, wait and retry for up to `outage_s` seconds,
    then raise the last Redis error."""
    delay = 0.05
    deadline = time.monotonic() + outage_s
    while True:
        try:
            return call()
        except OUTAGE_ERRORS as exc:
            if time.monotonic() > deadline:
                raise
            logger.warning(
                "The %s's Redis is unreachable (%s); holding calls, retrying in %.2fs.",
                what,
                type(exc).__name__,
                delay,
            )
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
