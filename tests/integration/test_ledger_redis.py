"""The ledger's scripts against a real Redis (no worker): the calls' start and end as the tasks
make them, once-only billing, budgets, learned estimates and unsettled calls."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from config.settings import load_settings
from tasks import ledger as ledger_module
from tasks.errors import BudgetExceeded, TransientError
from tasks.ledger import Ledger, call_shape
from workers.sandbox.services import RedisServer

_prefixes = itertools.count()
SHAPE = call_shape({"taskType": "promptEnhance", "model": "m", "promptVersions": 1})
ITEMS = [{"taskType": "promptEnhance", "text": "a fox, cinematic", "cost": 0.0013}]


@pytest.fixture
def make(redis_server: RedisServer) -> Iterator[Any]:
    clients: list[redis.Redis] = []
    prefix = f"l{next(_prefixes)}"

    def build(unchecked: dict[str, Any] | None = None, **settings: Any) -> Ledger:
        client = redis.Redis.from_url(redis_server.url(61))
        clients.append(client)
        loaded = load_settings(_env_file=None, key_prefix=prefix, **settings)
        # (`unchecked`: values the settings check would refuse, to make time pass quickly)
        return Ledger(client, loaded.model_copy(update=unchecked or {}))

    yield build
    for client in clients:
        client.close()


def _uuid() -> str:
    return str(uuid.uuid4())


def _call(ledger: Ledger, account: str = "a", estimate: float = 0.0013, shape: str = SHAPE) -> str:
    """One call's start and end at `estimate`, as a task makes it; its taskUUID."""
    task = _uuid()
    ledger.begin(task, account, estimate, shape)
    ledger.end(task, account, estimate, ITEMS, shape)
    return task


# How versions before 2026-12 made a billed-once marker's field, in the ledger's Lua: markers
# they wrote must be found by the field tasks/ledger.py makes now (a rolling upgrade, and the
# 8 days a marker is kept).
EARLIER_MARKER_FIELD = """
local UUID_FORM = '^' .. string.rep('%x', 8) .. '%-' .. string.rep('%x', 4) .. '%-'
  .. string.rep('%x', 4) .. '%-' .. string.rep('%x', 4) .. '%-' .. string.rep('%x', 12) .. '$'
local task_uuid = ARGV[1]
if not string.find(task_uuid, UUID_FORM) then return task_uuid end
return (string.gsub(string.gsub(string.lower(task_uuid), '%-', ''), '%x%x', function(pair)
  return string.char(tonumber(pair, 16))
end))
"""


@pytest.mark.parametrize(
    "task_uuid",
    [
        "6f1c2a3e-0b9d-4c1e-8f2a-9d3b7c6e5a41",
        "6F1C2A3E-0B9D-4C1E-8F2A-9D3B7C6E5A41",
        "6f1c2a3e0b9d4c1e8f2a9d3b7c6e5a41",  # no dashes: not the UUID form, kept as it is
        "{6f1c2a3e-0b9d-4c1e-8f2a-9d3b7c6e5a41}",
        "6f1c2a3e-0b9d-4c1e-8f2a-9d3b7c6e5a41\n",
        "6f1c2a3e-0b9d-4c1e-8f2a-9d3b7c6e5a4g",
        "job-42",
    ],
)
def test_a_marker_field_is_the_one_earlier_versions_wrote(
    redis_server: RedisServer, task_uuid: str
) -> None:
    client = redis.Redis.from_url(redis_server.url(61))
    try:
        earlier = client.eval(EARLIER_MARKER_FIELD, 0, task_uuid)
    finally:
        client.close()
    assert ledger_module.marker_field(task_uuid) == earlier
    if task_uuid[0] == "6" and len(task_uuid) == 36 and "g" not in task_uuid:
        assert len(earlier) == 16  # the UUID's 16 bytes, not its 36 characters


def test_a_call_is_billed_once_and_its_items_come_back(make: Any) -> None:
    ledger = make()
    task = _uuid()
    started = ledger.begin(task, "acme", 0.0039, SHAPE)
    assert started.finished is None
    assert started.submitted is None
    assert not started.alone
    assert ledger.end(task, "acme", 0.0013 * 3, ITEMS, SHAPE) is True
    assert ledger.end(task, "acme", 0.0013 * 3, ITEMS, SHAPE) is False  # a redelivery
    again = ledger.begin(task, "acme", 0.0039, SHAPE)  # a resent job: no call, same items
    assert again.finished == ITEMS
    _call(ledger, "other")
    totals = ledger.day()
    assert (totals.total_micro, totals.tasks) == (3900 + 1300, 2)
    assert totals.by_account_micro == {"acme": 3900, "other": 1300}
    record = ledger.redis.get(ledger.keys.record(task))
    assert record is not None
    assert record.startswith(b"3900|")
    assert ledger.holdings().as_json()["reserved_calls"] == 0


