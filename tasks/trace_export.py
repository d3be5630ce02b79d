"""What leaves the process when it traces (tasks/tracing.py): the exporters the OTEL_* variables
name, each behind a filter that masks secrets in every span.

Imported only once tracing is set up: it needs the `tracing` extra (the SDK and the OTLP
exporters)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import Status

from tasks.redact import redact


def exporter(kind: str, protocol: str) -> SpanExporter:
    """The SDK's exporter of that kind; an OTLP one reads its endpoint, headers, timeout and
    compression from the standard OTEL_EXPORTER_OTLP_* variables itself."""
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    return HttpExporter()


def resource(service_name: str) -> Resource:
    """The process's resource (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, the SDK's own),
    masked."""
    found = Resource.create({"service.name": service_name})
    return Resource(_masked_attributes(found.attributes), found.schema_url)


def _masked(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Sequence) and not isinstance(value, bytes):
        return tuple(_masked(v) for v in value)
    return value


def _masked_attributes(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    return {redact(k): _masked(v) for k, v in (attributes or {}).items()}


class Redacting(SpanExporter):
    """Hands the exporter `make()` builds a masked copy of each span: its name, attributes,
    events (an exception's message and stack trace are an event) and status description.

    The exporter is built in the process that exports, on its first export there: a prefork
    child never uses its parent's gRPC channel or HTTP connections (neither survives a fork)."""

    def __init__(self, make: Callable[[], SpanExporter], masked_resource: Resource) -> None:
        self._make = make
        self._resource = masked_resource
        self._lock = threading.Lock()
        self._inner: tuple[int, SpanExporter] | None = None

    @property
    def inner(self) -> SpanExporter:
        with self._lock:
            if self._inner is None or self._inner[0] != os.getpid():
                self._inner = (os.getpid(), self._make())
            return self._inner[1]

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self.inner.export([self._copy(span) for span in spans])

    def _copy(self, span: ReadableSpan) -> ReadableSpan:
        status = span.status
        return ReadableSpan(
            name=redact(span.name),
            context=span.context,
            parent=span.parent,
            resource=self._resource,
            attributes=_masked_attributes(span.attributes),
            events=[
                Event(redact(e.name), _masked_attributes(e.attributes), e.timestamp)
                for e in span.events
            ],
            links=span.links,
            kind=span.kind,
            status=Status(status.status_code, redact(status.description or "") or None),
            start_time=span.start_time,
            end_time=span.end_time,
            instrumentation_scope=span.instrumentation_scope,
        )

    def shutdown(self) -> None:
        held = self._inner
        if held is not None and held[0] == os.getpid():
            held[1].shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        held = self._inner
        if held is None or held[0] != os.getpid():
            return True  # nothing exported here yet: nothing to flush
        return held[1].force_flush(timeout_millis)
