"""Worker process life cycle: logging, pools sized to the real concurrency, the fair intake (the
worker consumes granted jobs only, and runs a dispatcher candidate), the reconciler of unsettled
calls, and the ready line."""

from __future__ import annotations

import gc
import logging
from typing import Any

from celery import signals

from config import redis as redis_urls
from config.keys import FairKeys
from config.settings import get_settings, unknown_variables
from tasks import ledger, runware, tracing
from tasks.base import RunwareTask
from tasks.dispatcher import worker_id
from workers import logs
from workers.fleet import FleetMember

logger = logging.getLogger(__name__)

# The queues this worker would have consumed (CELERY_TASK_DEFAULT_QUEUE, `enhance`, or -Q): the
# dispatcher takes jobs from them into the fair queues; the worker threads consume the ready queue.
_intake_queues: list[str] = []
_members: list[FleetMember] = []
_ident: list[str] = []


@signals.setup_logging.connect
def setup_logging(**_: Any) -> None:
    """Our own logging set-up (Celery's is skipped when this signal has a receiver)."""
    logs.setup(get_settings())


def _concurrency(sender: Any) -> int:
    """The worker's concurrency (-c, else WORKER_CONCURRENCY), from the WorkController or the
    Consumer a signal comes from."""
    controller = getattr(sender, "controller", None) or sender
    return int(getattr(controller, "concurrency", None) or get_settings().worker_concurrency)


@signals.worker_init.connect
def size_pools(sender: Any = None, **_: Any) -> None:
    """Size the Runware and Redis connection pools to the concurrency the worker really runs
    with (-c overrides WORKER_CONCURRENCY)."""
    concurrency = _concurrency(sender)
    runware.configure_pool(concurrency)
    redis_urls.configure_concurrency(concurrency)
    # This process's id in the fleet's heartbeats, known before the pool forks: a reservation
    # records the process holding its call (a prefork child names its parent).
    _ident.append(worker_id())
    ledger.set_holder(_ident[-1])
    # Tracing, when the OTEL_* variables ask for it (tasks/tracing.py): set up before the pool
    # starts, so the dispatcher's spans and the threads' are in it; a prefork child's exporter
    # thread is restarted by the SDK after the fork.
    tracing.setup()


@signals.celeryd_after_setup.connect
def consume_granted_jobs(sender: Any = None, instance: Any = None, **_: Any) -> None:
    """Worker threads take jobs from the ready queue only (jobs the dispatcher granted); the
    queues they would have consumed become the dispatcher's intake."""
    global _intake_queues
    queues = instance.app.amqp.queues
    _intake_queues = sorted(queues.consume_from)
    ready = FairKeys(get_settings().key_prefix).ready
    queues.add(ready)
    queues.select([ready])


@signals.task_received.connect
def expect_a_call(request: Any = None, **_: Any) -> None:
    """A received job of a RunwareTask starts in a moment: a request this process holds open
    waits for it (tasks/batching.py). (The threads pool: a prefork child batches nothing.)"""
    task = getattr(request, "task", None)
    if isinstance(task, RunwareTask) and request.id:
        runware.get_client().expect(str(request.id))


@signals.worker_process_init.connect
def fresh_http_session(**_: Any) -> None:
    """A forked pool process must not share its parent's sockets: start a new session."""
    runware.reset_client()


@signals.worker_process_init.connect
def freeze_the_heap(**_: Any) -> None:
    """Move everything loaded so far (Celery, kombu, pydantic, the settings: several hundred
    thousand objects) out of the garbage collector's sight. Its full collections otherwise walk
    them all, and every thread of the process stops for 15 to 45 ms each time: the slowest
    1% of jobs waited that long. Objects made later are collected as usual."""
    gc.collect()
    gc.freeze()


@signals.worker_ready.connect
def announce_ready(sender: Any = None, **_: Any) -> None:
    """Join the fleet (workers/fleet.py: the dispatcher candidate, the reconciler, the metrics
    endpoint), warn when no API key is set, then say the worker is ready (tests and tools wait
    for it)."""
    settings = get_settings()
    for line in unknown_variables():
        logger.warning(line)
    threads = _concurrency(sender)
    if not _intake_queues:
        _intake_queues.append(settings.celery_task_default_queue)
    ident = _ident[-1] if _ident else worker_id()
    ledger.set_holder(ident)
    member = FleetMember(sender.app, settings, tuple(_intake_queues), threads, ident)
    member.start()  # (what it starts, in order: workers/fleet.py)
    _members.append(member)
    if settings.runware_api_key is None:
        logger.warning(
            "RUNWARE_API_KEY is not set: this worker makes no call, and the first job it takes "
            "pauses the fleet (the jobs wait; `enhance-worker limits show`). Set "
            "RUNWARE_API_KEY (and RUNWARE_API_URL for the sandbox), then restart the worker."
        )
    freeze_the_heap()
    logger.info(
        "Worker %s is ready to take jobs (Runware endpoint %s, pool %s, %d threads, Redis "
        "pools of %d connections).",
        getattr(sender, "hostname", "?"),
        settings.runware_api_url,
        settings.worker_pool,
        threads,
        redis_urls.pool_size(),
    )


@signals.worker_shutting_down.connect
def leave_the_fleet(**_: Any) -> None:
    """Stop granting jobs to this worker: it leaves the fleet's thread count at once."""
    for member in _members:
        member.stop()


@signals.worker_shutdown.connect
def export_the_last_spans(**_: Any) -> None:
    """Export the spans still buffered, then stop the exporter (tracing on only)."""
    tracing.shutdown()


@signals.worker_process_shutdown.connect
def export_a_childs_last_spans(**_: Any) -> None:
    """A prefork child exports its buffered spans before it exits."""
    tracing.flush()
