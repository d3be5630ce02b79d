"""Error mapping and the retry policy, against faults the sandbox injects."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import RunningWorker, StartWorker, metrics_port, scrape_metrics
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
        ("403", "forbidden"),
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
    sandbox.configure(fail_next=["429"], retry_after_s=0.8)
    main_worker.send(prompt="a red fox").get(timeout=30)
    first, second = sandbox.state.call_times
    # The worker's own back-off is capped at 0.5 s here, so only Retry-After explains the gap.
    assert second - first >= 0.8


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


def test_a_wrong_key_fails_each_job_at_once(start_worker: StartWorker, sandbox: Sandbox) -> None:
    worker = start_worker("wrongkey", RUNWARE_API_KEY="rw-not-the-right-key")
    pending = [worker.send(prompt=f"fox {n}") for n in range(5)]
    for async_result in pending:
        with pytest.raises(Exception, match=r"HTTP 401, invalidApiKey.*check RUNWARE_API_KEY"):
            async_result.get(timeout=30)
    assert sandbox.state.tasks_received == 5  # each job sent once: no retry storm
    assert sandbox.state.auth_failures == sandbox.state.requests >= 1


def test_no_key_fails_without_calling(start_worker: StartWorker, sandbox: Sandbox) -> None:
    worker = start_worker("nokey", RUNWARE_API_KEY="")
    with pytest.raises(Exception, match="RUNWARE_API_KEY is not set"):
        worker.send(prompt="a red fox").get(timeout=30)
    assert sandbox.state.tasks_received == 0


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
