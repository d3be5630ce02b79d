"""Tracing with OpenTelemetry: one trace from the producer's request, through the wait in the
fair intake and the worker's run, to each Runware call (with its cost) and on to the chained
generation tasks.

On when the standard variables say so, and then only in worker processes (`setup`, from
workers/signals.py):
- OTEL_TRACES_EXPORTER names the exporters (`otlp`, `console`; `none` turns tracing off), or,
  when it is unset, OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set;
- OTEL_EXPORTER_OTLP_PROTOCOL (or ..._TRACES_PROTOCOL): `http/protobuf` (default) or `grpc`;
- OTEL_SERVICE_NAME (default `enhance-worker`), OTEL_RESOURCE_ATTRIBUTES, OTEL_BSP_* and the
  exporters' own OTEL_EXPORTER_OTLP_* variables as the SDK reads them; OTEL_SDK_DISABLED=true
  turns it off.
Off, nothing is set up: no provider, no exporter thread, no signal receiver of the Celery
instrumentation, and each call path pays one check of a module flag.

The Celery part is `opentelemetry-instrumentation-celery` (a producer span per publish, a
consumer span per run, the `traceparent` header carried across). Written here, because it cannot
know them: the wait in the fair intake (a span made by the dispatcher when it grants the job,
from the time the job entered the intake), the span of each Runware call with the job's account,
priority, attempt and cost, and the events of re-schedules and retries.

No secret leaves in a span: tasks/trace_export.py hands the exporter a copy of each span with
`redact` applied (the API key, URL credentials such as a Redis password, URL query strings such
as webhook tokens) to its name, attributes, events and status, and to the resource.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery import signals
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from config.settings import ConfigError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

logger = logging.getLogger(__name__)

SERVICE_NAME = "enhance-worker"
PROTOCOLS = ("http/protobuf", "grpc")
EXPORTERS = ("otlp", "console")
TRACEPARENT = "traceparent"
# Traceparents of jobs taken into the fair intake, kept (by the dispatcher, with tracing on)
# until the job is granted: the wait's span is made then. Oldest forgotten first beyond this.
INTAKE_MEMORY = 100_000


class TracingConfigError(ConfigError):
    """An OTEL_* variable this service cannot honour (the message names it)."""


@dataclass(frozen=True)
class Wanted:
    exporters: tuple[str, ...]
    protocol: str


def wanted(environ: Mapping[str, str] | None = None) -> Wanted | None:
    """What the standard variables ask for: None when tracing is off."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    named = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if named:
        exporters = tuple(e.strip() for e in named.split(",") if e.strip())
        if "none" in exporters:
            return None
        unknown = [e for e in exporters if e not in EXPORTERS]
        if unknown:
            raise TracingConfigError(
                f"OTEL_TRACES_EXPORTER={named}: {', '.join(unknown)} is not one this service "
                f"exports to (it takes {', '.join(EXPORTERS)} or none)"
            )
    elif env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        exporters = ("otlp",)
    else:
        return None
    variable = (
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
        if env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        else "OTEL_EXPORTER_OTLP_PROTOCOL"
    )
    protocol = (env.get(variable) or PROTOCOLS[0]).strip().lower()
    if protocol not in PROTOCOLS:
        raise TracingConfigError(
            f"{variable}={protocol}: this service exports OTLP over {' or '.join(PROTOCOLS)}"
        )
    return Wanted(exporters, protocol)


def check(environ: Mapping[str, str] | None = None) -> Wanted | None:
    """What the variables ask for, checked before the worker starts: a variable it cannot
    honour, or tracing asked of an install without the `tracing` extra, raises
    TracingConfigError (the worker then stops with that one line)."""
    want = wanted(environ)
    if want is not None:
        try:
            import opentelemetry.instrumentation.celery
            import opentelemetry.sdk.trace

            if "otlp" in want.exporters and want.protocol == "grpc":
                import opentelemetry.exporter.otlp.proto.grpc.trace_exporter
            elif "otlp" in want.exporters:
                import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
        except ImportError as exc:
            raise TracingConfigError(
                "tracing is asked for (OTEL_TRACES_EXPORTER or OTEL_EXPORTER_OTLP_ENDPOINT) but "
                f"the `tracing` extra is not installed ({exc.name}): pip install "
                "'enhance-worker[tracing]'"
            ) from None
    return want


# --- the process's tracer ----------------------------------------------------------------------
@dataclass
class _Active:
    pid: int
    provider: TracerProvider
    tracer: trace.Tracer


_active: _Active | None = None
_setup_lock = threading.Lock()


def active() -> bool:
    """Whether this process traces (one global read: the whole cost of tracing when off)."""
    return _active is not None


