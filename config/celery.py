"""The Celery app, configured from Settings. Producers and workers share this one object."""

from __future__ import annotations

from celery import Celery

from config import redis as redis_urls
from config import transport
from config.keys import FairKeys
from config.settings import Settings, get_settings

TASK_MODULES = ["tasks.enhancement", "tasks.generate", "tasks.pipelines", "tasks.reconcile"]


def result_backend_url(url: str) -> str:
    """A Redis URL (any form config/redis.py takes) as Celery's `module:Class+url` form for
    config/backend.py's ResultStore (one round trip per state write); any other backend URL as
    it is."""
    if redis_urls.is_sentinel(url):
        return f"config.backend:SentinelResultStore+{url}"
    if redis_urls.is_redis(url):
        return f"config.backend:ResultStore+{redis_urls.backend_url(url)}"
    return url


def configure(app: Celery, settings: Settings) -> None:
    """Apply Settings to a Celery app: JSON only, late acks, events, the worker pool."""
    transport.register()  # the project's transport for kombu's Redis URL schemes
    broker_url, broker_ssl = redis_urls.broker_options(settings.broker_url)
    keys = FairKeys(settings.key_prefix)
    # A sentinel:// URL's group, as Celery documents it (`master_name`, `sentinel_kwargs`).
    group = settings.sentinel.transport_options() if settings.sentinel else {}
    app.conf.update(
        broker_url=broker_url,
        broker_use_ssl=broker_ssl,
        result_backend=result_backend_url(settings.result_backend),
        redis_backend_use_ssl=redis_urls.ssl_options(settings.result_backend),
        # JSON only: a pickle message could run code in the worker, and a secret could hide in it.
        # The fleet's own queue: another Celery app on the same Redis keeps `celery` to itself.
        task_default_queue=settings.celery_task_default_queue,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        result_expires=settings.celery_result_expires_s,
        # Celery 5.7 marks a compressed result in the stored value itself: any 5.7+ reader
        # decodes it, whatever its own setting.
        result_compression=settings.celery_result_compression,
        # How soon a dead worker's unacknowledged jobs are delivered again; the same for the
        # result backend so that chords and results agree on it.
        broker_transport_options={
            "visibility_timeout": settings.celery_visibility_timeout_s,
            # kombu sweeps for expired unacked jobs every interval x throttle seconds (100 s by
            # default); sweep often enough that a dead worker's jobs return soon after the
            # visibility timeout. One sweep is one ZRANGE on a small index.
            "unacked_restore_interval": max(1, min(10, settings.celery_visibility_timeout_s // 4)),
            "unacked_restore_throttle": 1,
            # The sweep holds a lock in Redis; if a worker is killed while holding it, no other
            # worker may sweep until it expires (kombu's default: 300 s).
            "unacked_mutex_expire": max(5, min(300, settings.celery_visibility_timeout_s // 2)),
            # The worker's transport clears the fair dispatcher's record of a granted job in the
            # transaction that writes kombu's unacknowledged entry, and gives back the job's
            # slot in the one that acknowledges it (config/transport.py).
            "fair_transit_key": keys.transit,
            "fair_transit_at_key": keys.transit_at,
            "fair_leases_key": keys.leases,
            "fair_busy_key": keys.busy,
            "fair_wake_key": keys.wake,
            # ... and sets aside a message in the ready queue that kombu cannot read.
            "fair_rejected_key": keys.rejected,
            **group,
        },
        result_backend_transport_options={
            "visibility_timeout": settings.celery_visibility_timeout_s,
            **group,
        },
        # A job is acknowledged after it ran, so a killed worker's jobs are delivered again.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # Long I/O waits: prefetching more than one message per slot would park work behind them.
        worker_prefetch_multiplier=1,
        worker_pool=settings.worker_pool,
        worker_concurrency=settings.worker_concurrency,
        # Flower shows a job from enqueue to result only when both kinds of event are sent.
        # The task-sent event comes from the fleet's dispatcher as it takes in a job that waits
        # (for any producer's job: workers/events.py); sending it from here too would cost every
        # send a second publish, for an event Flower has or does not need.
        worker_send_task_events=True,
        task_send_sent_event=False,
        # No STARTED state write: it would cost a result-backend read and write per job, and
        # Flower learns that a job started from the task-started event anyway.
        task_track_started=False,
        # A lost broker connection is retried for ever; jobs running at that moment are
        # cancelled, since Redis will deliver them again (no duplicate run alongside).
        broker_connection_retry_on_startup=True,
        broker_connection_retry=True,
        broker_connection_max_retries=None,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        result_backend_always_retry=True,
        result_backend_max_retries=20,
        # Soft shutdown (on SIGQUIT, or SIGTERM with REMAP_SIGTERM=SIGQUIT): running jobs get
        # up to this long to finish (workers/shutdown.py waits only while they run), then they
        # are requeued; an idle worker stops at once.
        worker_soft_shutdown_timeout=settings.worker_soft_shutdown_s,
        worker_enable_soft_shutdown_on_idle=False,
        worker_hijack_root_logger=False,
        # A job of a task this worker does not register goes back to its queue, and a message
        # it cannot decode goes to the dead letters: Celery's own consumer drops both.
        worker_consumer="workers.consumer:Consumer",
        timezone="UTC",
    )


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app configured from `settings` (default: the environment)."""
    app = Celery("enhance_worker", include=TASK_MODULES, amqp="config.transport:AMQP")
    configure(app, settings or get_settings())
    return app


app = create_app()
