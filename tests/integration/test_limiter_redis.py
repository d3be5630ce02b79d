"""The limiter's scripts and dispatcher against a real Redis (no worker): exact spacing, leases,
cool-down, fair share by weight and priority."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from config.settings import load_settings
from tasks.admission import CallStart
from tasks.errors import BudgetExceeded, LimiterBusy
from tasks.ledger import Ledger
from tasks.limiter import Limiter, Permit
from workers.services import RedisServer

_namespaces = itertools.count()


@pytest.fixture
def make(redis_server: RedisServer) -> Iterator[Any]:
    made: list[Limiter] = []

    def build(**settings: Any) -> Limiter:
        client = redis.Redis.from_url(redis_server.url(60))
        values = {"runware_limit_max_wait_s": 5.0, **settings}
        limiter = Limiter(
            client, load_settings(_env_file=None, **values), namespace=f"t{next(_namespaces)}"
        )
        made.append(limiter)
        return limiter

    yield build
    for limiter in made:
        limiter.stop_dispatcher()
        limiter.redis.close()


def _grant_times(
    limiter: Limiter, callers: list[tuple[str, str]], stagger: float = 0.0
) -> list[tuple[float, str]]:
    """Each (account, priority) asks for a slot in its own thread; (grant time, account)."""
    granted: list[tuple[float, str]] = []
    lock = threading.Lock()

    def ask(account: str, priority: str) -> None:
        permit = limiter._wait_for_grant(account, priority)
        with lock:
            granted.append((time.monotonic(), account))
        limiter._give_back(permit)

    threads = [threading.Thread(target=ask, args=c) for c in callers]
    for thread in threads:
        thread.start()
        time.sleep(stagger)
    for thread in threads:
        thread.join(30)
    return sorted(granted)


def test_an_idle_fleet_grants_at_once(make: Any) -> None:
    limiter = make(runware_rate_limit="10/s")
    started = time.monotonic()
    permit = limiter._wait_for_grant()
    assert time.monotonic() - started < 0.05
    assert permit.needs_release is False  # no cap and no strikes: nothing to give back


def test_waiters_are_spaced_evenly(make: Any) -> None:
    limiter = make(runware_rate_limit="10/s")
    times = [t for t, _ in _grant_times(limiter, [("a", "batch")] * 8)]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(gap == pytest.approx(0.1, abs=0.03) for gap in gaps), gaps


def test_burst_lets_that_many_go_at_once(make: Any) -> None:
    limiter = make(runware_rate_limit=5, runware_rate_burst=3)
    times = [t for t, _ in _grant_times(limiter, [("a", "batch")] * 5)]
    assert times[2] - times[0] < 0.05
    assert times[3] - times[2] == pytest.approx(0.2, abs=0.05)


def test_in_flight_cap_and_release(make: Any) -> None:
    limiter = make(runware_max_in_flight=2, runware_limit_max_wait_s=0.5)
    first = limiter._wait_for_grant()
    second = limiter._wait_for_grant()
    assert limiter.state()["in_flight"] == 2
    with pytest.raises(LimiterBusy, match=r"within 0\.5s"):
        limiter._wait_for_grant()
    limiter._give_back(first)
    third = limiter._wait_for_grant()
    for permit in (second, third):
        limiter._give_back(permit)
    assert limiter.state()["in_flight"] == 0
    assert limiter.accounts() == {}  # the cancelled ticket left no trace


def test_a_release_wakes_a_waiter(make: Any) -> None:
    limiter = make(runware_max_in_flight=1)
    held = limiter._wait_for_grant()
    threading.Timer(0.3, limiter._give_back, args=[held]).start()
    started = time.monotonic()
    with limiter.slot() as permit:
        assert isinstance(permit, Permit)
    assert 0.25 < time.monotonic() - started < 1.0


def test_leases_of_a_dead_holder_expire(make: Any) -> None:
    limiter = make(runware_max_in_flight=2, runware_lease_s=0.3)
    limiter._wait_for_grant()
    limiter._wait_for_grant()  # never released: the holder "died"
    started = time.monotonic()
    limiter._give_back(limiter._wait_for_grant())
    assert 0.2 < time.monotonic() - started < 1.5


def test_throttling_pauses_everyone_and_success_clears_the_strikes(make: Any) -> None:
    limiter = make(runware_cooldown_s=0.4, runware_cooldown_max_s=1.0)
    permit = limiter._wait_for_grant()
    permit.outcome = "throttled"
    limiter._give_back(permit)
    assert limiter.state()["cooldown_s"] == pytest.approx(0.4, abs=0.05)
    started = time.monotonic()
    permit = limiter._wait_for_grant()  # waits out the pause
    assert time.monotonic() - started == pytest.approx(0.4, abs=0.1)
    assert permit.needs_release is True  # a strike is waiting to be cleared
    permit.outcome = "throttled"
    limiter._give_back(permit)
    assert limiter.state()["cooldown_s"] == pytest.approx(0.8, abs=0.05)  # doubled
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
    limiter.set_overrides(rate="5/s")
    times = [t for t, _ in _grant_times(limiter, [("a", "batch")] * 3)]
    assert times[2] - times[0] == pytest.approx(0.4, abs=0.08)
    limiter.set_overrides(rate=None, max_in_flight=1)
    assert limiter.state()["overrides"] == {"max_in_flight": 1.0}
    with pytest.raises(ValueError, match="unknown limit"):
        limiter.set_overrides(speed=3)


def test_weights_share_the_slots(make: Any) -> None:
    limiter = make(runware_rate_limit="40/s")
    limiter.set_account("a", weight=3)
    limiter.set_account("b", weight=1)
    blocker = limiter._wait_for_grant()  # keep the fleet busy so that everyone queues
    granted = _grant_times(limiter, [("a", "batch")] * 24 + [("b", "batch")] * 24, 0.002)
    limiter._give_back(blocker)
    first_32 = [account for _, account in granted[:32]]
    assert first_32.count("a") == 24
    assert first_32.count("b") == 8
    assert limiter.accounts()["a"]["weight"] == 3


def test_interactive_goes_first_but_batch_is_not_starved(make: Any) -> None:
    limiter = make(runware_rate_limit="50/s")
    callers = [("bulk", "batch")] * 15 + [("user", "interactive")] * 30
    order = [account for _, account in _grant_times(limiter, callers, 0.002)]
    # Interactive work overtakes the batch backlog, but at least 1 slot in 10 stays batch.
    first_20 = order[1:21]
    assert first_20.count("user") >= 16
    assert first_20.count("bulk") >= 2


def test_an_account_rate_of_its_own(make: Any) -> None:
    limiter = make(runware_rate_limit="100/s")
    limiter.set_account("slow", rate="5/s")
    granted = _grant_times(limiter, [("slow", "batch")] * 4 + [("fast", "batch")] * 10, 0.002)
    slow = [t for t, a in granted if a == "slow"]
    assert slow[-1] - slow[0] >= 0.55  # 4 calls at 5/s take at least 0.6 s
    fast = [t for t, a in granted if a == "fast"]
    assert fast[-1] - fast[0] < 0.4  # and do not hold back the others


def test_an_unreachable_redis_grants_nothing(make: Any) -> None:
    unreachable = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.1)
    limiter = Limiter(unreachable, load_settings(_env_file=None), namespace="down", outage_s=0.6)
    started = time.monotonic()
    with pytest.raises(Exception, match="limiter's Redis is unreachable"):
        limiter._wait_for_grant()
    # It held the call for the whole outage bound instead of letting it through.
    assert time.monotonic() - started >= 0.6


def test_a_call_start_asks_the_limits_only_when_the_ledger_says_go(make: Any) -> None:
    """The ledger's begin and the limiter's first ask share one script (tasks/admission.py): a
    refused budget or a finished task takes no place in the limits, and an unused place is
    given back."""
    limiter = make(
        runware_rate_limit=1.0,
        runware_rate_burst=1,
        runware_daily_budget_usd=0.003,
        key_prefix=f"cs{next(_namespaces)}",
    )
    ledger = Ledger(limiter.redis, limiter.settings)
    start = CallStart(ledger, limiter)
    tickets = f"{limiter.prefix}:tickets"

    def begin(task_uuid: str, done_key: str = "none") -> tuple[str, Any, Any]:
        return start.begin(task_uuid, "acme", "interactive", 0.0013, done_key, f"m:{task_uuid}")

    state, _, first = begin("a")
    assert (state, first.status) == ("go", 1)  # an idle fleet: granted in the same round trip
    state, _, second = begin("b", done_key="none-b")
    assert (state, second.status) == ("go", 2)  # the rate's one slot is taken: queued
    assert limiter.redis.hlen(tickets) == 1
    with pytest.raises(BudgetExceeded):  # a third 0.0013 would pass 0.003: refused, no ticket
        begin("c")
    assert limiter.redis.hlen(tickets) == 1
    limiter.redis.set("done:d", b"[]")
    state, value, finished = begin("d", done_key="done:d")
    assert (state, value, finished.status) == ("done", b"[]", 0)
    assert limiter.redis.hlen(tickets) == 1
    start.forfeit(second)  # the queued call never ran: its ticket is withdrawn
    assert limiter.redis.hlen(tickets) == 0
    start.forfeit(first)
    with limiter.slot("promptEnhance", "acme", "interactive", first) as permit:  # used: asks anew
        assert permit.lease != first.ticket
