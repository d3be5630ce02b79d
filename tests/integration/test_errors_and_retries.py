"""Error mapping and the retry policy, against faults the sandbox injects."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from tests.conftest import (
    RunningWorker,
    StartWorker,
    metrics_port,
    run_cli,
    scrape_metrics,
    wait_until,
)
from workers.sandbox import Sandbox


def _retries_logged(worker: RunningWorker, task_id: str) -> int:
    return sum(
        1 for line in worker.process.log().splitlines() if task_id in line and "will retry" in line
    )


@pytest.mark.parametrize(
    "faults", [["429"], ["503", "500"], ["garbage"], ["429", "503", "500"], ["408", "drop"]]
)
def test_transient_faults_are_retried_until_success(
    main_worker: RunningWorker, sandbox: Sandbox, faults: list[str]
) -> None:
    sandbox.configure(fail_next=list(faults))
    async_result = main_worker.send(prompt="a red fox")
    result = async_result.get(timeout=30)
    assert result["text"]
    assert sandbox.state.requests == len(faults) + 1
    assert sandbox.state.accepted == {result["taskUUID"]: 1}
    assert _retries_logged(main_worker, async_result.id) == len(faults)


def test_retries_are_bounded(main_worker: RunningWorker, sandbox: Sandbox) -> None:
    """RUNWARE_MAX_RETRIES=3: four 503s in a row end as a FAILURE after exactly four calls."""
    sandbox.configure(fail_next=["503"] * 4)
    async_result = main_worker.send(prompt="a red fox")
    with pytest.raises(Exception, match=r"HTTP 503.*gave up after 3 retries"):
        async_result.get(timeout=30)
    assert async_result.state == "FAILURE"
    assert sandbox.state.requests == 4
    assert sandbox.state.accepted == {}


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        ("400", "invalidParameter"),
        ("402", "insufficientCredits"),
        ("404", "notFound"),
    ],
)
def test_permanent_errors_fail_at_once_keeping_code_and_message(
    main_worker: RunningWorker, sandbox: Sandbox, fault: str, code: str
) -> None:
    sandbox.configure(fail_next=[fault])
    async_result = main_worker.send(prompt="a red fox")
    with pytest.raises(Exception, match=rf"HTTP {fault}, {code}: injected by the sandbox"):
        async_result.get(timeout=30)
    assert sandbox.state.requests == 1
    assert _retries_logged(main_worker, async_result.id) == 0


def test_retry_after_is_honoured(main_worker: RunningWorker, sandbox: Sandbox) -> None:
    """Twice: the job's own retry countdown (its log line) and the gap between the calls. A
    429 also starts the fleet's cool-down, which alone would explain the gap; the countdown
    is the retry policy's (the worker's own back-off is capped at 0.5 s here)."""
    sandbox.configure(fail_next=["429"], retry_after_s=0.8)
    job = main_worker.send(prompt="a red fox")
    job.get(timeout=30)  # type: ignore[attr-defined]
    first, second = sandbox.state.call_times
    assert second - first >= 0.8
    said = re.search(
        rf"Task {job.id} \(tasks.enhance_prompt\) will retry in ([0-9.]+)s",  # type: ignore[attr-defined]
        main_worker.process.log(),
    )
    assert said is not None
    assert float(said[1]) >= 0.8


def test_a_lost_answer_is_recovered_without_paying_twice(
    main_worker: RunningWorker, sandbox: Sandbox
) -> None:
    """The sandbox bills the task but answers after the client's 1 s timeout; the retry gets 409
    conflictTaskUUID and recovers the result with getResponse."""
    sandbox.configure(fail_next=["hang"], hang_s=2.0)
    result = main_worker.send(prompt="a red fox", promptVersions=2).get(timeout=30)
    assert len(result["texts"]) == 2
    assert sandbox.state.accepted == {result["taskUUID"]: 1}
    assert sandbox.state.statuses.get("409") == 1
    assert sandbox.state.by_type.get("getResponse") == 1
    assert result["cost"] == pytest.approx(2 * 0.0013)


def _paused(url: str) -> dict[str, object] | None:
    state = json.loads(run_cli(url, "limits", "show", "--json", check=True).stdout)
    paused: dict[str, object] | None = state["paused"]
    return paused


def test_a_wrong_key_pauses_the_fleet_and_the_right_one_resumes_it(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    """Two worker processes with a key Runware refuses and 500 jobs queued: the first refusal
    pauses every grant, each process makes at most one call, nothing is failed or
    dead-lettered, and the fleet says so (`limits show`, `enhance_fleet_paused`). The workers
    stop; one with the right key starts, resumes the fleet, and all 500 are done."""
    wrong = {"RUNWARE_API_KEY": "rw-not-the-right-key", "METRICS_PORT": "0"}
    first = start_worker("wrongkey", **wrong)
    second = start_worker("wrongkey", same_db_as=first, **wrong)
    sent = [first.send(prompt=f"paused fox {n}") for n in range(500)]
    wait_until(lambda: _paused(first.redis_url) is not None, 30, "the fleet paused")
    time.sleep(2.0)  # whatever else would be called, would be by now
    paused = _paused(first.redis_url)
    assert paused is not None
    assert "invalidApiKey" in str(paused["reason"])
    assert sandbox.state.auth_failures == sandbox.state.requests <= 2  # one per process at most
    assert sandbox.state.accepted == {}
    assert json.loads(run_cli(first.redis_url, "failed", "list", "--json", check=True).stdout) == []
    assert scrape_metrics(metrics_port(first))[("enhance_fleet_paused", ())] == 1
    shown = run_cli(first.redis_url, "limits", "show", check=True).stdout
    assert "PAUSED" in shown
    assert "invalidApiKey" in shown
    assert all(r.state == "PENDING" for r in sent)  # type: ignore[attr-defined]
    first.process.stop()

    # A rolling deploy: one worker with the right key starts while one of the old deploy still
    # runs. The fleet resumes, and the old worker, whose key stays recorded as refused, makes
    # no call (it hands the jobs it is granted back): it cannot pause the fleet again.
    right = start_worker("rightkey", same_db_as=first)
    done = [r.get(timeout=180) for r in sent]  # type: ignore[attr-defined]
    assert len({d["taskUUID"] for d in done}) == 500
    assert len(sandbox.state.accepted) == 500
    assert sandbox.state.auth_failures <= 2  # none after the resume
    assert _paused(first.redis_url) is None
    assert "the fleet resumes" in right.process.log()
    second.process.stop()


def test_a_403_pauses_the_fleet_until_it_is_resumed(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    """403 (the key lacks a permission) is the key's problem too: the fleet pauses, the job
    waits with its retries untouched, and `limits resume` lets it run."""
    worker = start_worker("forbidden")
    sandbox.configure(fail_next=["403"])
    waiting = worker.send(prompt="a forbidden fox")
    wait_until(lambda: _paused(worker.redis_url) is not None, 30, "the fleet paused")
    assert "HTTP 403, forbidden" in str(_paused(worker.redis_url)["reason"])  # type: ignore[index]
    assert waiting.state == "PENDING"  # type: ignore[attr-defined]
    assert run_cli(worker.redis_url, "limits", "resume", check=True).stdout.strip() == "resumed"
    assert waiting.get(timeout=30)["text"]  # type: ignore[attr-defined]
    assert sandbox.state.requests == 2
    assert _retries_logged(worker, waiting.id) == 0  # type: ignore[attr-defined]
    assert (
        json.loads(run_cli(worker.redis_url, "failed", "list", "--json", check=True).stdout) == []
    )


def test_no_key_pauses_the_fleet_without_calling(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    """A worker with no key makes no call: the job waits (not failed), the fleet pauses and
    says why; `limits resume` and a worker with a key let it run."""
    keyless = start_worker("nokey", RUNWARE_API_KEY="")
    waiting = keyless.send(prompt="a red fox")
    wait_until(lambda: _paused(keyless.redis_url) is not None, 30, "the fleet paused")
    assert "RUNWARE_API_KEY is not set" in str(_paused(keyless.redis_url)["reason"])  # type: ignore[index]
    assert sandbox.state.tasks_received == 0
    assert waiting.state == "PENDING"  # type: ignore[attr-defined]
    keyless.process.stop()
    assert run_cli(keyless.redis_url, "limits", "resume", check=True).stdout.strip() == "resumed"
    start_worker("withkey", same_db_as=keyless)
    assert waiting.get(timeout=60)["text"]  # type: ignore[attr-defined]
    assert sandbox.state.tasks_received == 1


@pytest.mark.parametrize(
    ("variable", "value"),
    [("RUNWARE_TIMEOUT_S", "soon"), ("RUNWARE_MAX_RETRIES", "-2"), ("REDIS_URL", "nowhere")],
)
def test_a_bad_setting_stops_the_worker_with_one_line(variable: str, value: str) -> None:
    import os

    env = {**os.environ, variable: value}
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"enhance-worker: invalid configuration: {variable}=")
    assert "expected" in lines[0]


def test_more_retries_than_celerys_default_cap(start_worker: StartWorker, sandbox: Sandbox) -> None:
    """RUNWARE_MAX_RETRIES, not Celery's default max_retries of 3, bounds the retries."""
    worker = start_worker("manyretries", RUNWARE_MAX_RETRIES="6")
    sandbox.configure(fail_next=["503"] * 5)
    assert worker.send(prompt="persistent").get(timeout=60)["text"]
    assert sandbox.state.requests == 6


