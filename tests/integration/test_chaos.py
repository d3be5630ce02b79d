"""Chaos, kept short: killed workers, a restarted Redis, a faulty API. Nothing is lost, nothing
is billed twice."""

from __future__ import annotations

import random
import re
import time
from typing import Any, cast

import pytest
import redis

from config.keys import FairKeys
from tests.conftest import (
    FAST_REDELIVERY,
    RunningWorker,
    StartWorker,
    assert_billed_once,
    worker_env,
)
from tests.load.common import ledger_micro
from tests.producer import backend_app
from workers.sandbox import Sandbox
from workers.sandbox.services import RedisServer, WorkerProcess

pytestmark = pytest.mark.slow  # real worker processes, seconds each: `-m 'not slow'` skips them


def _requests_behind(failures: list[str], sandbox: Sandbox) -> str:
    """The failures, and every request that carried their taskUUIDs (time, fault, size)."""
    lines = list(failures)
    for failure in failures:
        for uuid in re.findall(r"[0-9a-f]{8}-[0-9a-f-]{27}", failure)[:1]:
            for at, fault, carried in sandbox.state.request_log:
                if uuid in carried:
                    lines.append(f"  {uuid}: {at:.3f} fault={fault or '-'} tasks={len(carried)}")
    return "\n".join(lines)


def test_sigkill_with_jobs_in_flight(start_worker: StartWorker, sandbox: Sandbox) -> None:
    sandbox.configure(latency_s=1.0)
    settings = {**FAST_REDELIVERY, "RUNWARE_TIMEOUT_S": "3", "WORKER_CONCURRENCY": "24"}
    doomed = start_worker("chaos-kill", **settings)
    pending = [doomed.send(prompt=f"kill {n}") for n in range(30)]
    deadline = time.monotonic() + 20
    while len(sandbox.state.accepted) < 24:  # 24 tasks at Runware (in fewer requests), unanswered
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # Kill with every thread busy; kills while a worker fills its threads, and the instant
    # between kombu's BRPOP and its unacked write, are test_sigkill_at_any_instant_loses_nothing's.
    time.sleep(0.3)
    doomed.process.kill()  # SIGKILL to the worker's whole process group
    start_worker("chaos-heir", same_db_as=doomed, **settings)
    results = [p.get(timeout=120) for p in pending]
    assert len(results) == 30
    assert_billed_once(sandbox, results, ledger=ledger_micro(doomed.redis_url))


def _holder(client: redis.Redis, live: list[RunningWorker]) -> RunningWorker:
    """The live worker that holds the dispatcher lock (its value is "hostname:PID:..."); after
    the holder is killed, the lock names it until it expires and another worker takes it."""
    deadline = time.monotonic() + 15
    while True:
        value = client.get(FairKeys("enhance").dispatcher)
        text = value.decode() if isinstance(value, bytes) else str(value or "")
        pid = int(text.rsplit(":", 2)[1]) if text else None
        holder = next((w for w in live if w.process.pid == pid), None)
        if holder is not None:
            return holder
        assert time.monotonic() < deadline, f"no live worker holds the dispatcher lock ({value!r})"
        time.sleep(0.05)


def test_sigkill_at_any_instant_loses_nothing(start_worker: StartWorker, sandbox: Sandbox) -> None:
    """Two workers of 6 threads under a fleet rate; 4 SIGKILLs, each followed by a new worker:
    a worker that is not the dispatcher, then twice the new worker within 0.3 s of it becoming
    ready (while it fills its threads), then the dispatcher's holder. And since a random kill
    rarely lands between kombu's BRPOP and its unacked write, that instant is played out too:
    a consumer takes a granted job from the ready queue and vanishes. Every job completes, each
    taskUUID is billed once, and the dispatcher recovers that job, plus at most one per kill."""
    sandbox.configure(latency_s=1.0)  # 8 calls in flight: after a kill, 6 threads are too few
    settings = {
        **FAST_REDELIVERY,
        "RUNWARE_TIMEOUT_S": "3",
        "WORKER_CONCURRENCY": "6",
        "RUNWARE_RATE_LIMIT": "8",
    }
    first = start_worker("sigkill", **settings)
    live = [first, start_worker("sigkill", same_db_as=first, **settings)]
    started = list(live)
    client = redis.Redis.from_url(first.redis_url)
    rng = random.Random(7)
    pending = [first.send(prompt=f"sigkill {n}") for n in range(60)]

    # The vanished consumer: a BRPOP on the ready queue, as by a worker killed right after it.
    assert client.brpop([FairKeys("enhance").ready], timeout=20) is not None

    def replace(victim: RunningWorker) -> RunningWorker:
        victim.process.kill()  # SIGKILL to the worker's whole process group
        live.remove(victim)
        _holder(client, live)  # a dispatcher runs: the new worker is fed from its first instant
        heir = start_worker("sigkill", same_db_as=first, **settings)
        live.append(heir)
        started.append(heir)
        return heir

    deadline = time.monotonic() + 20
    while len(sandbox.state.accepted) < 10:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    holder = _holder(client, live)
    fresh = replace(next(w for w in live if w is not holder))
    for _ in range(2):  # the new worker, while it fills its threads
        time.sleep(rng.uniform(0.05, 0.3))
        fresh = replace(fresh)
    replace(_holder(client, live))

    results = [p.get(timeout=90) for p in pending]  # type: ignore[attr-defined]
    assert len(results) == 60
    assert_billed_once(sandbox, results, ledger=ledger_micro(first.redis_url))
    logs = "".join(w.process.log() for w in started)
    recovered = sum(int(n) for n in re.findall(r"(\d+) granted job\(s\) were lost", logs))
    assert 1 <= recovered <= 1 + 4, recovered  # the vanished consumer's, at most 1 per kill
    client.close()


