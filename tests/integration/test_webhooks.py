"""Async calls finished by Runware's webhook (tasks/webhooks.py, workers/webhooks.py): a real
receiver process (`enhance-worker webhooks`), real workers, and the sandbox POSTing webhooks as
Runware does."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import requests

from tests.conftest import (
    SECRET,
    RunningWorker,
    StartWorker,
    metrics_port,
    scrape_metrics,
    wait_until,
    worker_env,
)
from tests.load.common import done_at
from workers.sandbox import Sandbox
from workers.sandbox.services import free_port

VIDEO = {"model": "klingai:5@3", "duration": 5, "width": 1920, "height": 1080}
Receiver = Callable[[str, int], str]  # (redis URL, port) -> the receiver's base URL


@pytest.fixture
def receiver(sandbox: Sandbox) -> Iterator[Receiver]:
    """Start `enhance-worker webhooks` on a free port against a worker's Redis."""
    started: list[subprocess.Popen[bytes]] = []

    def start(redis_url: str, port: int) -> str:
        env = {**os.environ, **worker_env(redis_url, sandbox)}
        command = [sys.executable, "-m", "workers.cli", "webhooks", "--host", "127.0.0.1"]
        process = subprocess.Popen(
            [*command, "--port", str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        started.append(process)
        base = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                return requests.get(f"{base}/healthz", timeout=1).status_code == 200
            except requests.RequestException:
                return False

        wait_until(healthy, 20, "the webhook receiver to answer")
        return base

    yield start
    for process in started:
        process.terminate()
        output, _ = process.communicate(timeout=10)
        assert SECRET not in output.decode(errors="replace")
        assert "token=" not in output.decode(errors="replace")  # tokens never logged


def _with_receiver(
    start_worker: StartWorker, receiver: Receiver, **env: str
) -> tuple[RunningWorker, str]:
    """A worker whose async calls carry a webhook URL, and the receiver there: (worker, base)."""
    port = free_port()
    worker = _hooked_worker(start_worker, port, **env)
    return worker, receiver(worker.redis_url, port)


def _hooked_worker(start_worker: StartWorker, port: int, **env: str) -> RunningWorker:
    return start_worker(
        "hooks",
        RUNWARE_WEBHOOK_URL=f"http://127.0.0.1:{port}",
        RUNWARE_VIDEO_TIMEOUT_S="120",
        **env,
    )


def _done_at(worker: RunningWorker, task_id: str) -> float:
    return done_at(worker.app.backend.get_task_meta(task_id))


def test_videos_are_finished_by_the_webhook_within_two_seconds(
    start_worker: StartWorker, sandbox: Sandbox, receiver: Receiver
) -> None:
    """12 videos of 8 s, each webhook POSTed twice: each job ends within 2 s of Runware
    finishing it, makes no more than one getResponse, and is billed once."""
    worker, base = _with_receiver(
        start_worker, receiver, RUNWARE_WEBHOOK_POLL_S="60", METRICS_PORT="0"
    )
    sandbox.configure(video_render_s=8.0, webhook_copies=2)
    sent = [
        worker.app.send_task("tasks.generate_video", args=[f"a glacier {n}"], kwargs=VIDEO)
        for n in range(12)
    ]
    results = [s.get(timeout=60) for s in sent]
    stats = sandbox.state.stats()
    by_uuid = {r["taskUUID"]: s.id for r, s in zip(results, sent, strict=True)}
    lags = [_done_at(worker, by_uuid[u]) - stats["done_at"][u] for u in by_uuid]
    assert max(lags) < 2.0, lags
    assert stats["by_type"].get("getResponse", 0) == 0  # (at most one each is allowed)
    assert stats["accepted"] == dict.fromkeys(by_uuid, 1)  # billed once each
    posts = [w for w in stats["webhooks"] if w[1] in by_uuid]
    assert len(posts) == 24
    assert all(status == 200 for _at, _uuid, status in posts)
    bodies = [sandbox.state.bodies[u] for u in by_uuid]
    assert all(b["webhookURL"].startswith(f"{base}/runware/webhook?") for b in bodies)
    log = worker.process.log()
    assert log.count("finished by Runware's webhook; no poll") == 12
    # One grant (a rate slot) per video, for its submission: the run a webhook woke had none.
    grants = scrape_metrics(metrics_port(worker))
    assert (
        sum(v for (n, _), v in grants.items() if n == "enhance_rate_limit_wait_seconds_count") == 12
    )
    assert "token=" not in log
    assert SECRET not in log


def _parked(worker: RunningWorker) -> dict[bytes, float]:
    """The delayed messages (as stored) and their due times."""
    client = redis.Redis.from_url(worker.redis_url)
    return dict(client.zrange("enhance:fair:delayed", 0, -1, withscores=True))


def _submitted(sandbox: Sandbox, count: int) -> list[dict[str, Any]]:
    wait_until(lambda: len(sandbox.state.bodies) >= count, 20, "the videos to be submitted")
    return list(sandbox.state.bodies.values())


def test_a_post_without_a_valid_token_changes_nothing(
    start_worker: StartWorker, sandbox: Sandbox, receiver: Receiver
) -> None:
    worker, base = _with_receiver(start_worker, receiver)
    sandbox.configure(video_render_s=60.0)
    for n in range(2):
        worker.app.send_task("tasks.generate_video", args=[f"a dune {n}"], kwargs=VIDEO)
    bodies = _submitted(sandbox, 2)
    wait_until(lambda: len(_parked(worker)) == 2, 20, "both polls to be parked")
    before = _parked(worker)
    url = bodies[0]["webhookURL"]
    mine, theirs = bodies[0]["taskUUID"], bodies[1]["taskUUID"]  # (the jobs' ids too)
    assert f"job={mine}" in url
    item = {"taskType": "videoInference", "taskUUID": bodies[0]["taskUUID"], "videoUUID": "v1"}
    other = {**item, "taskUUID": bodies[1]["taskUUID"]}
    hook = f"{base}/runware/webhook"
    refused = {
        "no token": requests.post(f"{hook}?job={mine}&n=1", json={"data": [item]}, timeout=10),
        "a wrong token": requests.post(
            url.replace("token=", "token=0"), json={"data": [item]}, timeout=10
        ),
        "another call's token": requests.post(url, json={"data": [other]}, timeout=10),
        "another job": requests.post(
            url.replace(f"job={mine}", f"job={theirs}"), json={"data": [item]}, timeout=10
        ),
    }
    statuses = {what: answer.status_code for what, answer in refused.items()}
    assert statuses == {
        "no token": 401,
        "a wrong token": 403,
        "another call's token": 403,
        "another job": 403,
    }
    assert requests.post(url, data=b"{not json", timeout=10).status_code == 400
    too_big = {"data": [{**item, "pad": "x" * 1_100_000}]}
    assert requests.post(url, json=too_big, timeout=10).status_code == 413
    state = redis.Redis.from_url(worker.redis_url)
    assert state.keys("enhance:hook:*-*") == []  # no inbox was written
    assert state.zcard("enhance:fair:hooked") == 0
    assert _parked(worker) == before  # nobody was woken
    metrics = requests.get(f"{base}/metrics", timeout=10).text
    assert 'enhance_webhooks_received_total{outcome="forbidden"} 3.0' in metrics
    assert 'enhance_webhooks_received_total{outcome="unauthorized"} 1.0' in metrics
    assert 'enhance_webhooks_received_total{outcome="stored"} 0.0' in metrics


def test_an_error_item_ends_the_job_as_a_poll_would(
    start_worker: StartWorker, sandbox: Sandbox, receiver: Receiver
) -> None:
    worker, base = _with_receiver(start_worker, receiver)
    sandbox.configure(video_render_s=60.0)
    video = worker.app.send_task("tasks.generate_video", args=["a storm"], kwargs=VIDEO)
    (body,) = _submitted(sandbox, 1)
    wait_until(lambda: len(_parked(worker)) == 1, 20, "the poll to be parked")
    assert body["webhookURL"].startswith(base)
    refusal = {
        "code": "contentModeration",
        "message": "the prompt was refused",
        "taskUUID": body["taskUUID"],
    }
    answer = requests.post(body["webhookURL"], json={"errors": [refusal]}, timeout=10)
    assert answer.status_code == 200
    began = time.monotonic()
    with pytest.raises(Exception, match="contentModeration") as failure:
        video.get(timeout=20)
    assert time.monotonic() - began < 5  # woken, not polled a minute later
    assert type(failure.value).__name__ == "PermanentError"
    assert sandbox.state.by_type.get("getResponse", 0) == 0
    again = requests.post(body["webhookURL"], json={"errors": [refusal]}, timeout=10)
    assert again.status_code == 200
    assert again.json()["outcome"] == "duplicate"


def test_with_the_receiver_down_every_video_is_done_by_polling(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    port = free_port()  # (nothing listens there)
    worker = _hooked_worker(start_worker, port, RUNWARE_WEBHOOK_POLL_S="1", METRICS_PORT="0")
    sandbox.configure(video_render_s=2.0, webhook_give_up_s=3.0, webhook_retry_s=0.2)
    sent = [
        worker.app.send_task("tasks.generate_video", args=[f"a reef {n}"], kwargs=VIDEO)
        for n in range(3)
    ]
    results = [s.get(timeout=60) for s in sent]
    assert all(r["videos"] for r in results)
    assert sandbox.state.by_type.get("getResponse", 0) >= 3  # each found by polling
    assert sandbox.state.accepted == {r["taskUUID"]: 1 for r in results}
    assert any(status == 0 for _at, _uuid, status in sandbox.state.webhooks)  # it did try
    missed = scrape_metrics(metrics_port(worker))[("enhance_webhooks_missed_total", ())]
    assert missed == 3  # (what the WebhooksNotArriving alert counts)


def test_a_callers_own_webhook_url_is_kept_and_the_call_polls(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    worker = _hooked_worker(start_worker, free_port(), RUNWARE_WEBHOOK_POLL_S="60")
    sandbox.configure(video_render_s=1.0, webhook_give_up_s=1.0)
    own = "http://127.0.0.1:9/theirs?token=their-secret"
    video = worker.app.send_task(
        "tasks.generate_video", args=["a fjord"], kwargs={**VIDEO, "webhookURL": own}
    )
    result = video.get(timeout=60)
    assert sandbox.state.bodies[result["taskUUID"]]["webhookURL"] == own
    assert sandbox.state.by_type.get("getResponse", 0) >= 1  # polled at its usual pace


def test_a_webhook_before_the_poll_is_parked_ends_the_job_at_once(
    start_worker: StartWorker, sandbox: Sandbox, receiver: Receiver
) -> None:
    """An async image done at once: its webhook comes while the run that submitted it is still
    re-scheduling its poll (on its way to the intake, not parked yet). The poll passes as soon
    as it arrives, and the job ends in seconds, not at the fallback poll a minute later."""
    worker, _base = _with_receiver(start_worker, receiver, RUNWARE_WEBHOOK_POLL_S="60")
    sandbox.configure(async_delay_s=0.0)
    image = {"model": "runware:101@1", "width": 512, "height": 512, "deliveryMethod": "async"}
    began = time.monotonic()
    sent = [
        worker.app.send_task("tasks.generate_image", args=[f"a kite {n}"], kwargs=image)
        for n in range(4)
    ]
    results = [s.get(timeout=30) for s in sent]
    assert time.monotonic() - began < 10
    assert all(r["images"] for r in results)
    assert sandbox.state.by_type.get("getResponse", 0) == 0
    # (the webhooks came before the polls were parked: each was passed when it arrived)
    assert worker.process.log().count("finished by Runware's webhook; no poll") == 4


def test_a_run_passed_without_a_grant_makes_no_call(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    """A webhook's mark without its items (the inbox lost, say): the run it let through
    without a grant makes no call, and the call that follows has a grant of its own."""
    worker = _hooked_worker(start_worker, free_port(), METRICS_PORT="0")
    sandbox.configure(video_render_s=60.0)
    video = worker.app.send_task("tasks.generate_video", args=["a cave"], kwargs=VIDEO)
    wait_until(lambda: len(_parked(worker)) == 1, 20, "the poll to be parked")
    broker = redis.Redis.from_url(worker.redis_url)
    (raw,) = _parked(worker)
    broker.zadd("enhance:fair:hooked", {video.id: time.time() + 600})
    broker.zadd("enhance:fair:delayed", {raw: time.time()}, xx=True)
    broker.lpush("enhance:fair:wake", "1")
    wait_until(lambda: sandbox.state.by_type.get("getResponse", 0) >= 1, 20, "the granted poll")
    time.sleep(0.5)  # (a second call, if the passed run made one, is counted by now)
    assert "was passed without a grant" in worker.process.log()
    calls = sum(sandbox.state.by_type.values())  # the submission and one poll
    grants = scrape_metrics(metrics_port(worker))
    granted = sum(v for (n, _), v in grants.items() if n == "enhance_rate_limit_wait_seconds_count")
    assert calls == granted == 2