def setup(environ: Mapping[str, str] | None = None) -> bool:
    """Start tracing in this process if the variables ask for it; True when it traces.

    Raises TracingConfigError for a variable it cannot honour, and for tracing asked of an
    install without the `tracing` extra (the SDK and the exporters)."""
    global _active
    want = check(environ)
    if want is None:
        return False
    with _setup_lock:
        if _active is not None:
            return True
        from opentelemetry.instrumentation.celery import CeleryInstrumentor
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        from tasks import trace_export

        env = os.environ if environ is None else environ
        name = env.get("OTEL_SERVICE_NAME") or SERVICE_NAME
        resource = trace_export.resource(name)
        provider = TracerProvider(resource=resource)
        for kind in want.exporters:
            exporter = trace_export.Redacting(
                functools.partial(trace_export.exporter, kind, want.protocol), resource
            )
            # (The SDK restarts the processor's thread in a forked child, and the exporter is
            # built anew there: prefork pools too.)
            provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        CeleryInstrumentor().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call]
        _active = _Active(os.getpid(), provider, provider.get_tracer("enhance_worker"))
    logger.info(
        "Tracing on: %s spans over %s, service %s.", "+".join(want.exporters), want.protocol, name
    )
    return True


def shutdown() -> None:
    """Export what is left and stop the exporter threads (at worker shutdown)."""
    current = _active
    if current is not None and current.pid == os.getpid():
        current.provider.shutdown()


def flush() -> None:
    """Export what is left, keep tracing (a prefork child as it exits)."""
    current = _active
    if current is not None:
        current.provider.force_flush(5_000)


# --- spans and events of the job ---------------------------------------------------------------
@contextmanager
def runware_call(name: str, attributes: Mapping[str, Any]) -> Iterator[trace.Span | None]:
    """A span around one Runware call of a job (None when tracing is off). The wire layer adds
    what it learns to the current span (`on_call`); an exception ends it with an error status."""
    current = _active
    if current is None:
        yield None
        return
    with current.tracer.start_as_current_span(
        name, kind=trace.SpanKind.CLIENT, attributes=dict(attributes)
    ) as span:
        try:
            yield span
        except BaseException as exc:
            code = getattr(exc, "code", None)
            span.set_attribute("runware.status", str(code or type(exc).__name__))
            raise


def _recording() -> trace.Span | None:
    """The current span, when this process traces and one is recording."""
    if _active is None:
        return None
    span = trace.get_current_span()
    return span if span.is_recording() else None


def _given(attributes: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attributes.items() if v is not None}


def on_call(attributes: Mapping[str, Any]) -> None:
    """Add attributes to the current Runware call's span (no-op off, or outside one)."""
    span = _recording()
    if span is not None:
        span.set_attributes(_given(attributes))


def event(name: str, **attributes: Any) -> None:
    """An event on the current span (the job's run): a re-schedule, a retry."""
    span = _recording()
    if span is not None:
        span.add_event(name, _given(attributes))


def log_ids() -> tuple[str, str] | None:
    """The current trace and span ids (hex) for a log line, or None."""
    if _active is None:
        return None
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


# --- the wait in the fair intake ---------------------------------------------------------------
class IntakeWaits:
    """The dispatcher's memory of the traceparent of each job it took in, until it grants it;
    then the wait becomes a span of the job's trace (from the moment the job entered the fair
    intake to its grant). Bounded: beyond INTAKE_MEMORY waiting jobs, the oldest are forgotten
    (their wait shows in the metrics only). Polls are not remembered (their run continues a
    call, and one woken by its webhook passes without a grant). A job taken in by another
    dispatcher process (after a hand-over) has no such span."""

    def __init__(self, limit: int = INTAKE_MEMORY) -> None:
        self._parents: OrderedDict[str, str] = OrderedDict()
        self._limit = limit

    def taken_in(self, task_id: str, traceparent: str) -> None:
        """A job taken into the fair intake (not a poll: its run continues a call)."""
        if _active is None or not traceparent or not task_id:
            return
        self._parents[task_id] = traceparent
        self._parents.move_to_end(task_id)
        while len(self._parents) > self._limit:
            self._parents.popitem(last=False)

    def forget(self) -> None:
        """This process no longer dispatches: the jobs it took in are granted by another."""
        self._parents.clear()

    def __len__(self) -> int:
        return len(self._parents)

    def granted(self, task_id: str, account: str, priority: str, waited_s: float) -> None:
        current = _active
        parent = self._parents.pop(task_id, None)
        if current is None or parent is None:
            return
        context = propagate.extract({TRACEPARENT: parent})
        waited_s = max(0.0, waited_s)  # (Redis's clock may step back by microseconds)
        end = time.time_ns()
        span = current.tracer.start_span(
            "fair intake wait",
            context=context,
            kind=trace.SpanKind.INTERNAL,
            start_time=end - int(waited_s * 1e9),
            attributes={
                "messaging.message.id": task_id,
                "enhance.account": account,
                "enhance.priority": priority,
                "enhance.wait_s": waited_s,
            },
        )
        span.end(end_time=end)


# --- the producer's side ------------------------------------------------------------------------
@signals.before_task_publish.connect
def _carry_the_trace(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """Every job this project publishes (the helpers, chains, retries) carries the producer's
    current trace as a W3C `traceparent` header, when the producer has one and sets none itself
    (an instrumented producer's own receiver sets it; a worker's re-schedule keeps its job's)."""
    if headers is None or TRACEPARENT in headers:
        return
    if not trace.get_current_span().get_span_context().is_valid:
        return
    propagate.inject(headers, context=otel_context.get_current())
