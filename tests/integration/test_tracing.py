"""Tracing (tasks/tracing.py) with real workers exporting to a real OTLP receiver (tests/otlp.py,
which decodes the protobuf with opentelemetry-proto): a producer's `traceparent` is the parent of
the wait in the fair intake, the worker's run, each Runware call (with its cost) and the chained
generation; no secret is in any byte exported; logs carry the trace ids."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SECRET, RunningWorker, StartWorker, worker_env
from tests.otlp import GrpcReceiver, HttpReceiver, Received, Span
from tests.producer import backend_app
from workers.sandbox import Sandbox
from workers.sandbox.services import RedisServer, WorkerProcess

IMAGE = {"model": "runware:101@1", "width": 1024, "height": 1024}
REDIS_PASSWORD = "tr4ce-pass-" + secrets.token_hex(6)


def _traceparent() -> tuple[str, str, str]:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, parent_id, f"00-{trace_id}-{parent_id}-01"


def _named(spans: list[Span], name: str) -> list[Span]:
    return [s for s in spans if s.name == name]


def _leaks(received: Received, secret: str) -> bool:
    """The scan: `secret` anywhere in what the exporters sent (every byte, as received)."""
    return secret.encode() in received.all_bytes()


def test_a_job_sent_by_name_is_one_trace_down_to_its_runware_call(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    # A Redis with a password (it must not leave either), and a webhook secret in play.
    with RedisServer(password=REDIS_PASSWORD) as redis, HttpReceiver() as otlp:
        url = redis.url(0)
        env = worker_env(
            url,
            sandbox,
            LOG_FORMAT="json",
            RUNWARE_WEBHOOK_URL="http://127.0.0.1:9/runware/webhook",
            RUNWARE_WEBHOOK_SECRET="whsec-" + secrets.token_hex(8),
            **otlp.env(),
        )
        worker = WorkerProcess(env, name="traced", log_path=str(tmp_path / "worker.log")).start()
        app = backend_app(broker=url, backend=url)
        try:
            trace_id, parent_id, traceparent = _traceparent()
            # The control of the secret scan: the account is planted in the spans on purpose.
            planted = "planted-" + secrets.token_hex(8)
            result = app.send_task(
                "tasks.enhance_prompt",
                kwargs={"prompt": "a lighthouse", "promptVersions": 2, "account": planted},
                headers={"traceparent": traceparent},
            ).get(timeout=30)
            otlp.received.wait_for(
                lambda: (
                    bool(_named(otlp.received.in_trace(trace_id), "runware promptEnhance"))
                    and bool(_named(otlp.received.in_trace(trace_id), "run/tasks.enhance_prompt"))
                    and bool(_named(otlp.received.in_trace(trace_id), "fair intake wait"))
                ),
                15,
                "the job's spans",
            )
        finally:
            worker.stop()
            app.close()
    spans = otlp.received.in_trace(trace_id)
    [run] = _named(spans, "run/tasks.enhance_prompt")
    [call] = _named(spans, "runware promptEnhance")
    [wait] = _named(spans, "fair intake wait")
    # The producer's span is the parent of the wait and of the run; the call is the run's child.
    assert run.parent_id == parent_id
    assert wait.parent_id == parent_id
    assert call.parent_id == run.span_id
    assert wait.attributes["enhance.account"] == planted
    assert wait.attributes["enhance.wait_s"] >= 0
    assert wait.end_ns <= run.start_ns + 50_000_000  # granted, then run
    attributes = call.attributes
    assert attributes["runware.taskUUID"] == result["taskUUID"]
    assert attributes["runware.taskType"] == "promptEnhance"
    assert attributes["runware.model"] == "runware:llama-3-1-8b@prompt-enhancer"
    assert attributes["enhance.account"] == planted
    assert attributes["enhance.priority"] == "interactive"
    assert attributes["enhance.attempt"] == 1
    assert attributes["runware.status"] == "success"
    assert attributes["runware.cost_usd"] == pytest.approx(result["cost"])
    assert result["cost"] == pytest.approx(2 * 0.0013)
    assert attributes["http.response.status_code"] == 200
    assert attributes["runware.request.tasks"] >= 1
    assert run.resource["service.name"] == "enhance-worker-test"
    # No secret in any exported byte; the same scan finds the planted account.
    assert _leaks(otlp.received, planted)
    for secret in (SECRET, REDIS_PASSWORD, env["RUNWARE_WEBHOOK_SECRET"]):
        assert not _leaks(otlp.received, secret)
    # The worker's log lines of the job carry its trace id (and the span that wrote them).
    log = (tmp_path / "worker.log").read_text().splitlines()
    lines = [json.loads(line) for line in log if line.startswith("{")]
    outcome = [
        line
        for line in lines
        if line.get("taskUUID") == result["taskUUID"] and line.get("outcome") == "succeeded"
    ]
    assert outcome, "no outcome line for the job"
    assert outcome[0]["trace_id"] == trace_id
    assert outcome[0]["span_id"] == run.span_id


def test_a_chain_is_one_trace_with_the_images_call(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    with HttpReceiver() as otlp:
        worker = start_worker("chain-traced", **otlp.env())
        trace_id, parent_id, traceparent = _traceparent()
        bare = worker.app
        pipeline = bare.signature(
            "tasks.enhance_prompt", kwargs={"prompt": "a red fox", "account": "gen"}
        ) | bare.signature("tasks.generate_image", kwargs={**IMAGE, "account": "gen"})
        result = pipeline.apply_async(headers={"traceparent": traceparent}).get(timeout=60)
        otlp.received.wait_for(
            lambda: bool(_named(otlp.received.in_trace(trace_id), "runware imageInference")),
            15,
            "the image's call in the producer's trace",
        )
        spans = otlp.received.in_trace(trace_id)
    [enhance_run] = _named(spans, "run/tasks.enhance_prompt")
    [image_run] = _named(spans, "run/tasks.generate_image")
    [image_call] = _named(spans, "runware imageInference")
    [enhance_call] = _named(spans, "runware promptEnhance")
    by_id = {s.span_id: s for s in spans}
    assert enhance_run.parent_id == parent_id
    # The image's run descends from the enhancement's run (through the publish of the chain).
    ancestors: list[str] = []
    node: Span | None = image_run
    while node is not None and node.parent_id in by_id:
        node = by_id[node.parent_id]
        ancestors.append(node.name)
    assert "run/tasks.enhance_prompt" in ancestors, ancestors
    assert image_call.parent_id == image_run.span_id
    assert image_call.attributes["runware.cost_usd"] == pytest.approx(result["cost"])
    assert image_call.attributes["runware.model"] == IMAGE["model"]
    assert enhance_call.attributes["runware.cost_usd"] == pytest.approx(0.0013)


def test_a_retry_is_in_the_trace(start_worker: StartWorker, sandbox: Sandbox) -> None:
    with HttpReceiver() as otlp:
        worker = start_worker("retry-traced", **otlp.env())
        sandbox.configure(fail_next=["503"])
        trace_id, _parent_id, traceparent = _traceparent()
        result = worker.app.send_task(
            "tasks.enhance_prompt", kwargs={"prompt": "a fox"}, headers={"traceparent": traceparent}
        ).get(timeout=30)
        otlp.received.wait_for(
            lambda: len(_named(otlp.received.in_trace(trace_id), "runware promptEnhance")) >= 2,
            15,
            "both calls in the trace",
        )
        spans = otlp.received.in_trace(trace_id)
    calls = sorted(_named(spans, "runware promptEnhance"), key=lambda s: s.start_ns)
    assert [c.attributes["enhance.attempt"] for c in calls] == [1, 2]
    assert calls[0].attributes["http.response.status_code"] == 503
    assert calls[-1].attributes["runware.cost_usd"] == pytest.approx(result["cost"])
    retries = [e for s in spans for e in s.events if e[0] == "retry"]
    assert retries, "no retry event"
    assert (retries[0][1]["retry"], retries[0][1]["limit"]) == (1, 3)


RUN = "run/tasks.enhance_prompt"


def _one_traced_call(
    worker: RunningWorker, received: Received, what: str
) -> tuple[str, dict[str, Any], list[Span]]:
    """One job sent by name under a new traceparent, once its Runware call's span and its run's
    span arrived (the run ends after the call, and may be exported in a later batch): the
    producer's span id, the result and the trace's spans."""
    trace_id, parent_id, traceparent = _traceparent()
    result = worker.app.send_task(
        "tasks.enhance_prompt", kwargs={"prompt": "a fox"}, headers={"traceparent": traceparent}
    ).get(timeout=30)

    def both_arrived() -> bool:
        spans = received.in_trace(trace_id)
        return all(_named(spans, name) for name in ("runware promptEnhance", RUN))

    received.wait_for(both_arrived, 15, what)
    return parent_id, result, received.in_trace(trace_id)


def test_grpc_export(start_worker: StartWorker, sandbox: Sandbox) -> None:
    with GrpcReceiver() as otlp:
        worker = start_worker("grpc-traced", **otlp.env())
        _parent_id, result, spans = _one_traced_call(worker, otlp.received, "a span over gRPC")
    [call] = _named(spans, "runware promptEnhance")
    assert call.attributes["runware.taskUUID"] == result["taskUUID"]


HELPER_SCRIPT = """
import json, sys
from opentelemetry.sdk.trace import TracerProvider
import tasks

