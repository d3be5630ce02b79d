"""Sharing Redis with other software: another Celery app with its own worker and Celery's
default queue beside the fleet, each gets all of its own jobs done and never sees the other's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import redis
from celery import Celery

from config.keys import FairKeys
from tests.conftest import StartWorker, run_cli, worker_env
from tests.producer import backend_app
from workers.sandbox import Sandbox
from workers.sandbox.services import RedisServer, WorkerProcess


def _start_other_worker(url: str, log: Path) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "celery", "-A", "tests.integration.other_app", "worker",
        "--pool", "threads", "-c", "4", "--without-mingle", "--without-gossip",
        "--hostname", "otherapp@%h", "--loglevel", "INFO",
    ]  # fmt: skip
    with log.open("ab") as out:
        process = subprocess.Popen(
            command,
            env={**os.environ, "OTHER_APP_REDIS_URL": url},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 30
    while " ready." not in log.read_text(errors="replace"):
        assert process.poll() is None, log.read_text(errors="replace")[-2000:]
        assert time.monotonic() < deadline, "the other app's worker was not ready in 30 s"
        time.sleep(0.1)
    return process


def test_another_celery_app_on_the_same_redis_keeps_its_jobs_and_we_keep_ours(
    start_worker: StartWorker,
) -> None:
    ours = start_worker("neighbour")
    log = Path(tempfile.mkstemp(prefix="otherapp-", suffix=".log")[1])
    other_worker = _start_other_worker(ours.redis_url, log)
    theirs_app = Celery("otherapp", broker=ours.redis_url, backend=ours.redis_url)
    try:
        theirs = [theirs_app.send_task("otherapp.add", args=[n, n]) for n in range(50)]
        mine = [ours.send(prompt=f"a lighthouse, neighbour {n}") for n in range(50)]
        assert [r.get(timeout=90) for r in theirs] == [2 * n for n in range(50)]
        done = [r.get(timeout=90) for r in mine]  # type: ignore[attr-defined]
        assert len({d["taskUUID"] for d in done}) == 50
    finally:
        theirs_app.close()
        other_worker.terminate()
        other_worker.wait(timeout=20)
    assert "unregistered task" not in log.read_text(errors="replace")
    assert "unregistered task" not in ours.process.log()


def test_messages_no_worker_could_read_go_to_the_dead_letters_and_no_worker_dies(
    start_worker: StartWorker,
) -> None:
    """A non-JSON string and an envelope without `properties` on the fleet's queue (kombu raises
    on both outside any recoverable error: a worker that took one exited): both are filed in the
    dead letters with their reason before any worker sees them, every worker stays up, and the
    next 20 jobs are done."""
    first = start_worker("unreadable")
    second = start_worker("unreadable", same_db_as=first)
    client = redis.Redis.from_url(first.redis_url)
    client.lpush("enhance", b"this is not a message")
    client.lpush(
        "enhance", json.dumps({"body": "e30=", "headers": {"task": "tasks.enhance_prompt"}})
    )
    client.close()
    done = [first.send(prompt=f"after the garbage {n}") for n in range(20)]
    assert len({r.get(timeout=60)["taskUUID"] for r in done}) == 20  # type: ignore[attr-defined]
    for worker in (first, second):
        assert worker.process.process is not None
        assert worker.process.process.poll() is None, worker.process.log()[-2000:]
    listed = json.loads(run_cli(first.redis_url, "failed", "list", "--json", check=True).stdout)
    reasons = sorted(e["reason"] for e in listed)
    assert len(reasons) == 2, listed
    assert reasons[0].startswith("UnreadableMessage: no `properties` object in the envelope")
    assert reasons[1].startswith("UnreadableMessage: not JSON")
    assert {e["task"] for e in listed} == {"tasks.enhance_prompt", "(unreadable message)"}
    assert any(e["message"] == "this is not a message" for e in listed)


def test_a_worker_that_meets_an_unreadable_message_in_the_ready_queue_survives_it(
    start_worker: StartWorker,
) -> None:
    """The same two messages pushed straight onto the ready queue, past the dispatcher: the
    worker that pops one hands it to the dead letters and goes on (kombu's parsing raised
    outside any recoverable error, and the worker exited)."""
    first = start_worker("ready-garbage")
    second = start_worker("ready-garbage", same_db_as=first)
    client = redis.Redis.from_url(first.redis_url)
    ready = FairKeys("enhance").ready
    client.lpush(ready, b"not a message either")
    client.lpush(ready, json.dumps({"body": "e30=", "headers": {"task": "tasks.enhance_prompt"}}))
    deadline = time.monotonic() + 10
    while client.llen(ready) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.llen(ready) == 0, "no worker took the messages"
    client.close()
    done = [first.send(prompt=f"after the ready garbage {n}") for n in range(20)]
    assert len({r.get(timeout=60)["taskUUID"] for r in done}) == 20  # type: ignore[attr-defined]
    for worker in (first, second):
        assert worker.process.process is not None
        assert worker.process.process.poll() is None, worker.process.log()[-2000:]
    deadline = time.monotonic() + 15  # filed by the dispatcher at its next heartbeat
    while True:
        out = run_cli(first.redis_url, "failed", "list", "--json", check=True).stdout
        listed = json.loads(out)
        if len(listed) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    reasons = sorted(e["reason"] for e in listed)
    assert len(reasons) == 2, listed
    assert reasons[0].startswith("UnreadableMessage: no `properties` object in the envelope")
    assert reasons[1].startswith("UnreadableMessage: not JSON")
    logs = first.process.log() + second.process.log()
    assert "was set aside for the dead letters" in logs


def _parked(url: str) -> list[dict[str, object]]:
    out = run_cli(url, "unknown", "list", "--json", check=True).stdout
    return sorted(json.loads(out), key=lambda row: str(row["task"]))


def test_jobs_of_a_task_no_worker_registers_are_parked_and_go_back_once_one_does(
    sandbox: Sandbox,
) -> None:
    """Jobs of tasks no worker of the fleet registers, on the fleet's queue (another app's job
    routed there by mistake, and one sent before the worker that knows it is deployed), are
    parked, not failed as unregistered. A worker that registers the one task joins: its jobs go
    back by themselves and are done (some land first on the worker that does not know it,
    which puts them back). The other app's jobs are moved to its queue and its worker does
    them: nothing of anyone's is lost."""
    with RedisServer() as server:
        url = server.url(0)
        plain = WorkerProcess(worker_env(url, sandbox), name="plain").start()
        producer = backend_app(broker=url, backend=url)
        log = Path(tempfile.mkstemp(prefix="otherapp-", suffix=".log")[1])
        other: subprocess.Popen[bytes] | None = None
        extra: WorkerProcess | None = None
        try:
            doubles = [
                producer.send_task("tests.extra.double", args=[n], queue="enhance")
                for n in range(1, 4)
            ]
            adds = [
                producer.send_task("otherapp.add", args=[n, n], queue="enhance") for n in range(3)
            ]
            deadline = time.monotonic() + 20
            while _parked(url) != [
                {"task": "otherapp.add", "queue": "enhance", "jobs": 3},
                {"task": "tests.extra.double", "queue": "enhance", "jobs": 3},
            ]:
                assert time.monotonic() < deadline, _parked(url)
                time.sleep(0.3)
            assert "unregistered task" not in plain.log()
            assert all(r.state == "PENDING" for r in doubles + adds)  # not failed

            include = ["--include", "tests.integration.extra_tasks"]
            extra = WorkerProcess(worker_env(url, sandbox), name="extra", extra_args=include)
            extra.start()
            assert [r.get(timeout=60) for r in doubles] == [2, 4, 6]
            assert _parked(url) == [{"task": "otherapp.add", "queue": "enhance", "jobs": 3}]

            moved = run_cli(url, "unknown", "move", "--task", "otherapp.add", "--to", "celery")
            assert moved.stdout.strip() == "moved 3 job(s)"
            other = _start_other_worker(url, log)
            assert [r.get(timeout=60) for r in adds] == [0, 2, 4]
            assert _parked(url) == []
        finally:
            producer.close()
            if other is not None:
                other.terminate()
                other.wait(timeout=20)
            if extra is not None:
                extra.stop()
            plain.stop()
        logs = plain.log() + (extra.log() if extra else "")
        assert "unregistered task" not in logs
        assert "unregistered task" not in log.read_text(errors="replace")


