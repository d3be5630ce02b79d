"""Fair share and priority with real workers, at small scale, counted by the sandbox. Each worker
runs 4 threads, far fewer than the backlog: waiting for a slot holds no thread, so the order of
the calls does not depend on where a job sits in Celery's queue."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.conftest import StartWorker
from workers.sandbox import Sandbox

pytestmark = pytest.mark.slow  # real worker processes, seconds each: `-m 'not slow'` skips them


def _send(worker: object, account: str, count: int, priority: str) -> list[object]:
    return [
        worker.app.send_task(  # type: ignore[attr-defined]
            "tasks.enhance_prompt",
            kwargs={"prompt": f"{account} job {n}", "account": account, "priority": priority},
        )
        for n in range(count)
    ]


def test_a_late_account_is_not_stuck_behind_a_backlog(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    worker = start_worker("fair", RUNWARE_RATE_LIMIT="10/s", WORKER_CONCURRENCY="4")
    backlog = _send(worker, "A", 40, "batch")
    time.sleep(1.0)
    late = _send(worker, "B", 6, "batch")
    for result in late:
        result.get(timeout=60)  # type: ignore[attr-defined]
    log = [p for _, p in sorted(sandbox.state.accepted_log)]
    b_calls = [i for i, p in enumerate(log) if p.startswith("B ")]
    # B's 6 jobs were served alternately with A's from the moment they arrived, not after A's
    # 40 (about 10 of A's went in the second before B came).
    assert b_calls[-1] - b_calls[0] <= 2 * 5 + 1, "".join(p[0] for p in log)
    assert b_calls[-1] < 6 * 2 + 14
    for result in backlog:
        result.get(timeout=60)  # type: ignore[attr-defined]
    assert len(sandbox.state.accepted) == 46


def test_weights_and_priority_order_the_calls(start_worker: StartWorker, sandbox: Sandbox) -> None:
    worker = start_worker("weights", RUNWARE_RATE_LIMIT="10/s", WORKER_CONCURRENCY="4")
    env = {**os.environ, "REDIS_URL": worker.redis_url}
    subprocess.run(
        [sys.executable, "-m", "workers.cli", "limits", "set", "A", "--weight", "3"],
        env=env,
        check=True,
        timeout=30,
    )
    shown = subprocess.run(
        [sys.executable, "-m", "workers.cli", "limits", "show", "--json"],
        env=env,
        check=True,
        timeout=30,
        capture_output=True,
        text=True,
    ).stdout
    assert '"A": {"rate": null, "weight": 3' in shown
    jobs = _send(worker, "A", 24, "batch") + _send(worker, "B", 24, "batch")
    time.sleep(1.5)
    sent = time.time()  # (the sandbox's clock)
    urgent = _send(worker, "C", 1, "interactive")[0]
    urgent.get(timeout=30)  # type: ignore[attr-defined]
    # Ahead of the 40-odd batch calls still queued: at most the one already granted, and the
    # one batch slot in ten, went between its arrival and its call.
    after = [p for t, p in sorted(sandbox.state.accepted_log) if t >= sent]
    assert after.index(next(p for p in after if p.startswith("C"))) <= 2, after
    for result in jobs:
        result.get(timeout=60)  # type: ignore[attr-defined]
    log = [p[0] for _, p in sorted(sandbox.state.accepted_log)]
    both = log[: 2 + 24]  # while both A and B were waiting
    a, b = both.count("A"), both.count("B")
    assert 2.2 <= a / b <= 4.0, (a, b, "".join(log))


def test_failing_jobs_retry_behind_the_jobs_that_have_not_started(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    """Every call fails (500) and is retried: a retry queues behind its account's
    waiting jobs like a new job, so all 10 jobs are tried before any is tried a third time
    (at the head of the list, two failing jobs kept eight fresh ones from starting)."""
    # Each call takes 0.2 s and each retry waits 0.5 s (Retry-After): a retry is due while
    # jobs that have not started still wait.
    sandbox.configure(rate_500=1.0, latency_s=0.2, retry_after_s=0.5)
    worker = start_worker(
        "retries",
        WORKER_CONCURRENCY="2",
        RUNWARE_MAX_RETRIES="4",
        RUNWARE_RETRY_BACKOFF_S="0.01",
        RUNWARE_RETRY_BACKOFF_MAX_S="0.05",
    )
    results = _send(worker, "A", 10, "batch")
    for result in results:  # every job fails in the end: 500 each time
        with pytest.raises(Exception, match="HTTP 500"):
            result.get(timeout=60)  # type: ignore[attr-defined]
    attempts: dict[str, int] = {}
    for _, _, uuids in sandbox.state.request_log:
        for task_uuid in uuids:
            attempts[task_uuid] = attempts.get(task_uuid, 0) + 1
            if attempts[task_uuid] == 3:
                assert len(attempts) == 10, f"a third try with only {len(attempts)} jobs tried"
    assert sorted(attempts.values()) == [5] * 10  # each tried 1 + RUNWARE_MAX_RETRIES times