def test_a_task_of_ones_own_gets_the_policy_without_asking(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    """`tests.shout` (tests/integration/own_task_app.py) has no retry, log or metrics code in
    its body: the base class gives it all three, and its own `retry_limit=5` beats the setting."""
    worker = start_worker(
        "own",
        app="tests.integration.own_task_app",
        METRICS_PORT="0",
        RUNWARE_BATCH_MAX="1",  # one task per request: each fault hits this job
        RUNWARE_MAX_RETRIES="1",
    )
    port = metrics_port(worker)
    sandbox.configure(fail_next=["500", "500", "500"])
    result = worker.app.send_task("tests.shout", kwargs={"prompt": "a quiet lake"})
    value = result.get(timeout=60)
    assert value["text"].startswith("A QUIET LAKE")
    log = worker.process.log()
    assert log.count("(tests.shout) will retry") == 3
    assert f"(tests.shout) succeeded: taskUUID={value['taskUUID']}" in log
    m = scrape_metrics(port)
    assert m[("enhance_job_retries_total", (("task", "tests.shout"),))] == 3
    assert m[("enhance_jobs_total", (("outcome", "success"), ("task", "tests.shout")))] == 1
    # And a final failure: its outcome line, its metric and its dead letter.
    sandbox.configure(fail_next=["400"])
    failed = worker.app.send_task("tests.shout", kwargs={"prompt": "a loud lake"})
    with pytest.raises(Exception, match="HTTP 400"):
        failed.get(timeout=30)
    assert f"Task {failed.id} (tests.shout) failed:" in worker.process.log()
    m = scrape_metrics(port)
    assert m[("enhance_jobs_total", (("outcome", "failure"), ("task", "tests.shout")))] == 1
    assert m[("enhance_dead_letters_total", (("task", "tests.shout"),))] == 1


def test_a_500_with_retry_after_is_retried_no_sooner(
    main_worker: RunningWorker, sandbox: Sandbox
) -> None:
    """A 500 starts no fleet cool-down (only 429 and 503 do), so only the job's own retry policy
    can explain the wait: at least Retry-After (0.8 s), where its back-off is capped at 0.5 s."""
    sandbox.configure(fail_next=["500"], retry_after_s=0.8)
    main_worker.send(prompt="a patient fox").get(timeout=30)  # type: ignore[attr-defined]
    first, second = sandbox.state.call_times
    assert second - first >= 0.8


def test_a_call_runware_refuses_gives_its_budget_reservation_back(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    """A daily budget of exactly one call: a call Runware refuses (HTTP 400, nothing billed)
    releases its reservation, so the next job fits (it was refused BudgetExceeded while the
    reservation stayed, for RUNWARE_RESERVATION_S)."""
    worker = start_worker("refused-release", RUNWARE_DAILY_BUDGET_USD="0.0013")
    sandbox.configure(fail_next=["400"])
    with pytest.raises(Exception, match="HTTP 400"):
        worker.send(prompt="a refused fox").get(timeout=30)  # type: ignore[attr-defined]
    assert worker.send(prompt="a fitting fox").get(timeout=30)["text"]  # type: ignore[attr-defined]
