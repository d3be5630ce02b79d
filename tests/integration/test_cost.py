"""Cost end to end: batches, the ledger and the CLI against the sandbox, budgets under load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest
import redis

from config.settings import load_settings
from tasks.errors import ValidationError
from tasks.ledger import Ledger
from tests.conftest import FAST_REDELIVERY, RunningWorker, StartWorker, wait_until
from workers.sandbox import Sandbox


def _cost_json(redis_url: str, *args: str) -> dict[str, Any]:
    env = {**os.environ, "REDIS_URL": redis_url}
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", "cost", "--json", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def _account() -> str:
    return f"acct-{uuid.uuid4().hex[:8]}"


def test_a_batch_costs_what_the_sandbox_billed(
    main_worker: RunningWorker, sandbox: Sandbox
) -> None:
    from tasks import enhance_batch

    account = _account()
    prompts = [f"batch prompt {n}" for n in range(10)]
    result = enhance_batch(prompts, versions=2, account=account).get(timeout=60)
    assert result["count"] == 10
    assert result["failed"] == 0
    assert [r["prompt"] for r in result["results"]] == prompts
    assert all(len(r["texts"]) == 2 for r in result["results"])
    assert all(r["totalCost"] == r["cost"] for r in result["results"])
    billed = sandbox.state.billed_micro
    assert billed == 10 * 2 * 1300
    assert round(result["cost"] * 1_000_000) == billed
    report = _cost_json(main_worker.redis_url, "--account", account)
    assert round(report["total_usd"] * 1_000_000) == billed
    assert report["tasks"] == 10
    assert report["by_account"] == {account: billed / 1_000_000}
    assert all(
        sandbox.state.bodies[r["taskUUID"]].get("account") is None for r in result["results"]
    )  # the label never reaches Runware


def test_a_failed_prompt_does_not_sink_the_batch(
    main_worker: RunningWorker, sandbox: Sandbox
) -> None:
    from tasks import enhance_batch

    sandbox.configure(fail_next=["400"])
    prompts = [f"sinking {n}" for n in range(6)]
    batch = enhance_batch(prompts, account=_account())
    # Its .get() waits for the callback alone (with the group as parent Celery would re-check
    # every part on each wake); a failed part still comes back as its item.
    assert batch.parent is None
    result = batch.get(timeout=60)
    assert result["count"] == 6
    assert result["failed"] == 1
    (failed,) = [r for r in result["results"] if "error" in r]
    assert failed["prompt"] in prompts
    assert "HTTP 400" in failed["error"]
    assert [r["prompt"] for r in result["results"]] == prompts
    assert round(result["cost"] * 1_000_000) == sandbox.state.billed_micro == 5 * 1300


def test_a_batch_is_validated_before_anything_is_enqueued(
    main_worker: RunningWorker, sandbox: Sandbox
) -> None:
    from tasks import enhance_batch

    prompts = ["fine", "also fine", "", "x" * 301]
    with pytest.raises(ValidationError, match=r"prompts\[2\]: prompt: .*prompts\[3\]: prompt"):
        enhance_batch(prompts)
    with pytest.raises(ValidationError, match="promptVersions"):
        enhance_batch(["fine"], versions=9)
    with pytest.raises(ValidationError, match="1 to 10000 prompts"):
        enhance_batch([])
    with pytest.raises(ValidationError, match="account"):
        enhance_batch(["fine"], account="has spaces")
    time.sleep(0.5)
    assert sandbox.state.requests == 0


@pytest.mark.slow
def test_the_daily_budget_cannot_be_overshot(start_worker: StartWorker, sandbox: Sandbox) -> None:
    """Four worker processes, 20 concurrent jobs of 0.0013 under a 0.01 budget: exactly 7 run."""
    sandbox.configure(latency_s=0.2)
    first = start_worker("budget", RUNWARE_DAILY_BUDGET_USD="0.01")
    for _ in range(3):
        start_worker("budget", same_db_as=first, RUNWARE_DAILY_BUDGET_USD="0.01")
    pending = [first.send(prompt=f"budget {n}") for n in range(20)]
    succeeded, refused = 0, []
    for async_result in pending:
        try:
            async_result.get(timeout=60)
            succeeded += 1
        except Exception as exc:
            refused.append(exc)
    assert succeeded == 7
    assert len(refused) == 13
    assert all(type(e).__name__ == "BudgetExceeded" for e in refused)
    assert all("RUNWARE_DAILY_BUDGET_USD of $0.010000" in str(e) for e in refused)
    assert sandbox.state.billed_micro == 7 * 1300
    assert sandbox.state.billed_micro <= 10_000
    assert "retry" not in " ".join(str(e) for e in refused)
    assert _cost_json(first.redis_url)["total_usd"] == 0.0091


def test_the_account_budget_holds_per_account(start_worker: StartWorker, sandbox: Sandbox) -> None:
    worker = start_worker("acct", RUNWARE_ACCOUNT_DAILY_BUDGET_USD="0.0026")
    pending = [
        (account, worker.send(prompt=f"{account} {n}", account=account))
        for account in ("a", "b")
        for n in range(3)
    ]
    outcomes: dict[str, list[str]] = {"a": [], "b": []}
    for account, async_result in pending:
        try:
            async_result.get(timeout=30)
            outcomes[account].append("ok")
        except Exception as exc:
            outcomes[account].append(str(exc))
    for account in ("a", "b"):
        assert outcomes[account].count("ok") == 2
        (refused,) = [o for o in outcomes[account] if o != "ok"]
        assert "RUNWARE_ACCOUNT_DAILY_BUDGET_USD" in refused
        assert f"account {account!r}" in refused


@pytest.mark.slow
def test_a_redelivered_job_is_counted_once(start_worker: StartWorker, sandbox: Sandbox) -> None:
    """The worker dies while Runware works on the call; the job is delivered again to another
    worker, which gets 409 for its taskUUID, recovers the result, and the ledger counts it once."""
    sandbox.configure(latency_s=1.5)
    settings = {**FAST_REDELIVERY, "RUNWARE_TIMEOUT_S": "3"}
    doomed = start_worker("redeliver", **settings)
    async_result = doomed.send(prompt="redelivered", account="once")
    deadline = time.monotonic() + 20
    while sandbox.state.in_flight < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    doomed.process.kill()
    heir = start_worker("heir", same_db_as=doomed, **settings)
    result = async_result.get(timeout=90)
    assert sandbox.state.accepted == {result["taskUUID"]: 1}
    report = _cost_json(heir.redis_url, "--account", "once")
    assert report["tasks"] == 1
    assert report["total_usd"] == 0.0013
    client = redis.Redis.from_url(heir.redis_url)
    record = client.get(f"enhance:ledger:task:{result['taskUUID']}")
    assert record is not None
    assert record.startswith(b"1300|")
    client.close()


def test_a_call_ended_twice_is_counted_once(start_worker: StartWorker, sandbox: Sandbox) -> None:
    """Two ends of one call: while the worker's call is still out, its outcome is recorded by
    another party (here the test, making the reconciler's Ledger.end, as it does for a call
    it found finished). The worker's own end then comes second and must book nothing: one
    task and one cost on the day, whichever end came first."""
    sandbox.configure(latency_s=1.0)
    worker = start_worker("ended-twice", RUNWARE_TIMEOUT_S="5")
    task_uuid = str(uuid.uuid4())
    job = worker.send(prompt="ended twice", account="twice", taskUUID=task_uuid)
    arrived = lambda: any(task_uuid in uuids for _, _, uuids in sandbox.state.request_log)  # noqa: E731
    wait_until(arrived, 20, "the worker's call reached Runware")
    client = redis.Redis.from_url(worker.redis_url)
    other = Ledger(client, load_settings(_env_file=None))
    items = [{"taskType": "promptEnhance", "taskUUID": task_uuid, "text": "x", "cost": 0.0013}]
    assert other.end(task_uuid, "twice", 0.0013, items) is True  # the first end books
    assert sandbox.state.in_flight >= 1  # before the worker's call came back
    assert job.get(timeout=30)["taskUUID"] == task_uuid  # type: ignore[attr-defined]
    assert len([u for _, _, u in sandbox.state.request_log if task_uuid in u]) == 1  # its own end
    report = _cost_json(worker.redis_url, "--account", "twice")
    assert (report["tasks"], report["total_usd"]) == (1, 0.0013)
    client.close()


def test_a_budget_reserves_every_version(start_worker: StartWorker, sandbox: Sandbox) -> None:
    """promptVersions=3 reserves 3 x the estimate: three such jobs at once under a budget of
    two refuse the third (reserving one version each would let all three run, past the
    budget, before any answer taught the real price)."""
    sandbox.configure(latency_s=0.5)  # all three reserve before the first answer
    worker = start_worker("versions", RUNWARE_DAILY_BUDGET_USD="0.0079")
    pending = [worker.send(prompt=f"three ways {n}", promptVersions=3) for n in range(3)]
    outcomes = []
    for job in pending:
        try:
            job.get(timeout=30)
            outcomes.append("ok")
        except Exception as exc:
            outcomes.append(type(exc).__name__)
    assert sorted(outcomes) == ["BudgetExceeded", "ok", "ok"]
    assert sandbox.state.billed_micro == 2 * 3 * 1300
