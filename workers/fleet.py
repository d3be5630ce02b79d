"""What a worker process starts when it joins the fleet, and stops when it leaves: in one place,
in order. workers/signals.py builds it when the worker is ready and stops it at shutdown.

Started, in this order:
1. the run-time state of the fleet brought up to date: a paused fleet resumes when this worker
   brings a new API key; an earlier version's limit overrides are carried over;
2. the dispatcher candidate (tasks/dispatcher.py): registers this worker's threads, and holds
   the dispatcher role when no other process does;
3. the reconciler of unsettled calls (tasks/reconcile.py);
4. the metrics endpoint (workers/metrics.py), when METRICS_PORT is set.
Stopped at shutdown: the reconciler, then the dispatcher (this worker leaves the fleet's thread
count at once, and its role goes to another process within seconds). The metrics endpoint
serves until the process ends.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from celery import Celery

from config.settings import Settings
from tasks import metrics as task_metrics
from tasks.base import RunwareTask
from tasks.dispatcher import Dispatcher, Intake
from tasks.limiter import broker_redis, carry_over_old_overrides, get_limiter
from tasks.reconcile import Reconciler
from workers import metrics
from workers.events import IntakeEvents

logger = logging.getLogger(__name__)


@dataclass
class FleetMember:
    """This worker process's part in the fleet."""

    app: Celery
    settings: Settings
    queues: tuple[str, ...]  # the Celery queues the dispatcher takes jobs from
    threads: int
    ident: str
    dispatcher: Dispatcher | None = field(default=None, init=False)
    reconciler: Reconciler | None = field(default=None, init=False)

    def start(self) -> None:
        settings, app = self.settings, self.app
        intake = Intake(
            queues=self.queues,
            runware_tasks=frozenset(n for n, t in app.tasks.items() if isinstance(t, RunwareTask)),
            known_tasks=frozenset(app.tasks),
        )
        client = broker_redis(settings)
        get_limiter().resume_with_a_new_key()  # 1.
        if carry_over_old_overrides(client, settings):
            logger.info("Carried the run-time limit overrides over to the fair intake's keys.")
        events = IntakeEvents(app, settings.celery_task_default_queue)
        self.dispatcher = Dispatcher(  # 2.
            client, settings, intake, self.threads, get_limiter(), self.ident, on_waiting=events
        )
        self.dispatcher.start()
        self.reconciler = Reconciler(settings)  # 3.
        self.reconciler.start()
        task_metrics.start_at_zero(intake.runware_tasks)  # 4.
        task_metrics.ACCOUNTS.configure(
            settings.metrics_top_accounts, settings.metrics_account_idle_s
        )
        metrics.serve(settings, self.queues, self.ident)

    def stop(self) -> None:
        if self.reconciler is not None:
            self.reconciler.stop()
        if self.dispatcher is not None:
            self.dispatcher.stop()
            self.dispatcher.join(timeout=3.0)