def test_redis_restarts_mid_run(sandbox: Sandbox) -> None:
    """Redis (append-only) restarted while a rate-limited worker has idle threads: the same
    worker recovers and every job completes. (kombu, closing a channel whose connection is
    gone, raised an AttributeError that stopped the worker: config/transport.py.)"""
    sandbox.configure(latency_s=0.2)
    server = RedisServer(appendonly=True).start()
    env = worker_env(server.url(0), sandbox, WORKER_CONCURRENCY="8", RUNWARE_RATE_LIMIT="10")
    worker = WorkerProcess(env, name="chaos-redis").start()
    producer = backend_app(broker=server.url(0), backend=server.url(0))
    try:
        pending = [
            producer.send_task("tasks.enhance_prompt", kwargs={"prompt": f"restart {n}"})
            for n in range(40)
        ]
        deadline = time.monotonic() + 30
        while len(sandbox.state.accepted) < 8:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        server.stop()  # SIGTERM: Redis writes its append-only file and exits
        time.sleep(1.0)
        server.start()
        # The worker's recovery is what is tested: wait for every result to be stored (Celery's
        # own client re-reads stored results before it subscribes again after a restart, so a
        # result stored in between would only reach a plain `.get()` late), then read them.
        keys = [f"celery-task-meta-{p.id}" for p in pending]
        reader = redis.Redis.from_url(server.url(0))
        deadline = time.monotonic() + 100
        stored = 0
        while stored < len(keys) and time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                stored = sum(1 for m in reader.mget(keys) if m)
            except redis.ConnectionError:
                continue
        if stored < len(keys):
            missing = [p.id for p, m in zip(pending, reader.mget(keys), strict=True) if not m]
            where = {task_id: _where_is(reader, task_id) for task_id in missing}
            pytest.fail(
                f"{stored} of 40 results stored after the restart, "
                f"{len(sandbox.state.accepted)} calls accepted; the missing jobs are in {where}; "
                f"the worker's log ends: {worker.log()[-3000:]}"
            )
        reader.close()
        metas = [producer.backend.get_task_meta(p.id) for p in pending]
        assert {m["status"] for m in metas} == {"SUCCESS"}
        results = [m["result"] for m in metas]
        assert len(results) == 40
        assert_billed_once(sandbox, results, ledger=ledger_micro(server.url(0)))
        assert worker.process is not None
        assert worker.process.poll() is None  # the same worker, never restarted
    finally:
        producer.close()
        worker.stop()
        server.cleanup()


def _where_is(client: redis.Redis, task_id: str) -> list[str]:
    """The keys of a (small) test database whose value holds `task_id`: where a job waits."""
    found, needle, db = [], task_id.encode(), cast(Any, client)  # (its replies are bytes)
    for key in db.scan_iter(count=1000):
        kind, values = db.type(key), []
        if kind == b"list":
            values = db.lrange(key, 0, -1)
        elif kind == b"hash":
            values = [field + b" " + value for field, value in db.hgetall(key).items()]
        elif kind == b"set":
            values = list(db.smembers(key))
        elif kind == b"zset":
            values = db.zrange(key, 0, -1)
        elif kind == b"string":
            values = [db.get(key) or b""]
        if any(needle in value for value in values):
            found.append(key.decode(errors="replace"))
    return found


def test_a_faulty_api(start_worker: StartWorker, sandbox: Sandbox) -> None:
    """10% 429, 5% 503, 5% 500, 2% hangs past the client timeout, 2% garbage, 200 jobs."""
    sandbox.configure(
        rate_429=0.10, rate_503=0.05, rate_500=0.05, rate_hang=0.02, rate_garbage=0.02, hang_s=1.5
    )
    worker = start_worker("chaos-faults", RUNWARE_MAX_RETRIES="10", WORKER_CONCURRENCY="32")
    pending = [worker.send(prompt=f"faulty {n}") for n in range(200)]
    results, failures = [], []
    for job in pending:
        try:
            results.append(job.get(timeout=180))
        except Exception as exc:
            failures.append(str(exc))
    assert not failures, _requests_behind(failures, sandbox)
    assert len(results) == 200
    assert_billed_once(sandbox, results, ledger=ledger_micro(worker.redis_url))
    statuses = sandbox.state.statuses
    assert statuses.get("429", 0) + statuses.get("503", 0) + statuses.get("500", 0) > 0
    # One retry for each task a faulted request carried (submissions and polls alike), and
    # none for anything else.
    retries = worker.process.log().count("will retry")
    faulted = sum(len(uuids) for _, fault, uuids in sandbox.state.request_log if fault)
    assert retries == faulted > 0
    assert ledger_micro(worker.redis_url) == sandbox.state.billed_micro == 200 * 1300
