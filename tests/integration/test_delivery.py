"""Delivery guarantees: known results, soft shutdown, dead letters, JSON only, Redis auth."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest

from tests.conftest import (
    FAST_REDELIVERY,
    SECRET,
    RunningWorker,
    StartWorker,
    assert_billed_once,
    run_cli,
    wait_until,
    worker_env,
)
from tests.load.common import ledger_micro
from tests.producer import backend_app
from workers.sandbox import Sandbox
from workers.sandbox.services import RedisServer, WorkerProcess

pytestmark = pytest.mark.slow  # real worker processes, seconds each: `-m 'not slow'` skips them


def _cli(redis_url: str, *args: str) -> str:
    return run_cli(redis_url, *args, timeout=60, check=True).stdout


def test_a_job_whose_result_is_known_does_not_call_again(
    main_worker: RunningWorker, sandbox: Sandbox
) -> None:
    task_uuid = str(uuid.uuid4())
    first = main_worker.send(prompt="known", taskUUID=task_uuid).get(timeout=30)
    requests = sandbox.state.requests
    again = main_worker.send(prompt="known", taskUUID=task_uuid).get(timeout=30)
    assert again == first
    assert sandbox.state.requests == requests
    # (This job's own line: the shared worker's log holds other tests' lines too.)
    assert f"taskUUID {task_uuid} already finished; returning its result" in (
        main_worker.process.log()
    )


def test_soft_shutdown_ends_running_calls_and_leaves_waiting_jobs(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    """SIGTERM (remapped to Celery's soft shutdown) with three calls running and three jobs
    waiting. A thread cannot be interrupted (Celery's threads pool has no kill_job), so the
    running calls end in this worker (each recorded and acknowledged, bounded by the HTTP
    timeout) and the worker takes nothing more; the waiting jobs run in the next worker. Each
    taskUUID is billed once."""
    sandbox.configure(latency_s=3.0)
    settings = {
        **FAST_REDELIVERY,
        "RUNWARE_TIMEOUT_S": "5",
        "WORKER_SOFT_SHUTDOWN_S": "1",
        "REMAP_SIGTERM": "SIGQUIT",
        "WORKER_CONCURRENCY": "3",
    }
    first = start_worker("soft", **settings)
    pending = [first.send(prompt=f"soft {n}") for n in range(6)]
    wait_until(lambda: len(sandbox.state.accepted) == 3, 20, "three calls at Runware")
    assert first.process.process is not None
    first.process.process.send_signal(signal.SIGTERM)
    first.process.process.wait(timeout=30)
    log = first.process.log()
    assert "Soft shutdown: 3 running job(s)" in log
    assert log.count(" succeeded: ") == 3  # the running calls ended here, none started after
    heir = start_worker("soft-heir", same_db_as=first, **settings)
    results = [p.get(timeout=60) for p in pending]
    assert heir.process.log().count(" succeeded: ") == 3  # the waiting ones ran there
    assert "already accepted by Runware" not in heir.process.log()  # nothing ran twice
    assert_billed_once(sandbox, results, ledger=ledger_micro(first.redis_url))


def test_failed_jobs_are_listed_with_their_reason_and_can_be_retried(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    worker = start_worker("dead")
    sandbox.configure(fail_next=["400"])
    failed = worker.send(prompt="fails once", account="dl")
    with pytest.raises(Exception, match="HTTP 400"):
        failed.get(timeout=30)
    bad = worker.send(prompt="x", promptVersions=9)
    with pytest.raises(Exception, match="promptVersions"):
        bad.get(timeout=30)
    listed = json.loads(_cli(worker.redis_url, "failed", "list", "--json"))
    assert {e["task"] for e in listed} == {"tasks.enhance_prompt"}
    assert all(set(e) == {"taskUUID", "task", "reason", "failedAt"} for e in listed)
    reasons = {e["reason"].split(":")[0] for e in listed}
    assert reasons == {"PermanentError", "ValidationError"}
    runware_failure = next(e for e in listed if e["reason"].startswith("PermanentError"))
    assert "HTTP 400" in runware_failure["reason"]
    out = _cli(worker.redis_url, "failed", "retry", runware_failure["taskUUID"])
    assert out.startswith("requeued 1 job(s): ")
    new_id = out.split(": ")[1].strip()
    result = worker.app.AsyncResult(new_id).get(timeout=30)
    assert result["taskUUID"] == runware_failure["taskUUID"]  # the same taskUUID, billed once
    assert sandbox.state.accepted == {result["taskUUID"]: 1}
    remaining = json.loads(_cli(worker.redis_url, "failed", "list", "--json"))
    assert [e["reason"].split(":")[0] for e in remaining] == ["ValidationError"]


def test_a_failed_batch_item_is_a_dead_letter_too(
    main_worker: RunningWorker, sandbox: Sandbox, redis_server: RedisServer
) -> None:
    from tasks import enhance_batch

    sandbox.configure(fail_next=["402"])
    result = enhance_batch(["one", "two"]).get(timeout=60)
    # A 402 is the account's: every task of the refused request fails (one or both, as the
    # coalescer shared the request or not), and each of them is a dead letter.
    (refused,) = [uuids for _at, fault, uuids in sandbox.state.request_log if fault == "402"]
    assert result["failed"] == len(refused) >= 1
    listed = json.loads(_cli(main_worker.redis_url, "failed", "list", "--json"))
    dead = [
        e for e in listed if e["task"] == "tasks.enhance_batch_item" and "HTTP 402" in e["reason"]
    ]
    assert len(dead) == len(refused)


def test_pickle_is_refused(start_worker: StartWorker, sandbox: Sandbox) -> None:
    """A pickle message is never unpickled: the dispatcher sets it aside before any worker, and
    it is listed among the failed jobs with the content type it was refused for."""
    worker = start_worker("pickle")
    evil = backend_app(broker=worker.redis_url, backend=worker.redis_url)
    evil.conf.update(task_serializer="pickle", accept_content=["pickle", "json"])
    try:
        result = evil.send_task("tasks.enhance_prompt", kwargs={"prompt": "pickled"})
        deadline = time.monotonic() + 10
        while not (listed := json.loads(_cli(worker.redis_url, "failed", "list", "--json"))):
            assert time.monotonic() < deadline, "the pickle message was not set aside"
            time.sleep(0.2)
        (entry,) = listed
        assert entry["task"] == "tasks.enhance_prompt"
        assert "content type 'application/x-python-serialize'" in entry["reason"]
        assert result.state == "PENDING"
        assert sandbox.state.requests == 0
        assert "ContentDisallowed" not in worker.process.log()  # no worker ever saw it
    finally:
        evil.close()


def test_a_redis_with_a_password(sandbox: Sandbox) -> None:
    password = "pw-8c1e5b7d-redis"
    with RedisServer(password=password) as server:
        url = server.url(0)
        assert password in url
        worker = WorkerProcess(worker_env(url, sandbox), name="auth").start()
        producer = backend_app(broker=url, backend=url)
        try:
            result = producer.send_task("tasks.enhance_prompt", kwargs={"prompt": "auth"})
            assert result.get(timeout=30)["text"]
        finally:
            producer.close()
            worker.stop()
        log = worker.log()
        assert password not in log
        assert SECRET not in log
        assert "redis://:**@127.0.0.1" in log  # Celery's own banner masks it as well


@pytest.mark.parametrize("bad", [{"CELERY_VISIBILITY_TIMEOUT_S": "30"}])
def test_a_visibility_timeout_shorter_than_a_wait_stops_the_worker(bad: dict[str, Any]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers", "worker"],
        env={**os.environ, **bad},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert "CELERY_VISIBILITY_TIMEOUT_S=30 must be longer than" in line


def test_a_retried_task_of_ones_own_keeps_its_taskuuid(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    """`failed retry` of a task the project does not know by name (tests.shout derives its
    taskUUID from the Celery task id): requeued under the same id, so the same taskUUID, and
    Runware, which bills a taskUUID once, is not billed for it twice."""
    worker = start_worker("dead-own", app="tests.integration.own_task_app")
    sandbox.configure(fail_next=["400"])
    failed = worker.app.send_task("tests.shout", kwargs={"prompt": "a loud lake"})
    with pytest.raises(Exception, match="HTTP 400"):
        failed.get(timeout=30)
    (entry,) = json.loads(_cli(worker.redis_url, "failed", "list", "--json"))
    out = _cli(worker.redis_url, "failed", "retry", entry["taskUUID"])
    assert out.strip() == f"requeued 1 job(s): {failed.id}"
    result = worker.app.AsyncResult(failed.id).get(timeout=30)
    assert result["taskUUID"] == entry["taskUUID"]
    assert sandbox.state.accepted == {entry["taskUUID"]: 1}


def test_a_retried_task_of_ones_own_that_gave_up_after_a_billed_call_is_billed_once(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    """A task of one's own whose call Runware accepted (and billed) but answered too late, and
    that then gave up: `failed retry` sends it under the same task id, so the same taskUUID,
    and Runware's answer is fetched, not bought a second time."""
    worker = start_worker(
        "dead-billed", app="tests.integration.own_task_app", RUNWARE_TIMEOUT_S="1",
        RUNWARE_RETRY_BACKOFF_S="0.05", RUNWARE_RETRY_BACKOFF_MAX_S="0.2",
    )  # fmt: skip
    # Accepted and billed, the answer too late; then every retry (5: the task's retry_limit)
    # meets a server error, and the task gives up.
    sandbox.configure(fail_next=["hang"] + ["500"] * 5, hang_s=1.5)
    failed = worker.app.send_task("tests.shout", kwargs={"prompt": "a billed bay"})
    with pytest.raises(Exception, match="HTTP 500"):
        failed.get(timeout=30)
    (entry,) = json.loads(_cli(worker.redis_url, "failed", "list", "--json"))
    assert sandbox.state.accepted == {entry["taskUUID"]: 1}  # Runware has billed it
    billed = sandbox.state.billed_micro
    out = _cli(worker.redis_url, "failed", "retry", entry["taskUUID"])
    assert out.strip() == f"requeued 1 job(s): {failed.id}"
    result = worker.app.AsyncResult(failed.id).get(timeout=30)
    assert result["taskUUID"] == entry["taskUUID"]
    assert sandbox.state.accepted == {entry["taskUUID"]: 1}
    assert sandbox.state.billed_micro == billed


def test_sigterm_stops_an_idle_worker_at_once_and_a_busy_one_when_its_calls_end(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    """SIGTERM remapped to the soft shutdown, as every deploy file sets, with the default
    WORKER_SOFT_SHUTDOWN_S (30 s): an idle worker exits at once (Celery slept the 30 s), a busy
    one as soon as its running calls end, each recorded; afterwards `limits show` counts no
    call in flight."""
    settings = {"REMAP_SIGTERM": "SIGQUIT", "WORKER_CONCURRENCY": "3", "RUNWARE_TIMEOUT_S": "5"}
    idle = start_worker("idle-stop", **settings)
    assert idle.process.process is not None
    started = time.monotonic()
    idle.process.process.send_signal(signal.SIGTERM)
    idle.process.process.wait(timeout=40)
    idle_s = time.monotonic() - started
    assert idle_s < 10, f"an idle worker took {idle_s:.1f}s to stop"

    sandbox.configure(latency_s=2.0)
    busy = start_worker("busy-stop", same_db_as=idle, **settings)
    running = [busy.send(prompt=f"stopping {n}") for n in range(3)]
    wait_until(lambda: len(sandbox.state.accepted) == 3, 20, "three calls at Runware")
    assert busy.process.process is not None
    started = time.monotonic()
    busy.process.process.send_signal(signal.SIGTERM)
    busy.process.process.wait(timeout=40)
    busy_s = time.monotonic() - started
    assert busy_s < 15, f"a busy worker took {busy_s:.1f}s to stop, its calls took 2 s"
    log = busy.process.log()
    assert log.count(" succeeded: ") == 3
    # A Redis URL with no password is shown as it is (kombu printed `redis://:**@` for it).
    assert f"transport:   {busy.redis_url}" in log
    assert "redis://:**@" not in log
    assert "redis://<redacted>@" not in log
    assert len({r.get(timeout=10)["taskUUID"] for r in running}) == 3  # type: ignore[attr-defined]
    shown = json.loads(_cli(busy.redis_url, "limits", "show", "--json"))
    assert shown["in_flight"] == 0
    assert_billed_once(sandbox, [r.get() for r in running], ledger=ledger_micro(busy.redis_url))  # type: ignore[attr-defined]
