"""tasks/tracing.py without a worker: which variables turn tracing on, that off means no
exporter thread and no Celery instrumentation, and that nothing secret reaches an exporter."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import StatusCode

from tasks import trace_export
from tasks.tracing import TracingConfigError, Wanted, wanted
from tests.conftest import SECRET


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"OTEL_SERVICE_NAME": "x"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, Wanted(("otlp",), "http/protobuf")),
        (
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"},
            Wanted(("otlp",), "http/protobuf"),
        ),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, Wanted(("otlp",), "http/protobuf")),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, Wanted(("otlp", "console"), "http/protobuf")),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_SDK_DISABLED": "true"}, None),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            Wanted(("otlp",), "grpc"),
        ),
        (
            {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            },
            Wanted(("otlp",), "http/protobuf"),
        ),
    ],
)
def test_the_standard_variables_turn_it_on(env: dict[str, str], expected: Wanted | None) -> None:
    assert wanted(env) == expected


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
    ],
)
def test_a_variable_it_cannot_honour_is_named(env: dict[str, str], named: str) -> None:
    with pytest.raises(TracingConfigError, match=named):
        wanted(env)


PROBE = """
import json, os, threading
from celery import signals
import workers
workers.app  # the worker's app, its signal receivers connected
from tasks import tracing
on = tracing.setup()
receivers = [repr(r[1]) for r in signals.task_prerun.receivers]
print(json.dumps({
    "on": on,
    "threads": sorted(t.name for t in threading.enumerate()),
    "instrumented": any("CeleryInstrumentor" in r or "_trace_prerun" in r for r in receivers),
}))
tracing.shutdown()
"""


def _probe(**env: str) -> dict[str, Any]:
    import os

    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_off_there_is_no_exporter_thread_and_no_instrumentation() -> None:
    off = _probe()
    assert off["on"] is False
    assert not [t for t in off["threads"] if t.startswith("OtelBatch")]
    assert off["instrumented"] is False
    # The control: the same probe sees both once tracing is on.
    on = _probe(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9")
    assert on["on"] is True
    assert [t for t in on["threads"] if t.startswith("OtelBatch")]
    assert on["instrumented"] is True


class Kept(SpanExporter):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


def _everything(spans: list[ReadableSpan]) -> str:
    """All a span holds that an exporter writes, as text (the scan)."""
    return json.dumps([json.loads(s.to_json()) for s in spans])


def _spans_with_secrets(exporter: SpanExporter, resource: Resource) -> None:
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span(f"call {SECRET}") as span:
        span.set_attribute("url", "redis://:hunter2-pass@redis:6379/0")
        span.set_attribute("hook", "https://h.example/runware?token=tok-abc123")
        span.set_attribute("list", [f"k={SECRET}"])
        span.add_event("retry", {"reason": f"Bearer {SECRET} refused"})
        try:
            raise RuntimeError(f"failed with {SECRET}")
        except RuntimeError as exc:
            span.record_exception(exc)
            span.set_status(StatusCode.ERROR, f"failed with {SECRET}")
    provider.shutdown()


def test_no_secret_reaches_the_exporter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNWARE_API_KEY", SECRET)
    from config.settings import get_settings

    get_settings.cache_clear()
    try:
        resource_attributes = {"service.name": "s", "cmd": f"--key {SECRET}"}
        # The control: without the filter, the scan finds each planted secret.
        raw = Kept()
        _spans_with_secrets(raw, Resource(resource_attributes))
        text = _everything(raw.spans)
        for planted in (SECRET, "hunter2-pass", "tok-abc123"):
            assert planted in text
        kept = Kept()
        monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", f"cmd=--key {SECRET}")
        masked_resource = trace_export.resource("s")
        _spans_with_secrets(trace_export.Redacting(lambda: kept, masked_resource), Resource({}))
        text = _everything(kept.spans)
        for planted in (SECRET, "hunter2-pass", "tok-abc123"):
            assert planted not in text, planted
        assert "retry" in text
        assert "failed with" in text
        assert kept.spans[0].resource.attributes["cmd"] == "--key <redacted>"
    finally:
        get_settings.cache_clear()


def _tracing_into(kept: Kept) -> Any:
    """This process's tracing (tasks/tracing.py's state) exporting into `kept`, not globally."""
    import os

    from tasks import tracing

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(kept))
    return tracing._Active(os.getpid(), provider, provider.get_tracer("test"))


def test_the_wait_in_the_intake_is_a_span_of_the_jobs_trace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tasks import tracing

    kept = Kept()
    monkeypatch.setattr(tracing, "_active", _tracing_into(kept))
    waits = tracing.IntakeWaits(limit=2)
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    waits.taken_in("t1", f"00-{trace_id}-{parent_id}-01")
    waits.granted("t1", "acme", "interactive", 1.5)
    [span] = kept.spans
    assert span.name == "fair intake wait"
    assert span.context is not None
    assert span.parent is not None
    assert (f"{span.context.trace_id:032x}", f"{span.parent.span_id:016x}") == (trace_id, parent_id)
    assert span.end_time is not None
    assert span.start_time is not None
    assert (span.end_time - span.start_time) / 1e9 == pytest.approx(1.5, abs=0.01)
    assert span.attributes is not None
    assert dict(span.attributes)["enhance.account"] == "acme"
    waits.granted("t1", "acme", "interactive", 1.5)  # granted once: nothing more
    assert len(kept.spans) == 1
    # Bounded: the oldest are forgotten first; and all of them when the role goes elsewhere.
    for n in (2, 3, 4):
        waits.taken_in(f"t{n}", f"00-{trace_id}-{parent_id}-01")
    assert len(waits) == 2
    waits.granted("t2", "acme", "batch", 0.1)
    assert len(kept.spans) == 1
    waits.forget()
    assert len(waits) == 0


def test_off_the_intake_remembers_nothing() -> None:
    from tasks import tracing

    assert not tracing.active()
    waits = tracing.IntakeWaits()
    waits.taken_in("t1", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    assert len(waits) == 0


def test_a_log_line_written_in_a_span_carries_its_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    from tasks import tracing
    from workers.logs import TEXT_FORMAT, JsonFormatter, TextFormatter, TraceIds

    active = _tracing_into(Kept())
    monkeypatch.setattr(tracing, "_active", active)

    def line(formatter: logging.Formatter) -> str:
        record = logging.LogRecord("t", logging.INFO, __file__, 1, "done", None, None)
        TraceIds().filter(record)
        return formatter.format(record)

    assert "trace_id" not in line(TextFormatter(TEXT_FORMAT))  # outside a span
    with active.tracer.start_as_current_span("run") as span:
        ids = span.get_span_context()
        trace_id, span_id = f"{ids.trace_id:032x}", f"{ids.span_id:016x}"
        text, record = line(TextFormatter(TEXT_FORMAT)), json.loads(line(JsonFormatter()))
    assert text.endswith(f"done trace_id={trace_id} span_id={span_id}")
    assert (record["trace_id"], record["span_id"]) == (trace_id, span_id)
