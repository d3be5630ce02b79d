"""Chaining generation onto enhancement, against the sandbox with real workers."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
from celery import chain

from tests.conftest import RunningWorker, StartWorker
from workers.sandbox import Sandbox

IMAGE = {"model": "runware:101@1", "width": 1024, "height": 1024}
VIDEO = {"model": "klingai:5@3", "duration": 5, "width": 1920, "height": 1080}


def test_enhance_then_image_chain(main_worker: RunningWorker, sandbox: Sandbox) -> None:
    from tasks import enhance_prompt, generate_image

    pipeline = chain(
        enhance_prompt.s(prompt="a red fox", account="gen"),
        generate_image.s(account="gen", **IMAGE),
    )
    result = pipeline.apply_async().get(timeout=60)
    enhanced = next(b for b in sandbox.state.bodies.values() if b["taskType"] == "promptEnhance")
    image_call = next(b for b in sandbox.state.bodies.values() if b["taskType"] == "imageInference")
    assert result["taskType"] == "imageInference"
    assert result["positivePrompt"].startswith("a red fox, ")
    assert image_call["positivePrompt"] == result["positivePrompt"]
    assert image_call["width"] == 1024
    assert image_call["includeCost"] is True
    assert "account" not in image_call
    assert enhanced["prompt"] == "a red fox"
    (image,) = result["images"]
    assert image["imageURL"].endswith(".jpg")
    assert result["cost"] == pytest.approx(0.0019)
    assert result["totalCost"] == pytest.approx(0.0013 + 0.0019)
    assert sandbox.state.billed_micro == 1300 + 1900


def test_a_bare_app_chains_by_name(main_worker: RunningWorker, sandbox: Sandbox) -> None:
    bare = main_worker.app
    pipeline = bare.signature("tasks.enhance_prompt", kwargs={"prompt": "a lighthouse"}) | (
        bare.signature("tasks.generate_image", kwargs={**IMAGE, "numberResults": 2})
    )
    result = pipeline.apply_async().get(timeout=60)
    assert len(result["images"]) == 2
    assert result["totalCost"] == pytest.approx(0.0013 + 2 * 0.0019)


def test_enhance_then_video_chain_polls(main_worker: RunningWorker, sandbox: Sandbox) -> None:
    from tasks import enhance_prompt, generate_video

    result = chain(enhance_prompt.s(prompt="a waterfall"), generate_video.s(**VIDEO)).apply_async()
    value = result.get(timeout=60)
    assert value["taskType"] == "videoInference"
    assert value["positivePrompt"].startswith("a waterfall, ")
    (video,) = value["videos"]
    assert video["videoURL"].endswith(".mp4")
    video_call = next(b for b in sandbox.state.bodies.values() if b["taskType"] == "videoInference")
    assert video_call["deliveryMethod"] == "async"
    assert sandbox.state.by_type["getResponse"] >= 1
    assert value["totalCost"] == pytest.approx(0.0013 + 0.25)
    # This job's own line (the shared worker's log holds other tests' lines too).
    assert re.search(
        rf"Task {result.id} \(tasks.generate_video\) .*; re-scheduled in", main_worker.process.log()
    )


@pytest.mark.slow
def test_a_rendering_video_holds_no_worker_slot(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    """One worker of concurrency 1, a video that takes 5 s: five enhancements enqueued after the
    video all finish before it does."""
    sandbox.configure(video_render_s=5.0)
    worker = start_worker("solo", WORKER_CONCURRENCY="1", RUNWARE_POLL_INTERVAL_S="0.5")
    video = worker.app.send_task("tasks.generate_video", args=["a slow glacier"], kwargs=VIDEO)
    enhancements = [worker.send(prompt=f"quick {n}") for n in range(5)]
    for async_result in enhancements:
        assert async_result.get(timeout=30)["text"]
    assert video.state != "SUCCESS"
    assert video.get(timeout=60)["videos"]


def test_an_upstream_failure_stops_the_chain(main_worker: RunningWorker, sandbox: Sandbox) -> None:
    from tasks import enhance_prompt, generate_image

    sandbox.configure(fail_next=["400"])
    result = chain(enhance_prompt.s(prompt="doomed"), generate_image.s(**IMAGE)).apply_async()
    with pytest.raises(Exception, match="HTTP 400, invalidParameter"):
        result.get(timeout=60)
    assert result.state == "FAILURE"
    assert "imageInference" not in sandbox.state.by_type


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({**IMAGE, "width": 1000}, "width: Value error, must be a multiple of 64"),
        ({"width": 512, "height": 512}, "model: required argument is missing"),
        ({**IMAGE, "height": 4096}, "height: Input should be less than or equal to 2048"),
        ({**IMAGE, "outputFormat": "GIF"}, "outputFormat: Input should be 'JPG', 'PNG' or 'WEBP'"),
        ({**IMAGE, "numberResults": 21}, "numberResults: Input should be less than or equal to 20"),
        ({**IMAGE, "CFGScale": 51}, "CFGScale"),
        ({**IMAGE, "scheduler": "x"}, "scheduler: unknown argument"),
    ],
)
def test_bad_image_arguments_fail_naming_the_field(
    main_worker: RunningWorker, sandbox: Sandbox, kwargs: dict[str, Any], message: str
) -> None:
    result = main_worker.app.send_task("tasks.generate_image", args=["a fox"], kwargs=kwargs)
    with pytest.raises(Exception) as caught:  # noqa: PT011 - the message is checked
        result.get(timeout=30)
    assert message.replace("Value error, ", "") in str(caught.value)
    assert sandbox.state.requests == 0


def test_a_bad_upstream_value_fails_clearly(main_worker: RunningWorker, sandbox: Sandbox) -> None:
    result = main_worker.app.send_task("tasks.generate_image", args=[{"no": "text"}], kwargs=IMAGE)
    with pytest.raises(Exception, match="upstream: the first argument must be"):
        result.get(timeout=30)
    assert sandbox.state.requests == 0


def test_enhance_then_image_makes_one_image_per_version(
    main_worker: RunningWorker, sandbox: Sandbox
) -> None:
    from tasks.pipelines import enhance_then_image

    value = enhance_then_image(
        "a red fox", versions=2, model="runware:101@1", width=512, height=512
    ).get(timeout=60)
    assert value["prompt"] == "a red fox"
    assert len(value["results"]) == 2
    prompts = [r["positivePrompt"] for r in value["results"]]
    enhanced = next(b for b in sandbox.state.bodies.values() if b["taskType"] == "promptEnhance")
    assert enhanced["promptVersions"] == 2
    assert len(set(prompts)) == 2
    assert all(p.startswith("a red fox, ") for p in prompts)
    assert value["cost"] == pytest.approx(2 * 0.0013 + 2 * 0.000475)  # 512x512: a quarter
    assert round(value["cost"] * 1_000_000) == sandbox.state.billed_micro


def test_enhance_then_video(main_worker: RunningWorker, sandbox: Sandbox) -> None:
    from tasks.pipelines import enhance_then_video

    value = enhance_then_video("a waterfall", **VIDEO).get(timeout=60)
    assert len(value["results"]) == 1
    assert value["results"][0]["videos"]
    assert value["cost"] == pytest.approx(0.0013 + 0.25)


def test_the_pipeline_helpers_validate_first(main_worker: RunningWorker, sandbox: Sandbox) -> None:
    from tasks import ValidationError
    from tasks.pipelines import enhance_then_image

    with pytest.raises(ValidationError, match="width"):
        enhance_then_image("a fox", model="runware:101@1", width=100)
    with pytest.raises(ValidationError, match="promptVersions"):
        enhance_then_image("a fox", versions=7, model="runware:101@1")
    assert sandbox.state.requests == 0


def test_a_video_past_its_deadline_fails(start_worker: StartWorker, sandbox: Sandbox) -> None:
    sandbox.configure(video_render_s=30.0)
    worker = start_worker("deadline", RUNWARE_VIDEO_TIMEOUT_S="1.5")
    result = worker.app.send_task("tasks.generate_video", args=["an endless river"], kwargs=VIDEO)
    with pytest.raises(Exception, match=r"did not finish within 1.5s"):
        result.get(timeout=60)


class _Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        self.received.append(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[bytes]]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    _Hook.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook?token=hook-secret-123", _Hook.received
    server.shutdown()


def test_webhook_url_is_passed_through_and_not_logged(
    main_worker: RunningWorker, sandbox: Sandbox, webhook: tuple[str, list[bytes]]
) -> None:
    url, received = webhook
    result = main_worker.app.send_task(
        "tasks.generate_image", args=["a fox"], kwargs={**IMAGE, "webhookURL": url}
    ).get(timeout=30)
    image_call = next(b for b in sandbox.state.bodies.values() if b["taskType"] == "imageInference")
    assert image_call["webhookURL"] == url
    deadline = time.monotonic() + 10
    while not received:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert result["images"][0]["imageUUID"].encode() in received[0]
    assert "hook-secret-123" not in main_worker.process.log()
