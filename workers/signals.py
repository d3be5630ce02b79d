"""Worker process life cycle: logging, the HTTP session after fork, and the ready line."""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

from config.settings import get_settings
from tasks import runware
from workers import logs, metrics

logger = logging.getLogger(__name__)


@signals.setup_logging.connect
def setup_logging(**_: Any) -> None:
    """Our own logging set-up (Celery's is skipped when this signal has a receiver)."""
    logs.setup(get_settings())


@signals.worker_init.connect
def size_http_pool(sender: Any = None, **_: Any) -> None:
    """Size the Runware connection pool to the worker's concurrency (threads share one)."""
    concurrency = getattr(sender, "concurrency", None) or get_settings().worker_concurrency
    runware.configure_pool(int(concurrency))


@signals.worker_process_init.connect
def fresh_http_session(**_: Any) -> None:
    """A forked pool process must not share its parent's sockets: start a new session."""
    runware.reset_client()


@signals.worker_ready.connect
def announce_ready(sender: Any = None, **_: Any) -> None:
    """Start the metrics endpoint, then say the worker is ready (tests and tools wait for it)."""
    settings = get_settings()
    queues = list(sender.app.amqp.queues.keys()) if sender is not None else ["celery"]
    metrics.serve(settings, queues)
    target = settings.runware_api_url
    logger.info(
        "Worker %s is ready to take jobs (Runware endpoint %s, pool %s).",
        getattr(sender, "hostname", "?"),
        target,
        settings.worker_pool,
    )
