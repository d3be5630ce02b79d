"""Operating it: Flower, the metrics endpoint, JSON logs and the CLI, each run for real."""

from __future__ import annotations

import base64
import html
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from tests.conftest import (
    SECRET,
    RunningWorker,
    StartWorker,
    metrics_port,
    run_cli,
    scrape_metrics,
    wait_until,
)
from tests.producer import backend_app
from workers.sandbox import Sandbox
from workers.sandbox.services import RedisServer, free_port, terminate

FLOWER_AUTH = ("ops", "pw-flower-7e2a")
FLOWER_SECOND = ("oncall", "pw-second-51c9")  # several users, comma-separated
WEBHOOK_TOKEN = "wh-token-3b8d2f"
FLOWER = (sys.executable, "-m", "celery", "-A", "workers", "flower")


def _start_flower(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    """Flower on a free port; on another when the port was taken before Flower bound it
    (free_port releases it), which Flower answers by exiting."""
    for _ in range(3):
        port = free_port()
        process = subprocess.Popen(
            [*FLOWER, f"--port={port}", "--address=127.0.0.1"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while process.poll() is None:
            try:
                if requests.get(f"{url}/healthcheck", timeout=1).ok:
                    return process, url
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "Flower did not start"
            time.sleep(0.1)
    raise AssertionError("Flower exited at start three times")


@pytest.fixture
def flower(start_worker: StartWorker) -> Iterator[tuple[RunningWorker, str]]:
    worker = start_worker("flowered")
    users = ",".join(":".join(pair) for pair in (FLOWER_AUTH, FLOWER_SECOND))
    env = {**os.environ, "REDIS_URL": worker.redis_url, "FLOWER_BASIC_AUTH": users}
    process, url = _start_flower(env)
    deadline = time.monotonic() + 60
    # Flower subscribes to the event stream just after it serves: a probe job it shows as done
    # proves it hears the events (a fixed sleep raced it). Any probe counts: a job's events
    # reach Flower a moment after its result (the worker publishes them up to 10 ms later).
    probes: list[Any] = []
    try:
        while True:
            if len(probes) < 60:  # one sent before Flower listened is never shown: another
                probes.append(worker.send(prompt="flower probe"))
                probes[-1].get(timeout=30)
            time.sleep(0.1)
            seen = requests.get(f"{url}/api/tasks", auth=FLOWER_AUTH, timeout=5).json()
            if any(seen.get(p.id, {}).get("state") == "SUCCESS" for p in probes):
                break
            assert time.monotonic() < deadline, "Flower never showed a probe job"
        yield worker, url
    finally:  # also when Flower never showed a probe: no Flower outlives its test
        terminate(process, timeout=20)  # SIGKILL if it lingers (it can, once its Redis is gone)


def test_flower_lists_jobs_that_still_wait_in_the_fair_intake(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    """200 jobs from a plain producer (no task-sent events of its own) queued at 2/s: Flower
    knows all 200 while nearly all of them still wait, from the task-sent events the fleet
    sends as it takes each job in, with their (masked) arguments."""
    worker = start_worker("flower-backlog", RUNWARE_RATE_LIMIT="2/s")
    env = {**os.environ, "REDIS_URL": worker.redis_url, "FLOWER_BASIC_AUTH": ":".join(FLOWER_AUTH)}
    process, url = _start_flower(env)
    producer = backend_app(broker=worker.redis_url, backend=worker.redis_url)
    try:
        # Flower subscribes to the events just after it serves: probe until it hears one.
        deadline = time.monotonic() + 30
        probes = [producer.send_task("tasks.enhance_prompt", kwargs={"prompt": "probe"}).id]
        while not set(probes) & set(
            requests.get(f"{url}/api/tasks", auth=FLOWER_AUTH, timeout=5).json()
        ):
            assert time.monotonic() < deadline, "Flower never heard of a probe job"
            time.sleep(0.5)
            probes.append(producer.send_task("tasks.enhance_prompt", kwargs={"prompt": "probe"}).id)
        hook = f"http://127.0.0.1:9/hook?token={WEBHOOK_TOKEN}"
        sent = [
            producer.send_task(
                "tasks.enhance_prompt",
                kwargs={"prompt": f"waiting {n}", "account": "backlog", "webhookURL": hook},
            )
            for n in range(200)
        ]
        deadline = time.monotonic() + 30
        while True:
            known = requests.get(f"{url}/api/tasks", auth=FLOWER_AUTH, timeout=10).json()
            if all(r.id in known for r in sent):
                break
            assert time.monotonic() < deadline, f"Flower knows {len(known)} jobs"
            time.sleep(0.5)
        ran = len([t for t in sandbox.state.accepted_log if "waiting" in t[1]])
        assert ran < 40, f"{ran} of 200 already ran: not a backlog"
        states = [known[r.id]["state"] for r in sent]
        assert states.count("PENDING") + states.count("SENT") >= 150, states
        shown = known[sent[-1].id]
        assert shown["name"] == "tasks.enhance_prompt"
        assert "waiting 199" in shown["kwargs"]
        assert WEBHOOK_TOKEN not in json.dumps(known)
    finally:
        producer.close()
        terminate(process, timeout=20)


def test_flower_shows_each_job_with_its_result(
    flower: tuple[RunningWorker, str], sandbox: Sandbox
) -> None:
    worker, url = flower
    done = [worker.send(prompt=f"flower {n}", promptVersions=2) for n in range(3)]
    hook = f"http://127.0.0.1:9/hook?token={WEBHOOK_TOKEN}"  # nothing listens on port 9
    done.append(worker.send(prompt="flower hooked", webhookURL=hook))
    values = [d.get(timeout=30) for d in done]
    sandbox.configure(fail_next=["400"])
    failed = worker.send(prompt="flower fails")
    with pytest.raises(Exception, match="HTTP 400"):
        failed.get(timeout=30)
    assert requests.get(f"{url}/api/tasks", timeout=5).status_code == 401
    wrong = (FLOWER_AUTH[0], FLOWER_AUTH[1] + "x")
    assert requests.get(f"{url}/api/tasks", auth=wrong, timeout=5).status_code == 401
    assert requests.get(f"{url}/api/tasks", auth=FLOWER_SECOND, timeout=5).status_code == 200
    deadline = time.monotonic() + 20
    while True:
        tasks = requests.get(f"{url}/api/tasks", auth=FLOWER_AUTH, timeout=5).json()
        if all(tasks.get(d.id, {}).get("state") == "SUCCESS" for d in done) and (
            tasks.get(failed.id, {}).get("state") == "FAILURE"
        ):
            break
        assert time.monotonic() < deadline, f"Flower shows {tasks}"
        time.sleep(0.2)
    for job, value in zip(done, values, strict=True):
        shown = tasks[job.id]
        assert shown["name"] == "tasks.enhance_prompt"
        assert value["text"] in shown["result"]
        assert f"'cost': {value['cost']}" in shown["result"]
        assert "flower" in shown["kwargs"]
        assert shown["received"]
        assert shown["succeeded"]
    assert "HTTP 400" in tasks[failed.id]["exception"]
    workers = requests.get(f"{url}/api/workers", auth=FLOWER_AUTH, timeout=10).text

    # Flower's broker view reads queue lengths with a client it picks by the broker URL's
    # scheme: the project's transport must keep kombu's `redis` scheme for it.
    # (It lists the queues the workers consume once it has asked them: wait for that.)
    def ready_queue_shown() -> bool:
        queues = requests.get(f"{url}/api/queues/length", auth=FLOWER_AUTH, timeout=10)
        assert queues.status_code == 200, queues.text
        return {"name": "enhance.ready", "messages": 0} in queues.json()["active_queues"]

    wait_until(ready_queue_shown, 30, "Flower's queue view of enhance.ready")
    # The webhook URL is shown with its query masked: the scanned text holds the kwargs (the
    # URL's host is there), not the token.
    shown_hook = tasks[done[-1].id]["kwargs"]
    assert "http://127.0.0.1:9/hook?<redacted>" in shown_hook
    everything = json.dumps(tasks) + workers
    assert "flower hooked" in everything  # what is not secret is there
    for secret in (SECRET, WEBHOOK_TOKEN, FLOWER_AUTH[1], FLOWER_SECOND[1]):
        assert secret not in everything


def test_metrics_after_a_run(start_worker: StartWorker, sandbox: Sandbox) -> None:
    # One task per request: the injected 400 then belongs to exactly one job.
    worker = start_worker("metrics", METRICS_PORT="0", RUNWARE_BATCH_MAX="1")
    port = metrics_port(worker)
    sandbox.configure(fail_next=["503", "400"], latency_s=0.05)
    pending = [worker.send(prompt=f"metric {n}", account="ops") for n in range(5)]
    outcomes = []
    for async_result in pending:
        try:
            async_result.get(timeout=30)
            outcomes.append("ok")
        except Exception:
            outcomes.append("failed")
    assert outcomes.count("ok") == 4
    # Celery stores a failure before it calls on_failure, which keeps the dead letter: a
    # client can see the failure first.
    dead = ("enhance_dead_letter_jobs", ())
    wait_until(lambda: scrape_metrics(port).get(dead) == 1, 30, "the dead letter counted")
    m = scrape_metrics(port)
    calls = "enhance_runware_calls_total"
    assert m[(calls, (("outcome", "ok"), ("task_type", "promptEnhance")))] == 4
    assert m[(calls, (("outcome", "http_503"), ("task_type", "promptEnhance")))] == 1
    assert m[(calls, (("outcome", "http_400"), ("task_type", "promptEnhance")))] == 1
    assert m[("enhance_spent_usd_total", (("account", "ops"),))] == pytest.approx(4 * 0.0013)
    latency = ("enhance_runware_call_duration_seconds_count", (("task_type", "promptEnhance"),))
    assert m[latency] == 6
    assert m[("enhance_runware_call_duration_seconds_sum", latency[1])] >= 6 * 0.05
    assert m[("enhance_runware_request_tasks_count", ())] == 6  # six requests, one task each
    assert m[("enhance_runware_request_tasks_sum", ())] == 6
    wait = (
        "enhance_rate_limit_wait_seconds_count",
        (("account", "ops"), ("priority", "interactive")),
    )
    assert m[wait] == 6
    jobs = "enhance_jobs_total"
    assert m[(jobs, (("outcome", "success"), ("task", "tasks.enhance_prompt")))] == 4
    assert m[(jobs, (("outcome", "failure"), ("task", "tasks.enhance_prompt")))] == 1
    assert m[("enhance_job_retries_total", (("task", "tasks.enhance_prompt"),))] == 1
    assert m[("enhance_dead_letters_total", (("task", "tasks.enhance_prompt"),))] == 1
    assert m[("enhance_queue_depth", (("queue", "enhance"),))] == 0
    assert m[("enhance_fleet_in_flight_calls", ())] == 0
    assert m[("enhance_dead_letter_jobs", ())] == 1
    assert m[("enhance_runware_in_flight_calls", ())] == 0


def test_waiting_jobs_show_in_the_gauges_while_they_wait(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    """Jobs that wait for their fair share sit in Redis, not in the Celery list: the queue
    depth (what KEDA scales on) and the per-account gauges must count them, while they wait.
    A rate of 1/h grants exactly one call (the burst), so every figure is known; lifting it
    at run time lets the rest go."""
    worker = start_worker(
        "gauges",
        METRICS_PORT="0",
        RUNWARE_RATE_LIMIT="1/h",
        WORKER_CONCURRENCY="2",
        RUNWARE_TIMEOUT_S="10",
    )
    port = metrics_port(worker)
    sandbox.configure(latency_s=4)  # the one granted call stays in flight while we look
    bulk = [worker.send(prompt=f"bulk {n}", account="bulk", priority="batch") for n in range(20)]
    later = worker.app.send_task(
        "tasks.enhance_prompt", kwargs={"prompt": "later", "account": "bulk"}, countdown=300
    )
    key = ("enhance_account_waiting_calls", (("account", "bulk"), ("priority", "batch")))
    wait_until(lambda: scrape_metrics(port).get(key) == 19, 30, "19 jobs waiting")
    wait_until(lambda: sandbox.state.in_flight == 1, 30, "the granted call at Runware")
    oldest = ("enhance_account_oldest_wait_seconds", key[1])
    first = scrape_metrics(port)[oldest]
    wait_until(lambda: scrape_metrics(port)[oldest] > first, 30, "the oldest wait grows")
    m = scrape_metrics(port)
    assert m[key] == 19
    assert m[("enhance_queue_depth", (("queue", "enhance"),))] == 19  # (the running one is not)
    assert m[("enhance_fleet_in_flight_calls", ())] == 1
    assert m[("enhance_runware_in_flight_calls", ())] == 1
    assert m[("enhance_delayed_jobs", ())] == 1  # the countdown waits in Redis
    sandbox.configure(latency_s=0.0)
    run_cli(worker.redis_url, "limits", "global", "--rate", "0", check=True)
    assert all(r.get(timeout=60)["text"] for r in bulk)
    later.revoke()
    m = scrape_metrics(port)
    assert m[("enhance_queue_depth", (("queue", "enhance"),))] == 0
    assert key not in m
    assert m[("enhance_fleet_in_flight_calls", ())] == 0


TASK_EVENTS = ("task-sent", "task-received", "task-started", "task-succeeded")


def _events_in(payload: bytes) -> list[dict[str, Any]]:
    """The task events in one published kombu message: one event, or a list (`task.multi`)."""
    envelope = json.loads(payload)
    body = json.loads(base64.b64decode(envelope["body"]))
    return body if isinstance(body, list) else [body]


def test_task_events_leave_together_and_none_is_lost(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    """60 jobs waiting when a worker of 8 threads starts: the dispatcher's first step takes them
    all in and grants 8. Every job's task-received, task-started and task-succeeded events are
    published, and the task-sent event (the fleet's intake) of every job the step left waiting,
    none for those it granted at once; in far fewer messages than events: a dispatcher step's
    task-sent events in one message, the worker's own a flush at a time (one message per
    event, or per two, before)."""
    first = start_worker("events")
    first.process.stop()
    db = int(first.redis_url.rsplit("/", 1)[1])
    listener = redis.Redis.from_url(first.redis_url).pubsub(ignore_subscribe_messages=True)
    listener.psubscribe(f"/{db}.celeryev/task.*")
    try:
        sent = [first.send(prompt=f"evented {n}") for n in range(60)]
        worker = start_worker("events", same_db_as=first)
        for job in sent:
            job.get(timeout=30)  # type: ignore[attr-defined]
        ids = {job.id for job in sent}  # type: ignore[attr-defined]
        wanted = {(job, kind) for job in ids for kind in TASK_EVENTS[1:]}
        seen: set[tuple[str, str]] = set()
        messages = {"intake": 0, "worker": 0}
        events = {"intake": 0, "worker": 0}
        deadline = time.monotonic() + 15
        while not wanted <= seen:
            assert time.monotonic() < deadline, f"missing events: {sorted(wanted - seen)[:5]}"
            message = listener.get_message(timeout=0.5)
            if message is None:
                continue
            ours = [e for e in _events_in(message["data"]) if e.get("uuid") in ids]
            for source in {_source(e) for e in ours}:
                messages[source] += 1
            for event in ours:
                events[_source(event)] += 1
                seen.add((event["uuid"], event["type"]))
        # (A waiting job's task-sent is published in the step that took it in, before any
        # later step grants it: it is here before its worker events.)
        assert worker.process.log().count("succeeded") >= 60
        announced = {job for job, kind in seen if kind == "task-sent"}
        assert 60 - 8 <= len(announced) < 60, f"{len(announced)} of 60 jobs had a task-sent"
        assert events == {"intake": len(announced), "worker": 180}, events
        assert messages["intake"] <= 10, messages
        assert messages["worker"] <= 180 / 4, messages
    finally:
        listener.close()


def _source(event: dict[str, Any]) -> str:
    return "intake" if str(event.get("hostname", "")).startswith("fair-intake@") else "worker"


def test_json_logs_carry_one_outcome_line_per_job(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    worker = start_worker("jsonlog", LOG_FORMAT="json", LOG_LEVEL="INFO")
    sandbox.configure(latency_s=0.2)  # each job's run holds a call of at least 0.2 s
    began = time.monotonic()
    results = [worker.send(prompt=f"json {n}").get(timeout=30) for n in range(3)]
    elapsed = time.monotonic() - began
    lines = [json.loads(line) for line in worker.process.log().splitlines() if line.startswith("{")]
    outcomes = [line for line in lines if line.get("outcome") == "succeeded"]
    assert sorted(o["taskUUID"] for o in outcomes) == sorted(r["taskUUID"] for r in results)
    for line in outcomes:
        assert line["level"] == "INFO"
        assert line["cost"] == 0.0013
        assert 0.2 <= line["duration_s"] <= elapsed  # the run's own time, not 0 or a clock
        assert line["task_name"] == "tasks.enhance_prompt"
    assert SECRET not in worker.process.log()


def _cli(worker: RunningWorker, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return run_cli(worker.redis_url, *args, **kwargs)


def test_the_enhance_command(main_worker: RunningWorker, sandbox: Sandbox) -> None:
    done = _cli(main_worker, "enhance", "a red fox", "--versions", "2", "--max-length", "50")
    assert done.returncode == 0, done.stderr
    value = json.loads(done.stdout)
    assert len(value["texts"]) == 2
    refused = _cli(main_worker, "enhance", "a red fox", "--versions", "9")
    assert refused.returncode == 2
    assert "promptVersions" in refused.stderr


def test_batch_of_200_lines(main_worker: RunningWorker, sandbox: Sandbox, tmp_path: Path) -> None:
    source = tmp_path / "prompts.txt"
    lines = [f"batch line {n}" for n in range(199)]
    lines.append(json.dumps({"prompt": "a jsonl line", "promptVersions": 3}))
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "results.jsonl"
    done = _cli(main_worker, "batch", str(source), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "200/200" in done.stderr
    assert "ETA" in done.stderr
    assert "failed 0" in done.stderr
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(results) == 200
    assert sorted(r["index"] for r in results) == list(range(200))
    assert all("result" in r for r in results)
    jsonl = next(r for r in results if r["prompt"] == "a jsonl line")
    assert len(jsonl["result"]["texts"]) == 3
    expected = 199 * 0.0013 + 3 * 0.0013
    assert f"total cost ${expected:.6f}" in done.stderr


def test_batch_rejects_a_bad_file_before_enqueueing(
    main_worker: RunningWorker, sandbox: Sandbox, tmp_path: Path
) -> None:
    source = tmp_path / "bad.txt"
    source.write_text("fine\n" + "x" * 301 + "\n{not json\n", encoding="utf-8")
    done = _cli(main_worker, "batch", str(source), "--out", str(tmp_path / "o.jsonl"))
    assert done.returncode == 2
    assert "line 2: prompt:" in done.stderr
    assert "line 3: not valid JSON" in done.stderr
    assert sandbox.state.requests == 0


def test_ctrl_c_leaves_the_jobs_and_says_how_to_collect_them(
    main_worker: RunningWorker, sandbox: Sandbox, tmp_path: Path
) -> None:
    sandbox.configure(latency_s=0.5)
    source = tmp_path / "slow.txt"
    source.write_text("\n".join(f"slow {n}" for n in range(40)) + "\n", encoding="utf-8")
    out = tmp_path / "slow.jsonl"
    env = {**os.environ, "REDIS_URL": main_worker.redis_url}
    process = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "batch", str(source), "--out", str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A suite run in the background (`cmd &`) ignores SIGINT, and a child would inherit that.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 30
    while not out.exists() or len(out.read_text().splitlines()) < 5:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130
    assert "still queued and will finish" in stderr
    pending = out.with_name(out.name + ".pending")
    assert f"enhance-worker batch --resume {pending} --out {out}" in stderr
    resumed = _cli(main_worker, "batch", "--resume", str(pending), "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["index"] for line in lines) == list(range(40))  # each once: no line twice
    assert len({line["taskId"] for line in lines}) == 40
    assert not pending.exists()  # collected in full


def test_the_queue_depth_counts_jobs_not_yet_taken_in(redis_server: RedisServer) -> None:
    """With no dispatcher running, sent jobs stay in Celery's list (plain and priority): the
    depth gauge counts them there too."""

    from config.settings import load_settings
    from workers.metrics import RedisStateCollector

    url = redis_server.url(56)
    producer = backend_app(broker=url)
    producer.send_task("tasks.enhance_prompt", kwargs={"prompt": "waiting"})
    producer.send_task("tasks.enhance_prompt", kwargs={"prompt": "urgent"}, priority=6)
    producer.close()
    collector = RedisStateCollector(load_settings(_env_file=None, redis_url=url), ["enhance"])
    depth = {
        sample.name: sample.value
        for family in collector.collect()
        for sample in family.samples
        if sample.name == "enhance_queue_depth"
    }
    assert depth == {"enhance_queue_depth": 2}


def test_the_fleet_gauges_read_money_limits_and_cool_down_from_redis(
    redis_server: RedisServer,
) -> None:
    """Spent, reserved, unsettled and budget left per account and for the fleet; the in-flight
    cap and rate with their run-time overrides; the cool-down. Read from a real Redis after
    real ledger and limiter calls, and read once for scrapes a moment apart."""
    import uuid

    import redis as redis_lib

    from config.settings import load_settings
    from tasks.errors import BudgetExceeded
    from tasks.ledger import Ledger
    from tasks.limiter import Limiter
    from workers.metrics import RedisStateCollector

    url = redis_server.url(57)
    settings = load_settings(
        _env_file=None,
        redis_url=url,
        runware_daily_budget_usd=0.01,
        runware_account_daily_budget_usd=0.004,
        runware_max_in_flight=12,
    )
    client = redis_lib.Redis.from_url(url)
    client.flushdb()
    ledger, limiter = Ledger(client, settings), Limiter(client, settings)
    done, lost, running = (str(uuid.uuid4()) for _ in range(3))
    ledger.begin(done, "alpha", 0.001, "promptEnhance m")
    ledger.end(done, "alpha", 0.0013, [{"text": "x"}])
    ledger.begin(lost, "beta", 0.002, "promptEnhance m")
    ledger.give_up(lost)  # unsettled: its job stopped following it
    # Reserved at the shape's learned price (0.0013, from `done`), above the 0.0005 given.
    ledger.begin(running, "alpha", 0.0005, "promptEnhance m")
    with pytest.raises(BudgetExceeded):  # alpha holds 0.0026; 0.0025 more passes its 0.004
        ledger.begin(str(uuid.uuid4()), "alpha", 0.0025, "promptEnhance m")
    limiter.set_overrides(max_in_flight=7)
    limiter.note("throttled")

    def gauges() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        collector = RedisStateCollector(settings, ["enhance"])
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in collector.collect()
            for s in family.samples
        }

    m = gauges()
    assert m[("enhance_fleet_spent_today_usd", ())] == pytest.approx(0.0013)
    assert m[("enhance_account_spent_today_usd", (("account", "alpha"),))] == pytest.approx(0.0013)
    assert m[("enhance_account_spent_today_usd", (("account", "beta"),))] == 0
    assert m[("enhance_fleet_reserved_usd", ())] == pytest.approx(0.0033)
    assert m[("enhance_account_reserved_usd", (("account", "alpha"),))] == pytest.approx(0.0013)
    assert m[("enhance_account_unsettled_usd", (("account", "beta"),))] == pytest.approx(0.002)
    assert m[("enhance_account_unsettled_usd", (("account", "alpha"),))] == 0
    assert m[("enhance_fleet_unsettled_usd", ())] == pytest.approx(0.002)
    assert m[("enhance_unsettled_calls", ())] == 1
    fleet, alpha = (
        (("account", ""), ("scope", "fleet")),
        (("account", "alpha"), ("scope", "account")),
    )
    assert m[("enhance_budget_used_ratio", fleet)] == pytest.approx(0.46)
    assert m[("enhance_budget_left_usd", fleet)] == pytest.approx(0.0054)
    assert m[("enhance_budget_used_ratio", alpha)] == pytest.approx(0.65)
    assert m[("enhance_budget_left_usd", (("account", "beta"), ("scope", "account")))] == (
        pytest.approx(0.002)
    )
    assert m[("enhance_daily_budget_usd", (("scope", "account"),))] == 0.004
    assert m[("enhance_fleet_in_flight_cap", ())] == 7  # the override beats the setting's 12
    assert m[("enhance_cooldown_active", ())] == 1
    assert m[("enhance_cooldown_strikes", ())] == 1
    assert m[("enhance_cooldown_seconds_left", ())] > 0
    limiter.note("ok")  # Runware answers again: the strikes are cleared
    assert gauges()[("enhance_cooldown_strikes", ())] == 0

    # Redis's memory against its maxmemory (one Redis here: the broker's role only).
    client.config_set("maxmemory", 8 << 30)
    try:
        m = gauges()
    finally:
        client.config_set("maxmemory", 0)
    broker = (("redis", "broker"),)
    assert m[("enhance_redis_maxmemory_bytes", broker)] == 8 << 30
    used = m[("enhance_redis_used_memory_bytes", broker)]
    assert used == pytest.approx(client.info("memory")["used_memory"], rel=0.5)
    assert m[("enhance_redis_maxmemory_policy_info", (("policy", "noeviction"), *broker))] == 1
    assert m[("enhance_redis_evicted_keys_total", broker)] == 0
    assert ("enhance_redis_used_memory_bytes", (("redis", "state"),)) not in m

    # Scrapes within the reading's lifetime share it: two collects, one run of each script.
    collector = RedisStateCollector(settings, ["enhance"])
    collector.ttl_s = 3600.0  # the same reading, however slow this machine is between collects
    before = client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    first, second = list(collector.collect()), list(collector.collect())
    after = client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    assert len(first) == len(second) >= 20  # both read the gauges (no error swallowed)
    # One script per Redis (both are this one here), and one chunk of waiting accounts per
    # priority class (none wait here).
    assert after - before == 4
    client.flushdb()
    client.close()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _page_in_browser(url: str, path: str, auth: tuple[str, str]) -> str:
    """The page as headless Chromium renders it (scripts run, their requests answered), with the
    credentials given the way a user types them into the address bar."""
    assert CHROMIUM is not None
    address = url.replace("http://", f"http://{auth[0]}:{auth[1]}@") + path
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",  # root in a container has no user namespace for Chromium's sandbox
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=10000",  # let the page's scripts and requests finish
            "--dump-dom",
            address,
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (apt-get install chromium; .ci/run installs it)",
)
def test_flower_in_a_real_browser_shows_the_job_and_no_secret(
    flower: tuple[RunningWorker, str],
) -> None:
    """Flower's task page and task list as a browser renders them: the finished job with its
    enhanced text and cost; neither the API key nor the webhook's token anywhere."""
    worker, url = flower
    hook = f"http://127.0.0.1:9/hook?token={WEBHOOK_TOKEN}"
    job = worker.send(prompt="a lighthouse in a storm", webhookURL=hook)
    value = job.get(timeout=30)  # type: ignore[attr-defined]

    def shown_done(task_id: str) -> bool:
        tasks = requests.get(f"{url}/api/tasks", auth=FLOWER_AUTH, timeout=5).json()
        return bool(tasks.get(task_id, {}).get("state") == "SUCCESS")

    wait_until(lambda: shown_done(job.id), 30, "Flower to show the job as done")  # type: ignore[attr-defined]
    page = _page_in_browser(url, f"/task/{job.id}", FLOWER_AUTH)  # type: ignore[attr-defined]
    assert "SUCCESS" in page
    assert html.escape(value["text"], quote=True) in page or value["text"] in page
    assert f"{value['cost']}" in page
    assert "hook?&lt;redacted&gt;" in page or "hook?<redacted>" in page
    listing = _page_in_browser(url, "/tasks", FLOWER_AUTH)
    # The list is filled by its scripts from Flower's API: the job's row, done.
    row = listing[listing.index(f'<tr id="{job.id}"') :]  # type: ignore[attr-defined]
    assert "SUCCESS" in row[: row.index("</tr>")]
    assert "a lighthouse in a storm" in page
    for page_text in (page, listing):
        for secret in (SECRET, WEBHOOK_TOKEN, FLOWER_AUTH[1]):
            assert secret not in page_text
    # The scan sees what the page shows: a marker planted in a prompt (not masked) is found.
    planted = worker.send(prompt="planted-marker-5c1e")
    planted.get(timeout=30)  # type: ignore[attr-defined]
    wait_until(lambda: shown_done(planted.id), 30, "Flower to show the planted job")  # type: ignore[attr-defined]
    planted_page = _page_in_browser(url, f"/task/{planted.id}", FLOWER_AUTH)  # type: ignore[attr-defined]
    assert "planted-marker-5c1e" in planted_page


def test_with_fleet_gauges_from_the_dispatcher_one_worker_reports_them(
    start_worker: StartWorker,
) -> None:
    """METRICS_FLEET_GAUGES=dispatcher: of two workers, only the dispatcher's holder reports
    the fleet's gauges, so a sum over workers counts each figure once; both report their own."""
    first = start_worker("fleet-a", METRICS_PORT="0", METRICS_FLEET_GAUGES="dispatcher")
    second = start_worker(
        "fleet-b", same_db_as=first, METRICS_PORT="0", METRICS_FLEET_GAUGES="dispatcher"
    )
    first.send(prompt="counted once").get(timeout=30)  # type: ignore[attr-defined]
    ports = [metrics_port(first), metrics_port(second)]

    def reporters() -> list[bool]:
        return [
            ("enhance_queue_depth", (("queue", "enhance"),)) in scrape_metrics(p) for p in ports
        ]

    wait_until(lambda: sorted(reporters()) == [False, True], 30, "exactly one worker reporting")
    for port in ports:  # a worker's own metrics are there either way
        assert ("enhance_runware_in_flight_calls", ()) in scrape_metrics(port)


def test_per_account_gauges_stay_bounded_with_the_rest_summed(redis_server: RedisServer) -> None:
    """METRICS_TOP_ACCOUNTS=2: the two accounts with the most waiting (and the two holding the
    most money) have series of their own; the others are summed under "(other)", whose
    oldest wait is the longest of theirs and whose budget figures are the fullest one's."""
    import uuid

    import redis as redis_lib

    from config.settings import load_settings
    from tasks.dispatcher import Dispatcher, Intake
    from tasks.ledger import Ledger
    from workers.metrics import RedisStateCollector

    url = redis_server.url(58)
    settings = load_settings(
        _env_file=None,
        redis_url=url,
        metrics_top_accounts=2,
        runware_account_daily_budget_usd=0.01,
    )
    client = redis_lib.Redis.from_url(url)
    client.flushdb()
    producer = backend_app(broker=url)
    for account, count in (("a", 5), ("b", 4), ("c", 1), ("d", 2)):
        for n in range(count):
            producer.send_task(
                "tasks.enhance_prompt",
                kwargs={"prompt": f"{account} {n}", "account": account, "priority": "batch"},
            )
    producer.close()
    runware = frozenset({"tasks.enhance_prompt"})
    intake = Intake(("enhance",), runware, runware)
    dispatcher = Dispatcher(client, settings, intake, threads=0)  # no thread: nothing granted
    client.set(dispatcher.keys.dispatcher, dispatcher.id)
    dispatcher.pump()
    ledger = Ledger(client, settings)
    for account, cost in (("a", 0.001), ("b", 0.004), ("c", 0.003), ("d", 0.009)):
        task = str(uuid.uuid4())
        ledger.begin(task, account, 0.0001, "promptEnhance m")
        ledger.end(task, account, cost, [{"text": "x"}])
    m = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in RedisStateCollector(settings, ["enhance"]).collect()
        for s in family.samples
    }
    waiting = {
        dict(labels)["account"]: value
        for (name, labels), value in m.items()
        if name == "enhance_account_waiting_calls"
    }
    assert waiting == {"a": 5, "b": 4, "(other)": 3}
    spent = {
        dict(labels)["account"]: value
        for (name, labels), value in m.items()
        if name == "enhance_account_spent_today_usd"
    }
    assert spent == pytest.approx({"d": 0.009, "b": 0.004, "(other)": 0.004})
    used = ("enhance_budget_used_ratio", (("account", "(other)"), ("scope", "account")))
    assert m[used] == pytest.approx(0.3)  # c's 0.003 of 0.01: the fuller of a and c
    client.flushdb()
    client.close()


def test_the_autoscaling_signal_follows_the_rate_not_the_backlog(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    """`enhance_fleet_usable_threads` (what KEDA scales on): behind a rate of 5 calls/s of about
    0.2 s, a backlog of 40 jobs keeps about one thread busy, not 40; with nothing left, none."""
    sandbox.configure(latency_s=0.2)
    worker = start_worker(
        "scaling", METRICS_PORT="0", RUNWARE_RATE_LIMIT="5", RUNWARE_BATCH_MAX="1"
    )
    port = metrics_port(worker)
    # Before its first call a worker has no duration to go by: no figure, rather than a guess;
    # the fleet's other gauges are all there (a fleet paused from the start makes no call).
    first = scrape_metrics(port)
    assert ("enhance_fleet_usable_threads", ()) not in first
    for gauge in ("enhance_fleet_paused", "enhance_cooldown_active", "enhance_cooldown_strikes"):
        assert (gauge, ()) in first, gauge
    results = [worker.send(prompt=f"fox {n}") for n in range(40)]
    seen: list[tuple[float, float, float]] = []

    def busy_reading() -> bool:
        m = scrape_metrics(port)
        depth = m[("enhance_queue_depth", (("queue", "enhance"),))]
        usable = m.get(("enhance_fleet_usable_threads", ()), -1.0)
        call_s = m.get(("enhance_runware_recent_call_seconds", ()), -1.0)
        seen.append((depth, usable, call_s))
        return depth >= 10 and call_s > 0

    wait_until(busy_reading, 20, "a reading with a backlog and measured calls")
    depth, usable, call_s = seen[-1]
    assert 0.15 < call_s < 0.9, seen
    assert usable == math.ceil(5 * call_s), seen
    assert usable < depth
    for result in results:
        result.get(timeout=30)  # type: ignore[attr-defined]
    wait_until(
        lambda: scrape_metrics(port)[("enhance_fleet_usable_threads", ())] == 0,
        10,
        "no usable thread once every job is done",
    )
