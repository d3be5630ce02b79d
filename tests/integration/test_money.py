"""Every dollar Runware bills is in the ledger, and a budget is passed by at most one wave of
under-estimated calls: real workers, a real Redis and the sandbox (which bills as Runware does)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
import redis

from config.settings import load_settings
from tasks.ledger import Ledger, call_shape
from tests.conftest import FAST_REDELIVERY, StartWorker, run_cli, wait_until
from tests.load.common import ledger_micro, max_in_window
from workers.sandbox import Sandbox

pytestmark = pytest.mark.slow  # real worker processes, seconds each: `-m 'not slow'` skips them

PRICE = 1300  # the sandbox's micro-dollars per enhanced version
# Quick reconciliation: a call no job follows is checked within about 2 s.
RECONCILE = {
    **FAST_REDELIVERY,
    "RUNWARE_RECONCILE_S": "2",
    "RUNWARE_RETRY_AFTER_MAX_S": "2",
    "RUNWARE_POLL_MAX_INTERVAL_S": "1",
    "RUNWARE_RESERVATION_S": "15",
}


def _outcomes(results: list[Any], timeout: float = 120) -> list[dict[str, Any] | str]:
    """Each job's result, or the name and message of the error it failed with."""
    deadline = time.monotonic() + timeout
    found: list[dict[str, Any] | str] = []
    for result in results:
        try:
            found.append(result.get(timeout=max(1.0, deadline - time.monotonic())))
        except Exception as exc:
            found.append(f"{type(exc).__name__}: {exc}")
    return found


