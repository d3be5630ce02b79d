"""What leaves the process when it traces (tasks/tracing.py): the exporters the OTEL_* variables
name, each behind a filter that masks secrets in every span.

Imported only once tracing is set up: it needs the `tracing` extra (the SDK and the OTLP
exporters)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    """Hands `inner` a masked copy of each span: its name, attributes, events (an exception's
    message and stack trace are an event) and status description."""

    def __init__(self, inner: SpanExporter, masked_resource: Resource) -> None:
        self._inner = inner
        self._resource = masked_resource

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self._inner.export([self._copy(span) for span in spans])

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
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self._inner.force_flush(timeout_millis)
