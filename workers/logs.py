"""Logging of the worker: one format (text or JSON lines) and a filter that masks secrets in
every record, whichever library wrote it (Celery logs task requests at DEBUG, for example).
With tracing on (tasks/tracing.py), a line written inside a span carries its trace and span ids
(JSON fields `trace_id` and `span_id`; at the end of a text line)."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from config.settings import Settings
from tasks import tracing
from tasks.redact import redact

TEXT_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"
# Fields a JSON line carries beyond the message, when a record has them (see tasks/base.py).
EXTRA_FIELDS = (
    "task_id",
    "task_name",
    "taskUUID",
    "duration_s",
    "cost",
    "outcome",
    "trace_id",
    "span_id",
)


class RedactingFilter(logging.Filter):
    """Formats each record's message once and masks secrets in it (and in its traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


class TraceIds(logging.Filter):
    """Adds the current trace and span ids to a record written inside a span (tracing on)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ids = tracing.log_ids()
        if ids is not None:
            record.trace_id, record.span_id = ids
        return True


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT, then the trace and span ids when the record has them."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        trace_id = getattr(record, "trace_id", None)
        if trace_id is None:
            return line
        first, newline, rest = line.partition("\n")  # (before a traceback)
        ids = f" trace_id={trace_id} span_id={getattr(record, 'span_id', '')}"
        return f"{first}{ids}{newline}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, process, message and job fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
        }
        for name in EXTRA_FIELDS:
            if hasattr(record, name):
                line[name] = getattr(record, name)
        if record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps(line, default=str)


def setup(settings: Settings) -> None:
    """Configure the root logger for a worker process."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter())
    handler.addFilter(TraceIds())
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    # urllib3 logs every connection at DEBUG; nothing secret, but it drowns the job lines.
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    # tasks/base.py logs one line per job outcome (with taskUUID, duration and cost); Celery's
    # own INFO lines for the same events would say it again. Its warnings and errors still show.
    logging.getLogger("celery.app.trace").setLevel(logging.WARNING)
    # "Task ... received" for every job: the outcome line says everything that matters, and
    # at hundreds of jobs a second this line costs a measurable share of the worker's CPU.
    logging.getLogger("celery.worker.strategy").setLevel(
        logging.DEBUG if settings.log_level == "DEBUG" else logging.WARNING
    )