def test_many_small_costs_add_up_exactly(make: Any) -> None:
    ledger = make()
    for _ in range(1000):
        _call(ledger)
    assert ledger.day().total_micro == 1_300_000
    assert ledger.day().as_json()["total_usd"] == 1.3


def test_the_fleet_budget_admits_exactly_what_fits(make: Any) -> None:
    ledger = make(runware_daily_budget_usd=0.01)
    outcomes = []
    for _ in range(20):
        try:
            ledger.begin(_uuid(), "a", 0.0013, SHAPE)
            outcomes.append("ok")
        except BudgetExceeded as exc:
            outcomes.append(str(exc))
    assert outcomes.count("ok") == 7
    refused = [o for o in outcomes if o != "ok"]
    assert "RUNWARE_DAILY_BUDGET_USD of $0.010000" in refused[0]
    assert "$0.009100 already spent or reserved" in refused[0]


def test_the_account_budget_is_per_account(make: Any) -> None:
    ledger = make(runware_account_daily_budget_usd=0.003)
    for account in ("a", "b"):
        ledger.begin(_uuid(), account, 0.0013, SHAPE)
        ledger.begin(_uuid(), account, 0.0013, SHAPE)
        with pytest.raises(BudgetExceeded, match=f"account '{account}'"):
            ledger.begin(_uuid(), account, 0.0013, SHAPE)


def test_the_real_cost_replaces_the_reservation_and_release_frees_it(make: Any) -> None:
    ledger = make(runware_daily_budget_usd=0.003)
    first, second = _uuid(), _uuid()
    ledger.begin(first, "a", 0.0013, "s1")
    ledger.begin(second, "a", 0.0013, "s2")
    with pytest.raises(BudgetExceeded):
        ledger.begin(_uuid(), "a", 0.0013, "s3")
    assert ledger.release(second) is True  # Runware refused the call: not billed
    ledger.end(first, "a", 0.0010, ITEMS)  # the real cost was lower than the estimate
    ledger.begin(_uuid(), "a", 0.0013, "s3")  # 0.0010 + 0.0013 fits under 0.003
    with pytest.raises(BudgetExceeded):
        ledger.begin(_uuid(), "a", 0.0013, "s4")


def test_a_job_never_refuses_itself(make: Any) -> None:
    """A retry, poll or redelivery of a call takes up its own reservation: it is not checked
    against the budget again (a budget that fits exactly one call lets it come back)."""
    ledger = make(runware_daily_budget_usd=0.0013)
    task = _uuid()
    ledger.begin(task, "a", 0.0013, SHAPE)
    for _ in range(3):
        assert ledger.begin(task, "a", 0.0013, SHAPE).estimate_micro == 1300
    ledger.give_up(task)  # even unsettled, it is its own
    assert ledger.begin(task, "a", 0.0013, SHAPE).estimate_micro == 1300
    ledger.end(task, "a", 0.0013, ITEMS)
    assert ledger.begin(task, "a", 0.0013, SHAPE).finished == ITEMS


def test_a_zero_budget_admits_nothing(make: Any) -> None:
    ledger = make(runware_daily_budget_usd=0)
    with pytest.raises(BudgetExceeded, match=r"\$0.000000"):
        ledger.begin(_uuid(), "a", 0.0013, SHAPE)


def test_the_estimate_learns_the_highest_real_cost_of_its_shape(make: Any) -> None:
    ledger = make()
    big = call_shape({"taskType": "imageInference", "model": "m", "width": 1024, "height": 1024})
    small = call_shape({"taskType": "imageInference", "model": "m", "width": 512, "height": 512})
    assert ledger.begin(_uuid(), "a", 0.0005, big).estimate_micro == 500  # nothing seen yet
    task = _uuid()
    ledger.begin(task, "a", 0.0005, big)
    ledger.end(task, "a", 0.0019, ITEMS, big)
    assert ledger.begin(_uuid(), "a", 0.0005, big).estimate_micro == 1900
    assert ledger.begin(_uuid(), "a", 0.0005, small).estimate_micro == 500  # another shape
    task = _uuid()
    ledger.begin(task, "a", 0.0005, big)
    ledger.end(task, "a", 0.0010, ITEMS, big)  # a cheaper answer does not lower it
    assert ledger.estimates() == {big: 0.0019}
    assert ledger.begin(_uuid(), "a", 0.0030, big).estimate_micro == 3000  # configured higher


