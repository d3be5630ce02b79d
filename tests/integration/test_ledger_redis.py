"""The ledger's scripts against a real Redis (no worker): once-only billing, budgets, expiry."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from config.settings import load_settings
from tasks.errors import BudgetExceeded
from tasks.ledger import Ledger
from workers.services import RedisServer

_prefixes = itertools.count()


@pytest.fixture
def make(redis_server: RedisServer) -> Iterator[Any]:
    clients: list[redis.Redis] = []

    def build(**settings: Any) -> Ledger:
        client = redis.Redis.from_url(redis_server.url(61))
        clients.append(client)
        return Ledger(
            client, load_settings(_env_file=None, key_prefix=f"l{next(_prefixes)}", **settings)
        )

    yield build
    for client in clients:
        client.close()


def _uuid() -> str:
    return str(uuid.uuid4())


def test_a_task_is_billed_once_in_micro_dollars(make: Any) -> None:
    ledger = make()
    task = _uuid()
    assert ledger.commit(task, "acme", 0.0013 * 3) is True
    assert ledger.commit(task, "acme", 0.0013 * 3) is False  # a redelivery changes nothing
    assert ledger.commit(_uuid(), "other", 0.0013) is True
    totals = ledger.day()
    assert totals.total_micro == 3900 + 1300
    assert totals.tasks == 2
    assert totals.by_account_micro == {"acme": 3900, "other": 1300}
    assert ledger.billed(task) == pytest.approx(0.0039)
    assert totals.as_json("acme") == {
        "day": totals.day,
        "total_usd": 0.0039,
        "tasks": 1,
        "by_account": {"acme": 0.0039},
    }


def test_many_small_costs_add_up_exactly(make: Any) -> None:
    ledger = make()
    for _ in range(1000):
        ledger.commit(_uuid(), "a", 0.0013)
    assert ledger.day().total_micro == 1_300_000
    assert ledger.day().as_json()["total_usd"] == 1.3


def test_the_fleet_budget_admits_exactly_what_fits(make: Any) -> None:
    ledger = make(runware_daily_budget_usd=0.01)
    outcomes = []
    for _ in range(20):
        try:
            ledger.reserve(_uuid(), "a", 0.0013)
            outcomes.append("ok")
        except BudgetExceeded as exc:
            outcomes.append(str(exc))
    assert outcomes.count("ok") == 7
    refused = [o for o in outcomes if o != "ok"]
    assert len(refused) == 13
    assert "RUNWARE_DAILY_BUDGET_USD of $0.010000" in refused[0]
    assert "$0.009100 already spent or reserved" in refused[0]


def test_the_account_budget_is_per_account(make: Any) -> None:
    ledger = make(runware_account_daily_budget_usd=0.003)
    for account in ("a", "b"):
        ledger.reserve(_uuid(), account, 0.0013)
        ledger.reserve(_uuid(), account, 0.0013)
        with pytest.raises(BudgetExceeded, match=f"account '{account}'"):
            ledger.reserve(_uuid(), account, 0.0013)


def test_commit_replaces_the_reservation_and_release_frees_it(make: Any) -> None:
    ledger = make(runware_daily_budget_usd=0.003)
    first, second = _uuid(), _uuid()
    ledger.reserve(first, "a", 0.0013)
    ledger.reserve(second, "a", 0.0013)
    with pytest.raises(BudgetExceeded):
        ledger.reserve(_uuid(), "a", 0.0013)
    ledger.release(second)  # the call failed and was not billed
    ledger.commit(first, "a", 0.0010)  # the real cost was lower than the estimate
    ledger.reserve(_uuid(), "a", 0.0013)  # 0.0010 + 0.0013 fits under 0.003
    with pytest.raises(BudgetExceeded):
        ledger.reserve(_uuid(), "a", 0.0013)


def test_reserving_twice_for_one_task_counts_once(make: Any) -> None:
    ledger = make(runware_daily_budget_usd=0.002)
    task = _uuid()
    assert ledger.reserve(task, "a", 0.0013) is True
    assert ledger.reserve(task, "a", 0.0013) is True  # a retry of the same task
    ledger.commit(task, "a", 0.0013)
    assert ledger.reserve(task, "a", 0.0013) is False  # already billed: nothing to reserve


def test_a_dead_tasks_reservation_expires(make: Any) -> None:
    ledger = make(runware_daily_budget_usd=0.0013, runware_reservation_s=0.3)
    ledger.reserve(_uuid(), "a", 0.0013)  # its task dies and never commits
    with pytest.raises(BudgetExceeded):
        ledger.reserve(_uuid(), "a", 0.0013)
    time.sleep(0.35)
    ledger.reserve(_uuid(), "a", 0.0013)


def test_a_zero_budget_admits_nothing(make: Any) -> None:
    ledger = make(runware_daily_budget_usd=0)
    with pytest.raises(BudgetExceeded, match=r"\$0.000000"):
        ledger.reserve(_uuid(), "a", 0.0013)


def test_hundreds_of_expired_reservations_hold_back_no_budget(redis_server: RedisServer) -> None:
    """240 reservations of a crashed 200-thread worker expire: the next job that fits the
    budget runs (a purge of at most 100 per script left $0.29 of them reserved), and no
    account keeps a zeroed field in the reserved sums."""
    client = redis.Redis.from_url(redis_server.url(61))
    prefix = f"l{next(_prefixes)}"
    crashed = Ledger(
        client, load_settings(_env_file=None, key_prefix=prefix, runware_reservation_s=0.2)
    )
    for n in range(240):
        assert crashed.reserve(_uuid(), f"team-{n % 3}", 0.0021)
    time.sleep(0.3)  # the worker died: its reservations expire
    budgeted = Ledger(
        client,
        load_settings(_env_file=None, key_prefix=prefix, runware_daily_budget_usd=0.5),
    )
    assert budgeted.reserve(_uuid(), "team-x", 0.3)  # $0.504 expired, $0.3 needed of $0.5
    sums = client.hgetall(f"{prefix}:ledger:resv:sum")
    assert sums == {b"total": b"300000", b"acct:team-x": b"300000"}
    client.close()
