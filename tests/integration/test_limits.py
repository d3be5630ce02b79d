"""The fleet-wide limits with real worker processes, counted by the sandbox."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import redis

from tests.conftest import StartWorker, assert_billed_once, worker_env
from tests.load.common import max_in_window
from tests.producer import backend_app
from workers.sandbox import Sandbox
from workers.sandbox.services import RedisServer, WorkerProcess

pytestmark = pytest.mark.slow  # real worker processes, seconds each: `-m 'not slow'` skips them


def _wait_for(predicate: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_one_rate_for_two_workers(start_worker: StartWorker, sandbox: Sandbox) -> None:
    # (one task a request: a job late to its call could share the next grant's request)
    first = start_worker("rate", RUNWARE_RATE_LIMIT="10/s", RUNWARE_BATCH_MAX="1")
    start_worker("rate", same_db_as=first, RUNWARE_RATE_LIMIT="10/s", RUNWARE_BATCH_MAX="1")
    pending = [first.send(prompt=f"rate {n}") for n in range(30)]
    assert all(p.get(timeout=60)["text"] for p in pending)
    times = sorted(sandbox.state.call_times)
    assert len(times) == 30
    assert max_in_window(times) <= 10 + 1  # the rate plus the burst of 1
    observed = (len(times) - 1) / (times[-1] - times[0])
    assert observed <= 10 * 1.03


def test_in_flight_cap_across_two_workers(start_worker: StartWorker, sandbox: Sandbox) -> None:
    sandbox.configure(latency_s=0.3)
    # (one task a request: the cap counts jobs, the sandbox requests)
    first = start_worker("cap", RUNWARE_MAX_IN_FLIGHT="3", RUNWARE_BATCH_MAX="1")
    start_worker("cap", same_db_as=first, RUNWARE_MAX_IN_FLIGHT="3", RUNWARE_BATCH_MAX="1")
    pending = [first.send(prompt=f"cap {n}") for n in range(24)]
    assert all(p.get(timeout=60)["text"] for p in pending)
    assert sandbox.state.max_in_flight == 3


def test_waiting_for_the_limit_holds_no_thread_and_uses_no_retries(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    """With no retry budget at all and one thread, 10 jobs at 4/s wait in Redis (not in the
    worker: nothing is re-scheduled) and all succeed: waiting is not failing."""
    worker = start_worker(
        "wait", RUNWARE_RATE_LIMIT="4/s", RUNWARE_MAX_RETRIES="0", WORKER_CONCURRENCY="1"
    )
    pending = [worker.send(prompt=f"wait {n}") for n in range(10)]
    results = [p.get(timeout=60) for p in pending]
    assert_billed_once(sandbox, results)
    assert sandbox.state.requests == 10
    assert "re-scheduled" not in worker.process.log()
    assert max_in_window(sandbox.state.call_times) <= 4 + 1


def test_a_429_pauses_the_whole_fleet(start_worker: StartWorker, sandbox: Sandbox) -> None:
    worker = start_worker(
        "cool",
        RUNWARE_COOLDOWN_S="1.0",
        RUNWARE_COOLDOWN_MAX_S="5",
        WORKER_CONCURRENCY="4",
        RUNWARE_BATCH_MAX="1",  # one task per request, so that requests count jobs
    )
    # A process's first call goes alone (its key is tried once): made here, before the 429.
    assert worker.send(prompt="cool warm-up").get(timeout=30)["text"]  # type: ignore[attr-defined]
    sandbox.state.reset()
    sandbox.configure(latency_s=0.1, fail_next=["429"])
    pending = [worker.send(prompt=f"cool {n}") for n in range(12)]
    assert all(p.get(timeout=60)["text"] for p in pending)
    (throttled,) = sandbox.state.throttled_at
    during = [t for t in sandbox.state.call_times if throttled + 0.1 < t < throttled + 0.9]
    assert during == []
    assert len(sandbox.state.call_times) == 13  # every job, plus the one throttled call


def test_limits_change_at_run_time(start_worker: StartWorker, sandbox: Sandbox) -> None:
    sandbox.configure(latency_s=0.2)
    worker = start_worker("live", RUNWARE_BATCH_MAX="1")  # (the cap counts jobs, not requests)
    env = {**os.environ, "REDIS_URL": worker.redis_url}
    cli = [sys.executable, "-m", "workers.cli", "limits", "global"]
    subprocess.run([*cli, "--max-in-flight", "1"], env=env, check=True, timeout=30)
    pending = [worker.send(prompt=f"live {n}") for n in range(6)]
    assert all(p.get(timeout=60)["text"] for p in pending)
    assert sandbox.state.max_in_flight == 1
    subprocess.run([*cli, "--reset"], env=env, check=True, timeout=30)
    sandbox.state.reset()
    pending = [worker.send(prompt=f"free {n}") for n in range(6)]
    assert all(p.get(timeout=60)["text"] for p in pending)
    assert sandbox.state.max_in_flight > 1


def test_a_killed_workers_slots_come_back(start_worker: StartWorker, sandbox: Sandbox) -> None:
    sandbox.configure(latency_s=30.0)  # the calls hang while their worker dies
    settings = {
        "RUNWARE_MAX_IN_FLIGHT": "2",
        # (long enough to count the slots after the kill on a loaded machine; the heir's job
        # waits for them to expire)
        "RUNWARE_LEASE_S": "5",
        "RUNWARE_TIMEOUT_S": "60",
        "RUNWARE_BATCH_MAX": "1",  # (two requests in flight, not one shared)
    }
    doomed = start_worker("doomed", **settings)
    doomed.send(prompt="hang one")
    doomed.send(prompt="hang two")
    _wait_for(lambda: sandbox.state.in_flight == 2)
    doomed.process.kill()
    leases = redis.Redis.from_url(doomed.redis_url)
    assert leases.zcard("enhance:fair:leases") == 2
    sandbox.configure(latency_s=0.0)
    sandbox.state.reset()
    heir = start_worker("heir", same_db_as=doomed, **settings)
    result = heir.send(prompt="after the crash").get(timeout=30)
    assert result["text"]
    _wait_for(lambda: leases.zcard("enhance:fair:leases") == 0)
    leases.close()


def test_no_flood_while_the_limiter_redis_is_down(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    limiter_redis = RedisServer().start()
    try:
        worker = start_worker(
            "down", LIMITER_REDIS_URL=limiter_redis.url(0), RUNWARE_RATE_LIMIT="50/s"
        )
        assert worker.send(prompt="before").get(timeout=30)["text"]
        limiter_redis.stop()
        sandbox.state.reset()
        pending = [worker.send(prompt=f"during {n}") for n in range(5)]
        time.sleep(1.5)
        assert sandbox.state.requests == 0  # nothing went through without a grant
        limiter_redis.start()
        assert all(p.get(timeout=60)["text"] for p in pending)
        assert sandbox.state.tasks_received == 5  # each job's call once (requests may be shared)
        assert "s Redis is unreachable (ConnectionError); holding calls" in worker.process.log()
    finally:
        limiter_redis.cleanup()


def test_pools_follow_the_concurrency_the_worker_runs_with(
    redis_server: RedisServer, sandbox: Sandbox
) -> None:
    """`-c 80` overrides WORKER_CONCURRENCY=2: the Redis pools must have room for 80 threads
    at once (sized from 2 they ran out: spurious transient errors and retries)."""
    sandbox.configure(latency_s=0.5)
    url = redis_server.url(57)
    env = worker_env(url, sandbox, WORKER_CONCURRENCY="2", RUNWARE_BATCH_MAX="1")
    worker = WorkerProcess(env, name="wide", extra_args=["-c", "80"]).start()
    producer = backend_app(broker=url, backend=url)
    try:
        pending = [
            producer.send_task("tasks.enhance_prompt", kwargs={"prompt": f"wide {n}"})
            for n in range(80)
        ]
        assert all(p.get(timeout=60)["text"] for p in pending)
        assert sandbox.state.max_in_flight >= 40  # the 80 threads really ran at once
        assert sandbox.state.requests == 80  # not one retry
        assert "80 threads, Redis pools of 100 connections" in worker.log()
        assert "Too many connections" not in worker.log()
        assert "will retry" not in worker.log()
    finally:
        producer.close()
        worker.stop()


def test_the_rate_counts_tasks_with_retries_and_polls(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    """The limit counts tasks, not requests: with several tasks per request, retries (two
    injected 500s) and async polls (getResponse), no second carries more than the rate's
    worth of task objects."""
    worker = start_worker(
        "tasks-rate", RUNWARE_RATE_LIMIT="5/s", RUNWARE_BATCH_MAX="10", WORKER_CONCURRENCY="8"
    )
    sandbox.configure(fail_next=["500", "500"], async_delay_s=0.3)
    pending = [worker.send(prompt=f"counted {n}", deliveryMethod="async") for n in range(12)]
    assert all(p.get(timeout=90)["text"] for p in pending)
    tasks_at = [at for at, _, uuids in sandbox.state.request_log for _ in uuids]
    assert sandbox.state.by_type.get("getResponse", 0) >= 12  # every job polled at least once
    assert len(tasks_at) >= 12 + 12 + 2  # submissions, polls and the two retried
    assert max_in_window(tasks_at) <= 5 + 1


def test_the_cool_down_pauses_every_worker_process(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    """Two worker processes, both busy; one call is throttled (429). During the pause no new
    call leaves either process: it is fleet-wide, not the throttled process's. (A count in a
    window after an event: a slow machine can only make it smaller.)"""
    settings = {
        "RUNWARE_COOLDOWN_S": "0.6",
        "RUNWARE_COOLDOWN_MAX_S": "0.6",
        "WORKER_CONCURRENCY": "2",
        "RUNWARE_BATCH_MAX": "1",
    }
    first = start_worker("cool", **settings)
    second = start_worker("cool", same_db_as=first, **settings)
    sandbox.configure(latency_s=0.05, fail_next=["none"] * 6 + ["429"])
    pending = [w.send(prompt=f"cool {n}") for n in range(12) for w in (first, second)]
    assert all(p.get(timeout=60)["text"] for p in pending)
    (throttled,) = sandbox.state.throttled_at
    during = [t for t, _, _ in sandbox.state.request_log if throttled < t < throttled + 0.55]
    # Only calls granted before the 429 was heard (at most the other three threads') arrive
    # in the pause; unpaused, the other process alone would have made about ten.
    assert len(during) <= 3, [round(t - throttled, 3) for t in during]


def test_a_killed_dispatchers_role_is_taken_over_by_its_lock_expiring(
    start_worker: StartWorker,
) -> None:
    """SIGKILL leaves the dispatcher's lock behind (no clean exit deletes it): the role passes
    to the other worker once the lock expires (LOCK_MS, 3 s), and jobs flow again."""
    first = start_worker("holder")
    second = start_worker("heir", same_db_as=first)
    client = redis.Redis.from_url(first.redis_url)
    lock = "enhance:fair:dispatcher"
    _wait_for(lambda: client.get(lock) is not None)
    held = client.get(lock) or b""
    holder = next(w for w in (first, second) if f":{w.process.pid}:".encode() in held)
    other = second if holder is first else first
    holder.process.kill()
    assert client.get(lock) is not None  # left behind
    _wait_for(lambda: f":{other.process.pid}:".encode() in (client.get(lock) or b""), 10)
    assert other.send(prompt="after the takeover").get(timeout=30)["text"]  # type: ignore[attr-defined]
    client.close()