def test_an_unsettled_call_is_claimed_once_and_settled_on_its_day(make: Any) -> None:
    ledger = make()
    task = _uuid()
    ledger.begin(task, "acme", 0.0013, SHAPE)
    assert ledger.claim_due(60.0) == []  # its job is still following it
    ledger.give_up(task)  # e.g. TaskTimeout
    held = ledger.holdings().as_json()
    assert (held["unsettled_calls"], held["unsettled_usd"]) == (1, 0.0013)
    assert held["reserved_calls"] == 0
    claimed = ledger.claim_due(60.0)
    assert [r.task_uuid for r in claimed] == [task]
    assert claimed[0].account == "acme"
    assert claimed[0].shape == SHAPE
    assert ledger.claim_due(60.0) == []  # its check is under way: no one takes it again
    held = ledger.holdings().as_json()  # and it is still unsettled meanwhile
    assert (held["unsettled_calls"], held["reserved_calls"]) == (1, 0)
    ledger.checked(task)  # the check said "still running"
    assert [r.task_uuid for r in ledger.claim_due(60.0)] == [task]
    assert ledger.end(task, "acme", 0.0026, ITEMS) is True  # what getResponse said it cost
    assert ledger.day().by_account_micro == {"acme": 2600}
    assert ledger.holdings().as_json()["unsettled_calls"] == 0


def test_a_claimed_reservation_taken_up_again_is_not_released(make: Any) -> None:
    """The reconciler found no call at Runware, but the job ran again meanwhile (and may be
    sending it now): the reservation stays."""
    ledger = make()
    task = _uuid()
    ledger.begin(task, "a", 0.0013, SHAPE)
    ledger.give_up(task)
    (claimed,) = ledger.claim_due(60.0)
    ledger.begin(task, "a", 0.0013, SHAPE)  # the job's own retry
    assert ledger.release(task, claimed.due) is False
    ledger.give_up(task)
    ledger.checked(task)
    (claimed,) = ledger.claim_due(0.0)  # its check may take no time at all
    time.sleep(0.01)
    later = ledger.claim_due(60.0)  # so it is taken for lost: claimed again
    assert [r.task_uuid for r in later] == [task]
    assert ledger.release(task, claimed.due) is True  # the first claim's check may release it


def test_hundreds_of_unsettled_reservations_wait_for_reconciliation_not_refuse(
    make: Any, redis_server: RedisServer
) -> None:
    """240 reservations of a crashed 200-thread worker: a call that fits the budget once they
    are reconciled is told to wait (a retry), not refused for good; once they are released it
    fits, and no account keeps a zeroed field in the reserved sums."""
    crashed = make()
    tasks = [_uuid() for _ in range(240)]
    for n, task in enumerate(tasks):
        crashed.begin(task, f"team-{n % 3}", 0.0021, SHAPE)
        crashed.give_up(task)
    budgeted = make(runware_daily_budget_usd=0.5, runware_reconcile_s=7.0)
    # $0.504 unsettled, $0.3 needed of $0.5: the sum stops once it is enough ($0.3045)
    with pytest.raises(TransientError, match=r"at least \$0.304500 is unsettled") as refused:
        budgeted.begin(_uuid(), "team-x", 0.3, "big")
    assert refused.value.code == "budgetUnsettled"
    assert refused.value.retry_after == 7.0
    claimed = budgeted.claim_due(60.0, limit=500)
    assert len(claimed) == 240
    for reservation in claimed:  # Runware never had them
        assert budgeted.release(reservation.task_uuid, reservation.due)
    budgeted.begin(_uuid(), "team-x", 0.3, "big")
    client = redis.Redis.from_url(redis_server.url(61))
    sums = client.hgetall(budgeted.keys.reserved_sums)
    assert sums == {b"total": b"300000", b"acct:team-x": b"300000"}
    client.close()


def test_an_accounts_refusal_is_not_guessed_from_other_accounts_unsettled_calls(
    make: Any,
) -> None:
    """A refusal reads at most 1,000 unsettled reservations. Past that the fleet's budget may
    still fit once they settle (it waits), but an account's cannot be guessed from the
    others': an account over its own budget is refused for good, whatever is unsettled."""
    crashed = make()
    with crashed.redis.pipeline(transaction=False):
        for _ in range(1001):
            task = _uuid()
            crashed.begin(task, "other", 0.0001, SHAPE)
            crashed.give_up(task)
    ledger = make(runware_account_daily_budget_usd=0.002)
    _call(ledger, "a")  # a: 0.0013 of its 0.002
    with pytest.raises(BudgetExceeded):
        ledger.begin(_uuid(), "a", 0.0013, SHAPE)
    # The fleet: 0.1001 unsettled and 0.0013 spent of 0.102; more than 1,000 unsettled to
    # read, so the call waits for them to settle instead of failing.
    fleet = make(runware_daily_budget_usd=0.102)
    with pytest.raises(TransientError, match="at least"):
        fleet.begin(_uuid(), "b", 0.0013, SHAPE)