def test_a_killed_workers_billed_calls_reach_the_ledger_exactly_once(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    """Runware accepts (bills) 6 calls and holds them for 4 s; the worker is SIGKILLed and a new
    one starts. The dead worker's heartbeat lapses (6 s), so the new worker's reconciler settles
    its calls with getResponse within a period of their end, long before the jobs come back
    (visibility timeout 30 s); then each job finds its result recorded and makes no call. The
    budget fits the 6 calls exactly: a job refused by its own reservation would fail."""
    jobs = 6
    env = {
        **RECONCILE,
        "CELERY_VISIBILITY_TIMEOUT_S": "30",
        "RUNWARE_RESERVATION_S": "40",
        "RUNWARE_TIMEOUT_S": "7",
        "RUNWARE_DAILY_BUDGET_USD": f"{jobs * 0.0013}",
    }
    sandbox.configure(rate_hang=1.0, hang_s=4.0)
    doomed = start_worker("doomed", **env)
    results = [doomed.send(prompt=f"held {n}") for n in range(jobs)]
    wait_until(lambda: len(sandbox.state.accepted) == jobs, 30, "all calls accepted")
    doomed.process.kill()
    sandbox.configure(rate_hang=0.0)
    heir = start_worker("heir", same_db_as=doomed, **env)
    billed = sandbox.state.billed_micro
    assert billed == jobs * PRICE
    # The calls end 4 s after they arrived; the heartbeat lapses 6 s after the kill; then one
    # reconciliation period (2 s) and the checks' own round trips.
    wait_until(lambda: ledger_micro(heir.redis_url) == billed, 60, "ledger == bill")
    # Settled by reconciliation (the heir's log says so), not by the jobs' redelivery.
    assert heir.process.log().count("Unsettled call ") >= 1
    assert " settled: cost=$" in heir.process.log()
    outcomes = _outcomes(results)
    assert all(isinstance(o, dict) for o in outcomes), outcomes
    assert set(sandbox.state.accepted) == {o["taskUUID"] for o in outcomes}  # type: ignore[index]
    assert sandbox.state.by_type.get("promptEnhance") == jobs  # none sent again
    assert ledger_micro(heir.redis_url) == billed
    report = json.loads(run_cli(heir.redis_url, "cost", "--json", check=True).stdout)
    assert report["unsettled_calls"] == 0
    assert report["reserved_calls"] == 0


def test_calls_their_jobs_gave_up_on_are_settled_by_the_reconciler(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    """No retries and a sandbox that bills, then answers after the read timeout: every job fails,
    yet Runware billed each call. The calls are unsettled (counted at their estimate), and the
    reconciler records their real cost within about one period. Their reservations would
    only fall due by age after 300 s: the job giving up is what hands them to the reconciler
    (the generous wait below cannot race that)."""
    jobs = 4
    sandbox.configure(rate_hang=1.0, hang_s=2.5)
    env = {**RECONCILE, "RUNWARE_RESERVATION_S": "300"}
    worker = start_worker("giveup", **env, RUNWARE_MAX_RETRIES="0", RUNWARE_TIMEOUT_S="1")
    outcomes = _outcomes([worker.send(prompt=f"lost {n}", promptVersions=2) for n in range(jobs)])
    assert all(isinstance(o, str) and "TransientError" in o for o in outcomes), outcomes
    sandbox.configure(rate_hang=0.0)  # (or the reconciler's polls would time out too)
    billed = sandbox.state.billed_micro
    assert billed == jobs * 2 * PRICE
    wait_until(lambda: ledger_micro(worker.redis_url) == billed, 60, "settled")
    report = json.loads(run_cli(worker.redis_url, "cost", "--json", check=True).stdout)
    assert report["unsettled_calls"] == 0
    assert round(report["total_usd"] * 1_000_000) == billed
    # Asked again, nothing is recorded twice.
    again = json.loads(run_cli(worker.redis_url, "reconcile", "--json", check=True).stdout)
    assert again["checked"] == 0
    assert ledger_micro(worker.redis_url) == billed


def test_reconcile_on_the_command_line_settles_what_it_can_now(
    start_worker: StartWorker, sandbox: Sandbox, redis_server: Any
) -> None:
    """Two unsettled calls: one Runware finished (and billed), one it never received.
    `enhance-worker reconcile --json` records the first and releases the second."""
    worker = start_worker("cli", RUNWARE_MAX_RETRIES="0")
    done = worker.send(prompt="a fox").get(timeout=30)
    billed = sandbox.state.billed_micro
    # Forget that the call ended, as if its worker had died before recording it.
    client = redis.Redis.from_url(worker.redis_url)
    client.delete(f"enhance:ledger:task:{done['taskUUID']}")
    for pattern in ("enhance:ledger:day:*", "enhance:ledger:billed:*"):
        for key in client.scan_iter(pattern):
            client.delete(key)
    ledger = Ledger(client, load_settings(_env_file=None))
    shape = call_shape({"taskType": "promptEnhance", "model": "m"})
    never_sent = str(uuid.uuid4())
    for task in (done["taskUUID"], never_sent):
        ledger.begin(task, "default", 0.0013, shape)
        ledger.give_up(task)
    before = json.loads(run_cli(worker.redis_url, "cost", "--json", check=True).stdout)
    assert (before["unsettled_calls"], before["unsettled_usd"]) == (2, 0.0026)
    summary = json.loads(run_cli(worker.redis_url, "reconcile", "--json", check=True).stdout)
    assert summary["checked"] == 2
    assert (summary["settled"], summary["released"]) == (1, 1)
    assert round(summary["settled_usd"] * 1_000_000) == billed
    after = json.loads(run_cli(worker.redis_url, "cost", "--json", check=True).stdout)
    assert after["unsettled_calls"] == 0
    assert round(after["total_usd"] * 1_000_000) == billed
    client.close()


def test_hundreds_of_unsettled_reservations_do_not_refuse_a_job_that_fits(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    """240 reservations of a crashed 200-thread worker whose calls never reached Runware hold
    $0.504 of a $0.5 budget: the next job waits for their reconciliation, then runs."""
    worker = start_worker("crashed", **RECONCILE, RUNWARE_DAILY_BUDGET_USD="0.5")
    client = redis.Redis.from_url(worker.redis_url)
    crashed = Ledger(client, load_settings(_env_file=None))
    for n in range(240):
        task = str(uuid.uuid4())
        crashed.begin(task, f"team-{n % 3}", 0.0021, "promptEnhance m")
        crashed.give_up(task)
    result = worker.send(prompt="fits once they are settled").get(timeout=60)
    assert result["cost"] == 0.0013
    assert sandbox.state.billed_micro == PRICE
    drained = lambda: client.hgetall("enhance:ledger:resv:sum") == {}  # noqa: E731
    wait_until(drained, 30, "every reservation released, no zeroed field left")
    client.close()


def _overshoot_wave(
    worker: Any, sandbox: Sandbox, account: str, jobs: int, task: str, kwargs: list[dict[str, Any]]
) -> tuple[int, int]:
    """`jobs` calls for `account`; (micro-dollars the sandbox billed for them, jobs refused)."""
    before = sandbox.state.billed_micro
    results = [
        worker.app.send_task(task, kwargs={**kwargs[n % len(kwargs)], "account": account})
        for n in range(jobs)
    ]
    outcomes = _outcomes(results)
    refused = [o for o in outcomes if isinstance(o, str)]
    assert all("BudgetExceeded" in o for o in refused), refused
    return sandbox.state.billed_micro - before, len(refused)


@pytest.mark.parametrize(
    ("task", "kwargs", "estimate", "real"),
    [
        ("tasks.enhance_prompt", [{"prompt": "a fox"}], "RUNWARE_ENHANCE_COST_USD", [1300]),
        (
            "tasks.generate_image",
            [
                {"positivePrompt": "a fox", "model": "runware:101@1", "width": 512, "height": 512},
                {"positivePrompt": "a fox", "model": "runware:101@1"},  # 1024x1024
            ],
            "RUNWARE_IMAGE_COST_USD",
            [475, 1900],
        ),
    ],
    ids=["enhance", "image-two-sizes"],
)
def test_a_budget_is_passed_by_at_most_one_wave_of_under_estimates(
    start_worker: StartWorker,
    sandbox: Sandbox,
    task: str,
    kwargs: list[dict[str, Any]],
    estimate: str,
    real: list[int],
) -> None:
    """Estimates below the real price ($0.0005 and $0.0002 against $0.0013, $0.000475 and
    $0.0019), a $0.02 budget per account, 40 jobs through 4 threads: the bill passes the budget
    by at most 4 x (real - estimate). A second account, after the first answers taught the
    estimates, is not passed at all."""
    budget, threads = 20_000, 4
    low = 500 if estimate == "RUNWARE_ENHANCE_COST_USD" else 200
    worker = start_worker(
        "budget",
        WORKER_CONCURRENCY=str(threads),
        RUNWARE_ACCOUNT_DAILY_BUDGET_USD=f"{budget / 1e6}",
        **{estimate: f"{low / 1e6}"},
    )
    first, refused = _overshoot_wave(
        worker, sandbox, f"first-{uuid.uuid4().hex[:6]}", 40, task, kwargs
    )
    bound = threads * (max(real) - low)
    assert refused > 0
    assert budget < first <= budget + bound or first <= budget
    second, refused = _overshoot_wave(
        worker, sandbox, f"second-{uuid.uuid4().hex[:6]}", 40, task, kwargs
    )
    assert refused > 0
    assert second <= budget
    assert ledger_micro(worker.redis_url) == sandbox.state.billed_micro


def test_a_shared_request_refused_without_a_task_stays_within_the_limit(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    """At 5 calls/s, with requests shared by several tasks, a shared request is refused with
    a 400 that names no task: each of its tasks goes again alone in a slot of its own, the API
    never sees more than 5 requests in a second, and each job ends with its own result."""
    worker = start_worker(
        "unattributed",
        WORKER_CONCURRENCY="5",
        RUNWARE_RATE_LIMIT="5",
        RUNWARE_BATCH_WINDOW_MS="1000",
        RUNWARE_TIMEOUT_S="10",
    )
    # Calls of 1 s paced 200 ms apart overlap, so the process is under load and holds each
    # request open for the next grants: from the second request on, requests are shared (a
    # lone call goes alone, and a 400 for it would be its own).
    sandbox.configure(fail_next=["none", "400-unnamed"], latency_s=1.0)
    outcomes = _outcomes([worker.send(prompt=f"shared {n}") for n in range(20)])
    assert all(isinstance(o, dict) for o in outcomes), outcomes
    assert sandbox.state.statuses.get("400") == 1
    assert len(sandbox.state.request_log[1][2]) > 1  # the refused request was a shared one
    assert sandbox.state.tasks_received > sandbox.state.requests  # requests were shared
    # (a window of 0.95 s: 50 ms for the scheduling jitter of requests paced 200 ms apart)
    assert max_in_window(sandbox.state.call_times, 0.95) <= 5
    assert set(sandbox.state.accepted) == {o["taskUUID"] for o in outcomes}  # type: ignore[index]


def test_an_answer_without_text_fails_once_and_is_billed(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    """Runware answered (and billed) the taskUUID without text: asking again could only bring
    the same answer, so the job fails at once, naming it, and the ledger has the cost."""
    worker = start_worker("empty")
    sandbox.configure(fail_next=["empty"])
    (outcome,) = _outcomes([worker.send(prompt="a fox")])
    assert isinstance(outcome, str)
    assert "PermanentError" in outcome
    assert "without any enhanced text" in outcome
    assert sandbox.state.requests == 1
    assert ledger_micro(worker.redis_url) == sandbox.state.billed_micro == PRICE


def test_a_resend_gets_the_items_and_is_counted_once_before_and_after_they_go(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    """A finished call's items are kept RUNWARE_ITEMS_RETENTION_S: a job resent with the same
    taskUUID meanwhile gets them without a call. Its billed-once marker, a hash field, lasts
    RUNWARE_BILLED_RETENTION_S: a resend after the items went is answered by Runware (409, then
    getResponse) with the same result, and the ledger still counts the cost once."""
    worker = start_worker("record", RUNWARE_ITEMS_RETENTION_S="700")
    task_uuid = str(uuid.uuid4())
    first = worker.send(prompt="a fox", taskUUID=task_uuid).get(timeout=30)
    client = redis.Redis.from_url(worker.redis_url)
    keys = [k.decode() for k in client.scan_iter(f"*{task_uuid}*")]
    assert keys == [f"enhance:ledger:task:{task_uuid}"]  # the items: the only key of its own
    assert 600 < client.ttl(keys[0]) <= 700
    marker = uuid.UUID(task_uuid).bytes  # the field: the UUID's 16 bytes
    buckets = [k for k in client.scan_iter("enhance:ledger:billed:*") if client.hexists(k, marker)]
    assert len(buckets) == 1
    assert client.ttl(buckets[0]) >= 8 * 86_400
    again = worker.send(prompt="a fox", taskUUID=task_uuid).get(timeout=30)
    assert again["text"] == first["text"]
    assert sandbox.state.requests == 1  # the items came back: no call
    client.delete(keys[0])  # as when RUNWARE_ITEMS_RETENTION_S has passed
    late = worker.send(prompt="a fox", taskUUID=task_uuid).get(timeout=30)
    client.close()
    assert late["text"] == first["text"]
    assert sandbox.state.requests > 1  # Runware was asked again, and answered with the result
    assert sandbox.state.accepted == {task_uuid: 1}
    assert ledger_micro(worker.redis_url) == sandbox.state.billed_micro == PRICE


def test_a_check_refused_for_the_key_keeps_the_call_unsettled(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    """A refusal about the key or the account says nothing of the call: it stays unsettled
    (held at its estimate) rather than being released as never billed."""
    worker = start_worker("nokey", RUNWARE_API_KEY="")
    client = redis.Redis.from_url(worker.redis_url)
    ledger = Ledger(client, load_settings(_env_file=None))
    task = str(uuid.uuid4())
    ledger.begin(task, "default", 0.0013, "promptEnhance m")
    ledger.give_up(task)
    summary = json.loads(run_cli(worker.redis_url, "reconcile", "--json", check=True).stdout)
    assert (summary["checked"], summary["unknown"], summary["released"]) == (1, 1, 0)
    report = json.loads(run_cli(worker.redis_url, "cost", "--json", check=True).stdout)
    assert report["unsettled_calls"] == 1
    client.close()


def test_a_refusal_that_waits_only_on_reconciliation_spends_no_retries(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    """A job the budget refuses only because unsettled calls hold it waits for their
    reconciliation (re-scheduled, its retries untouched: here it has none), and runs once they
    are settled; past RUNWARE_BUDGET_WAIT_MAX_S such a refusal counts as a retry again."""
    worker = start_worker(
        "budget-wait",
        RUNWARE_DAILY_BUDGET_USD="0.003",
        RUNWARE_MAX_RETRIES="0",
        RUNWARE_BUDGET_WAIT_MAX_S="4",
    )
    client = redis.Redis.from_url(worker.redis_url)
    crashed = Ledger(client, load_settings(_env_file=None))
    held = str(uuid.uuid4())
    crashed.begin(held, "team", 0.0025, "promptEnhance m")
    crashed.give_up(held)  # unsettled: $0.0025 of $0.003 held until reconciled
    waiting = worker.send(prompt="fits once the call is settled")
    wait_until(
        lambda: "waits for unsettled calls to be reconciled" in worker.process.log(), 20, "a wait"
    )
    assert crashed.release(held)  # reconciled: Runware never had it
    assert waiting.get(timeout=30)["cost"] == 0.0013  # type: ignore[attr-defined]
    assert "gave up" not in worker.process.log()
    # A call that stays unsettled: the job waits 4 s, then fails with its retries spent.
    held = str(uuid.uuid4())
    crashed.begin(held, "team", 0.0025, "promptEnhance m")
    crashed.give_up(held)
    started = time.monotonic()
    with pytest.raises(Exception, match="gave up after 0 retries"):
        worker.send(prompt="never fits").get(timeout=30)  # type: ignore[attr-defined]
    assert time.monotonic() - started >= 3.5
    client.close()


def test_budgets_of_accounts_set_at_run_time_hold_each_account_without_a_restart(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    """Two accounts spend, then get daily budgets of their own while the worker runs: each
    stops at its own (one call of $0.0013 more for one, three for the other), `cost --json`
    shows each budget, what is spent and what is left, and a budget cleared lets the account
    spend again. No restart."""
    worker = start_worker("budgets")

    def run(account: str) -> str:
        try:
            worker.send(prompt=f"a lake for {account}", account=account).get(timeout=30)  # type: ignore[attr-defined]
        except Exception as exc:
            return str(exc)
        return "done"

    assert [run(a) for a in ("acct-a", "acct-a", "acct-b", "acct-b")] == ["done"] * 4
    run_cli(worker.redis_url, "limits", "set", "acct-a", "--daily-budget", "0.004", check=True)
    run_cli(worker.redis_url, "limits", "set", "acct-b", "--daily-budget", "0.0065", check=True)
    a = [run("acct-a") for _ in range(3)]
    b = [run("acct-b") for _ in range(4)]
    assert a[0] == "done"
    assert all("daily budget (set by `limits set --daily-budget`)" in r for r in a[1:]), a
    assert b[:3] == ["done"] * 3
    assert "for account 'acct-b' would be exceeded" in b[3]
    report = json.loads(run_cli(worker.redis_url, "cost", "--json", check=True).stdout)
    rows = report["budgets"]["accounts"]
    assert rows["acct-a"]["budget_usd"] == pytest.approx(0.004)
    assert rows["acct-a"]["spent_usd"] == pytest.approx(0.0039)
    assert rows["acct-a"]["left_usd"] == pytest.approx(0.0001)
    assert rows["acct-b"] == {
        "budget_usd": pytest.approx(0.0065),
        "spent_usd": pytest.approx(0.0065),
        "left_usd": pytest.approx(0.0),
        "source": "run time",
    }
    run_cli(worker.redis_url, "limits", "set", "acct-a", "--clear", check=True)
    assert run("acct-a") == "done"  # back to RUNWARE_ACCOUNT_DAILY_BUDGET_USD: none here
    run_cli(worker.redis_url, "limits", "set", "acct-b", "--daily-budget", "none", check=True)
    assert run("acct-b") == "done"  # no budget at all
    assert len(sandbox.state.accepted) == 4 + 1 + 3 + 2