def test_a_worker_reading_other_queues_that_holds_the_role_still_serves_ours(
    sandbox: Sandbox,
) -> None:
    """A worker started with `-Q video` first holds the dispatcher role; a normal worker joins.
    The dispatcher serves the union of the live workers' queues: 30/30 jobs sent to `enhance`
    are done, and nothing waits unread."""
    with RedisServer() as server:
        url = server.url(0)
        video = WorkerProcess(worker_env(url, sandbox), name="qvideo", extra_args=["-Q", "video"])
        video.start()
        normal = WorkerProcess(worker_env(url, sandbox), name="qnormal").start()
        client = redis.Redis.from_url(url)
        producer = backend_app(broker=url, backend=url)
        try:
            holder = client.get("enhance:fair:dispatcher") or b""
            assert f":{video.pid}:".encode() in holder  # the -Q video worker pumps
            sent = [
                producer.send_task("tasks.enhance_prompt", kwargs={"prompt": f"union {n}"})
                for n in range(30)
            ]
            assert len({r.get(timeout=60)["taskUUID"] for r in sent}) == 30
        finally:
            producer.close()
            client.close()
            normal.stop()
            video.stop()
        assert "serves them all: queues video, enhance" in video.log()


def test_a_producer_with_other_priority_steps_and_sep_is_served(start_worker: StartWorker) -> None:
    """Celery's documentation suggests `priority_steps` 0..9 and `sep` ':' for Redis: such a
    producer's priority-5 message lands in `enhance:5`, a list the workers' own layout never
    names. The dispatcher finds it within a heartbeat, serves it, and says why."""
    worker = start_worker("steps")
    client = redis.Redis.from_url(worker.redis_url)
    # A key of a name the dispatcher looks for, but not a list: never read as one.
    client.hset("enhance\x06\x161", "another app's", "hash")
    client.close()
    producer = backend_app(broker=worker.redis_url, backend=worker.redis_url)
    producer.conf.broker_transport_options = {
        "priority_steps": list(range(10)),
        "sep": ":",
        "queue_order_strategy": "priority",
    }
    try:
        result = producer.send_task(
            "tasks.enhance_prompt", kwargs={"prompt": "a fox in steps"}, priority=5
        )
        assert result.get(timeout=30)["text"]
    finally:
        producer.close()
    assert "'enhance:5'" in worker.process.log()
    assert "a producer sends with kombu `priority_steps` or `sep`" in worker.process.log()


