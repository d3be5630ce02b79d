"""The limiter's Lua decisions against a real Redis (no worker): exact slots, leases, cool-down."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from config.settings import load_settings
from tasks.errors import LimiterBusy
from tasks.limiter import Limiter, Permit
from workers.services import RedisServer

_namespaces = itertools.count()


@pytest.fixture
def make(redis_server: RedisServer) -> Iterator[Any]:
    clients: list[redis.Redis] = []

    def build(**settings: Any) -> Limiter:
        client = redis.Redis.from_url(redis_server.url(60))
        clients.append(client)
        values = {"runware_limit_max_wait_s": 5.0, **settings}
        return Limiter(
            client, load_settings(_env_file=None, **values), namespace=f"t{next(_namespaces)}"
        )

    yield build
    for client in clients:
        client.close()


def _grant(limiter: Limiter) -> tuple[bool, float]:
    granted, wait, _ = limiter._try_acquire(f"lease-{time.monotonic_ns()}")
    return granted, wait


def test_slots_are_spaced_evenly_first_come_first_served(make: Any) -> None:
    limiter = make(runware_rate_limit="10/s")
    waits = [_grant(limiter)[1] for _ in range(6)]
    for index, wait in enumerate(waits):
        assert wait == pytest.approx(index * 0.1, abs=0.02)


def test_burst_lets_that_many_go_at_once(make: Any) -> None:
    limiter = make(runware_rate_limit=10, runware_rate_burst=3)
    waits = [_grant(limiter)[1] for _ in range(5)]
    assert waits[:3] == pytest.approx([0, 0, 0], abs=0.02)
    assert waits[3] == pytest.approx(0.1, abs=0.02)
    assert waits[4] == pytest.approx(0.2, abs=0.02)


def test_a_slot_beyond_the_wait_bound_is_not_reserved(make: Any) -> None:
    limiter = make(runware_rate_limit=1, runware_limit_max_wait_s=2.5)
    granted = [_grant(limiter) for _ in range(5)]
    assert [g for g, _ in granted] == [True, True, True, False, False]
    # The refused ones did not take a slot: both see the same next slot, 3 s away.
    assert granted[3][1] == pytest.approx(3.0, abs=0.05)
    assert granted[4][1] == pytest.approx(3.0, abs=0.05)


def test_in_flight_cap_and_release(make: Any) -> None:
    limiter = make(runware_max_in_flight=2)
    first = limiter._wait_for_grant()
    second = limiter._wait_for_grant()
    assert _grant(limiter) == (False, -1.0)
    limiter._give_back(first)
    third = limiter._wait_for_grant()
    assert limiter.state()["in_flight"] == 2
    for permit in (second, third):
        limiter._give_back(permit)
    assert limiter.state()["in_flight"] == 0


def test_a_waiter_is_woken_by_a_release_and_a_full_cap_reschedules(make: Any) -> None:
    limiter = make(runware_max_in_flight=1, runware_limit_max_wait_s=0.6)
    held = limiter._wait_for_grant()
    with pytest.raises(LimiterBusy) as busy:
        limiter._wait_for_grant()
    assert busy.value.countdown > 0
    limiter._give_back(held)
    with limiter.slot() as permit:
        assert isinstance(permit, Permit)


def test_leases_of_a_dead_holder_expire(make: Any) -> None:
    limiter = make(runware_max_in_flight=2, runware_lease_s=0.3)
    limiter._wait_for_grant()
    limiter._wait_for_grant()  # never released: the holder "died"
    assert _grant(limiter) == (False, -1.0)
    time.sleep(0.35)
    assert _grant(limiter)[0] is True


def test_throttling_pauses_everyone_and_success_clears_the_strikes(make: Any) -> None:
    limiter = make(runware_cooldown_s=0.4, runware_cooldown_max_s=1.0)
    permit = limiter._wait_for_grant()
    permit.outcome = "throttled"
    limiter._give_back(permit)
    assert _grant(limiter)[1] == pytest.approx(0.4, abs=0.05)
    permit = limiter._wait_for_grant()  # waits out the pause, then is throttled again
    permit.outcome = "throttled"
    limiter._give_back(permit)
    assert _grant(limiter)[1] == pytest.approx(0.8, abs=0.05)  # doubled
    time.sleep(0.85)
    permit = limiter._wait_for_grant()
    permit.outcome = "ok"
    limiter._give_back(permit)
    assert limiter.redis.get(limiter.keys["strikes"]) is None


def test_retry_after_lengthens_the_pause(make: Any) -> None:
    limiter = make(runware_cooldown_s=0.1)
    permit = limiter._wait_for_grant()
    permit.outcome, permit.retry_after = "throttled", 2.0
    limiter._give_back(permit)
    assert limiter.state()["cooldown_s"] == pytest.approx(2.0, abs=0.05)


def test_run_time_overrides_win_over_settings_and_can_be_removed(make: Any) -> None:
    limiter = make(runware_rate_limit=1000)
    limiter.set_overrides(rate="2/s")
    waits = [_grant(limiter)[1] for _ in range(3)]
    assert waits == pytest.approx([0.0, 0.5, 1.0], abs=0.02)
    limiter.set_overrides(rate=None, max_in_flight=1)
    assert limiter.state()["overrides"] == {"max_in_flight": 1.0}
    with pytest.raises(ValueError, match="unknown limit"):
        limiter.set_overrides(speed=3)


def test_an_unreachable_redis_grants_nothing(make: Any) -> None:
    unreachable = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.1)
    limiter = Limiter(unreachable, load_settings(_env_file=None), namespace="down", outage_s=0.6)
    started = time.monotonic()
    with pytest.raises(Exception, match="limiter's Redis is unreachable"):
        limiter._wait_for_grant()
    # It held the call for the whole outage bound instead of letting it through.
    assert time.monotonic() - started >= 0.6