def test_a_reservation_not_taken_up_becomes_due_after_the_reservation_time(make: Any) -> None:
    ledger = make(unchecked={"runware_reservation_s": 0.4})
    task = _uuid()
    ledger.begin(task, "a", 0.0013, SHAPE)
    assert ledger.claim_due(1.0) == []
    assert ledger.holdings().as_json()["reserved_calls"] == 1
    time.sleep(0.45)
    assert [r.task_uuid for r in ledger.claim_due(1.0)] == [task]


def test_a_budget_refusal_that_unsettled_money_does_not_explain_is_final(make: Any) -> None:
    ledger = make(runware_daily_budget_usd=0.003)
    _call(ledger)
    _call(ledger)
    task = _uuid()
    ledger.begin(task, "a", 0.0002, "x")
    ledger.give_up(task)
    with pytest.raises(BudgetExceeded):  # 0.0026 spent: 0.0013 cannot fit, settled or not
        ledger.begin(_uuid(), "a", 0.0013, SHAPE)


def test_the_calls_of_a_worker_that_stopped_heartbeating_are_unsettled_at_once(
    make: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = make()
    monkeypatch.setattr(ledger_module, "_holder", ["host:1:dead"])
    task = _uuid()
    ledger.begin(task, "a", 0.0013, SHAPE)
    assert ledger.claim_due(60.0, alive=["host:1:dead"]) == []  # its worker is alive
    assert ledger.claim_due(60.0) == []  # who is alive is not known: wait for the time
    (claimed,) = ledger.claim_due(60.0, alive=["host:2:heir"])
    assert claimed.task_uuid == task
    # The job comes back on the heir: the call is its again, and no longer unsettled.
    monkeypatch.setattr(ledger_module, "_holder", ["host:2:heir"])
    ledger.begin(task, "a", 0.0013, SHAPE)
    ledger.checked(task)
    assert ledger.claim_due(60.0, alive=["host:2:heir"]) == []
    assert ledger.holdings().as_json()["reserved_calls"] == 1
    # The holder index the claim reads instead of every reservation: the dead one's is gone,
    # the heir's holds the call until it ends.
    index = ledger.keys.reservations
    assert ledger.redis.smembers(f"{index}:holders") == {b"host:2:heir"}
    assert ledger.redis.smembers(f"{index}:by:host:2:heir") == {task.encode()}
    ledger.end(task, "a", 0.0013, ITEMS, SHAPE)
    assert not ledger.redis.exists(f"{index}:holders", f"{index}:by:host:2:heir")


def test_a_scrape_decodes_at_most_a_thousand_unsettled_calls(
    make: Any, redis_server: RedisServer
) -> None:
    """After an outage: 1,500 unsettled calls. The metrics' script counts all of them, decodes
    the 1,000 that fell due first (their accounts' sums), and counts the rest at their mean."""
    from tasks import scripts

    ledger = make()
    for n in range(1500):
        task = _uuid()
        # The first 1,000 of team-0 at $0.002, then 500 of team-1 at $0.001.
        ledger.begin(task, "team-0" if n < 1000 else "team-1", 0.002 if n < 1000 else 0.001, SHAPE)
        ledger.give_up(task)
    client = redis.Redis.from_url(redis_server.url(61))
    keys = ledger.keys
    reply = scripts.run(
        scripts.register(client, "money_gauges"),
        [
            keys.day("2000-01-01"),
            keys.reservations,
            keys.reservations_due,
            keys.reserved_sums,
            keys.dead_letters,
        ],
        [],
    )
    client.close()
    unsettled = dict(zip(reply[4][::2], reply[4][1::2], strict=True))
    assert int(reply[1]) == 1500
    assert unsettled == {b"total": 3_000_000, b"acct:team-0": 2_000_000}


def test_a_call_that_ends_after_midnight_is_booked_on_the_day_it_started(
    make: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's promise: a cost goes on the UTC day its call started. A call reserved at
    23:59:59 and ended at 00:00:01 is in the first day's totals, and the next day starts
    empty (the clock the ledger reads, time.time, is moved; Redis is real)."""
    ledger = make()
    midnight = 1_796_342_400.0  # 2026-12-04T00:00:00Z
    task = _uuid()
    monkeypatch.setattr(ledger_module.time, "time", lambda: midnight - 1)
    ledger.begin(task, "acme", 0.0013, SHAPE)
    monkeypatch.setattr(ledger_module.time, "time", lambda: midnight + 1)
    assert ledger.end(task, "acme", 0.0026, ITEMS, SHAPE) is True
    before, after = ledger.day("2026-12-03"), ledger.day("2026-12-04")
    assert (before.total_micro, before.tasks, before.by_account_micro) == (2600, 1, {"acme": 2600})
    assert (after.total_micro, after.tasks) == (0, 0)
    assert ledger.day().day == "2026-12-04"  # "today" is the new day