tracer = TracerProvider().get_tracer("backend")  # the backend's own tracing, no instrumentation
with tracer.start_as_current_span("POST /enhance") as span:
    tasks.enhance("a lighthouse")
    print(json.dumps(f"{span.get_span_context().trace_id:032x}"))
"""


def test_the_projects_helpers_carry_the_producers_trace(sandbox: Sandbox) -> None:
    """Backend code that traces (its own SDK, no Celery instrumentation) calls the project's
    helper: the job's message carries the backend's current trace as `traceparent`."""
    import subprocess
    import sys

    import redis as redis_py

    with RedisServer() as server:
        env = {**worker_env(server.url(0), sandbox), "PYTHONPATH": str(Path.cwd())}
        done = subprocess.run(
            [sys.executable, "-c", HELPER_SCRIPT],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        trace_id = json.loads(done.stdout.strip().splitlines()[-1])
        [raw] = redis_py.Redis.from_url(server.url(0)).lrange("enhance", 0, -1)
    headers = json.loads(raw)["headers"]
    version, carried_trace, _span, _flags = headers["traceparent"].split("-")
    assert (version, carried_trace) == ("00", trace_id)


@pytest.mark.parametrize("receiver", [HttpReceiver, GrpcReceiver])
def test_a_prefork_child_exports_its_spans(
    start_worker: StartWorker, sandbox: Sandbox, receiver: type[HttpReceiver | GrpcReceiver]
) -> None:
    """Tracing is set up before the pool forks; the SDK restarts the exporter's thread in each
    child and the child builds its own exporter (a gRPC channel does not survive a fork), so a
    prefork child's run and call reach the receiver, over HTTP and over gRPC."""
    with receiver() as otlp:
        worker = start_worker(
            "prefork-traced", WORKER_POOL="prefork", WORKER_CONCURRENCY="2", **otlp.env()
        )
        parent_id, result, spans = _one_traced_call(worker, otlp.received, "a child's span")
    [run] = _named(spans, "run/tasks.enhance_prompt")
    [call] = _named(spans, "runware promptEnhance")
    assert run.parent_id == parent_id
    assert call.attributes["runware.cost_usd"] == pytest.approx(result["cost"])
