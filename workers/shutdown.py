"""The worker's soft shutdown, bounded by the jobs that run rather than by the clock.

Celery's soft shutdown (SIGQUIT, or SIGTERM with REMAP_SIGTERM=SIGQUIT, as every deploy file
sets) sleeps the whole `worker_soft_shutdown_timeout` once any job runs, however soon it ends,
and an idle worker either stops at once or (with `worker_enable_soft_shutdown_on_idle`) sleeps
it too. Here the worker waits while jobs run, at most WORKER_SOFT_SHUTDOWN_S: an idle worker
stops at once, a busy one as soon as its running calls end (each recorded and acknowledged),
and what is still running after the timeout is handled by Celery's cold shutdown as before.
Delayed jobs (ETA, countdown) wait in Redis, in the fair intake, never in a worker, so an idle
worker has nothing to hand back.
"""

from __future__ import annotations

import logging
import time

from celery.apps.worker import Worker as CeleryWorker
from celery.worker import state

logger = logging.getLogger(__name__)
POLL_S = 0.05


class Worker(CeleryWorker):
    def wait_for_soft_shutdown(self) -> bool:
        """Wait while jobs run, at most the soft-shutdown timeout; whether there was a wait."""
        timeout = float(self.app.conf.worker_soft_shutdown_timeout or 0)
        if timeout <= 0 or not state.active_requests:
            return False
        logger.warning(
            "Soft shutdown: %d running job(s) get up to %gs to finish; no new job is taken.",
            len(state.active_requests),
            timeout,
        )
        deadline = time.monotonic() + timeout
        while state.active_requests and time.monotonic() < deadline:
            time.sleep(POLL_S)
        return True