def test_calls_sent_compressed_or_with_a_priority_the_fleet_refuses_are_never_ungranted(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    """Every Runware call is granted under its own account's limits: batch jobs of one account
    sent gzip-compressed reach Runware at that account's rate (read as the default account's,
    interactive, they went out together), and `tasks.reconcile_call` with `priority="high"`
    fails at once naming the field, with no getResponse call at Runware."""
    worker = start_worker("grants")
    run_cli(worker.redis_url, "limits", "set", "acct-z", "--rate", "2/s", check=True)
    producer = backend_app(broker=worker.redis_url, backend=worker.redis_url)
    try:
        sent = [
            producer.send_task(
                "tasks.enhance_prompt",
                kwargs={"prompt": f"compressed {n}", "account": "acct-z", "priority": "batch"},
                compression="gzip",
            )
            for n in range(6)
        ]
        done = [r.get(timeout=60) for r in sent]
        high = producer.send_task(
            "tasks.reconcile_call",
            kwargs={"taskUUID": "0f2d6c1e-9f5a-4bde-8a47-1b3c5d7e9f01", "priority": "high"},
        )
        with pytest.raises(Exception, match="priority") as failure:
            high.get(timeout=30)
    finally:
        producer.close()
    assert type(failure.value).__name__ == "ValidationError"
    reached = sorted(at for at, prompt in sandbox.state.accepted_log if "compressed" in prompt)
    assert len(reached) == 6 == len({d["taskUUID"] for d in done})
    # 2/s for acct-z only (the default account has no rate of its own): six calls span at
    # least 2.5 s (less a margin for timer granularity).
    assert reached[-1] - reached[0] >= 2.2, [round(t - reached[0], 3) for t in reached]
    logged = [uuids for _, _, uuids in sandbox.state.request_log]
    assert not any("0f2d6c1e-9f5a-4bde-8a47-1b3c5d7e9f01" in uuids for uuids in logged)
    assert "getResponse" not in sandbox.state.by_type
