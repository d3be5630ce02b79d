"""Redis Sentinel with real processes: a primary, a replica and three sentinels
(`redis-server --sentinel`), workers on the sentinel:// URL, and the primary SIGKILLed mid-run.
Sentinel promotes the replica; the broker, the result backend, the fair intake, the limits, the
ledger and the CLI follow it without a restart."""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from config.settings import load_settings
from enhance_client import wait
from tasks.ledger import Ledger
from tests.conftest import FAST_REDELIVERY, run_cli, wait_until, worker_env
from tests.load.common import ledger_micro, max_in_window, result_across_failover
from tests.producer import backend_app
from workers.sandbox import Sandbox
from workers.sandbox.services import RedisServer, SentinelGroup, WorkerProcess

pytestmark = pytest.mark.slow  # real worker processes, seconds each: `-m 'not slow'` skips them

MASTER = "enhance"
PRICE = 1300


@pytest.fixture
def group() -> Iterator[SentinelGroup]:
    started = SentinelGroup(MASTER).start()
    yield started
    started.cleanup()


def test_a_primary_killed_mid_run_loses_no_job_and_bills_nothing_twice(
    group: SentinelGroup, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs, rate = 200, 20
    sandbox.configure(latency_s=0.05)
    env = worker_env(
        group.url,
        sandbox,
        **FAST_REDELIVERY,
        REDIS_SENTINEL_MASTER=MASTER,
        REDIS_WAIT_REPLICAS="1",
        RUNWARE_RATE_LIMIT=str(rate),
        RUNWARE_MAX_RETRIES="10",
        RUNWARE_RECONCILE_S="2",
        RUNWARE_RETRY_AFTER_MAX_S="2",
        RUNWARE_POLL_MAX_INTERVAL_S="1",
        RUNWARE_RESERVATION_S="15",
        LOG_LEVEL="INFO",
    )
    workers = [WorkerProcess(env, name=f"sentinel{n}").start() for n in range(2)]
    # A producer as Celery documents it for Sentinel: nothing of this project's in it.
    producer = backend_app(broker=group.url, backend=group.url)
    producer.conf.broker_transport_options = {"master_name": MASTER}
    producer.conf.result_backend_transport_options = {"master_name": MASTER}
    try:
        results = [
            producer.send_task("tasks.enhance_prompt", kwargs={"prompt": f"failover {n}"})
            for n in range(jobs)
        ]
        wait_until(lambda: len(sandbox.state.accepted) >= jobs // 3, 60, "a third of the calls")
        killed = time.time()
        group.primary.process.kill()  # type: ignore[union-attr]
        deadline = time.monotonic() + 180
        outcomes = [result_across_failover(r, deadline) for r in results]
        assert group.replica is not None
        assert group.sentinels[0].master() == ("127.0.0.1", group.replica.port)
        # Every job done, each taskUUID accepted once, and nothing else accepted.
        assert all(isinstance(o, dict) and o.get("text") for o in outcomes)
        uuids = {o["taskUUID"] for o in outcomes}
        assert len(uuids) == jobs
        assert set(sandbox.state.accepted) == uuids
        assert sandbox.state.billed_micro == jobs * PRICE
        # The ledger, on the new primary, equals the bill once the unsettled calls are settled.
        client = redis.Redis(port=group.replica.port)
        wait_until(lambda: ledger_micro(client) == jobs * PRICE, 30, "ledger == bill")
        client.close()
        monkeypatch.setenv("REDIS_SENTINEL_MASTER", MASTER)  # the CLI follows the master too
        report = json.loads(run_cli(group.url, "cost", "--json", check=True).stdout)
        assert round(report["total_usd"] * 1_000_000) == jobs * PRICE
        # The waiting helpers find the new primary through the sentinels too.
        after = producer.send_task("tasks.enhance_prompt", kwargs={"prompt": "after the failover"})
        assert wait(after, timeout=60)["prompt"] == "after the failover"
        # The limit held through the failover: at most one second's worth of calls more.
        times = sandbox.state.call_times
        assert max_in_window(times) <= 2 * rate
        around = [t for t in times if killed - 5 <= t <= killed + 30]
        gaps = [b - a for a, b in itertools.pairwise(around)]
        assert max(gaps, default=0.0) < 30  # the fleet called again after the failover
    finally:
        producer.close()
        for worker in workers:
            worker.stop()


def test_a_recorded_cost_reaches_a_replica_before_the_job_is_acknowledged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Of the writes a failover can lose (the old primary acknowledged them, the replica never
    got them), the one that matters most is a call's recorded cost: a lost acknowledgement only
    runs the job again (it finds its record, or Runware answers 409 and getResponse recovers
    it), a lost reservation comes back as unsettled, but a lost record of a call whose job was
    acknowledged is spend no one would see. REDIS_WAIT_REPLICAS holds the job's end until a
    replica has it, and says so when none confirms in time."""
    primary = RedisServer().start()
    replica = RedisServer(
        args=("--replicaof", "127.0.0.1", str(primary.port), "--enable-debug-command", "yes")
    ).start()
    client = redis.Redis(port=primary.port)
    copy = redis.Redis(port=replica.port)
    try:
        wait_until(
            lambda: copy.info("replication")["master_link_status"] == "up", 15, "replicating"
        )
        settings = load_settings(
            _env_file=None, redis_wait_replicas=1, redis_wait_timeout_ms=300, key_prefix="w"
        )
        ledger = Ledger(client, settings)
        items = [{"text": "a fox", "cost": 0.0013}]
        with caplog.at_level(logging.WARNING, logger="tasks.ledger"):
            task = str(uuid.uuid4())
            ledger.begin(task, "a", 0.0013, "shape")
            ledger.end(task, "a", 0.0013, items)
            assert copy.get(f"w:ledger:task:{task}") is not None  # on the replica already
            assert "not confirmed" not in caplog.text
            # A replica that stops applying the stream (blocked for 1 s): the end says so.
            stall = threading.Thread(
                target=lambda: redis.Redis(port=replica.port).execute_command(  # type: ignore[no-untyped-call]
                    "DEBUG", "SLEEP", "1"
                )
            )
            stall.start()
            time.sleep(0.1)
            late = str(uuid.uuid4())
            ledger.begin(late, "a", 0.0013, "shape")
            ledger.end(late, "a", 0.0013, items)
            stall.join()
        assert f"The cost of taskUUID {late} is not confirmed by 1 replica(s)" in caplog.text
    finally:
        client.close()
        copy.close()
        replica.cleanup()
        primary.cleanup()
