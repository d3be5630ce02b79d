"""The shared Task class: the retry policy, written once.

- ValidationError, PermanentError and other WorkerErrors fail the task at once, logged once at
  ERROR with a message that says what was wrong.
- TransientError retries with exponential back-off and full jitter, capped, honouring Retry-After,
  at most RUNWARE_MAX_RETRIES times; then the task fails with the last error and the retry count.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import redis
from celery import Task
from celery.exceptions import Ignore

from config.settings import get_settings
from tasks.errors import LimiterBusy, TransientError, ValidationError, WorkerError
from tasks.ledger import get_ledger

logger = logging.getLogger(__name__)
T = TypeVar("T")


class Costed(Protocol):
    @property
    def cost(self) -> float: ...


C = TypeVar("C", bound=Costed)

# A server's Retry-After is honoured in full up to this bound; beyond it we assume a bogus header.
RETRY_AFTER_CEILING_S = 600.0


def backoff_seconds(retries: int, base: float, cap: float, retry_after: float | None) -> float:
    """Full-jitter exponential back-off: uniform(0, min(cap, base * 2**retries)), but never
    sooner than the server's Retry-After (itself bounded by RETRY_AFTER_CEILING_S)."""
    ceiling = min(cap, base * (2 ** min(retries, 32)))
    delay = random.uniform(0.0, ceiling)
    if retry_after is not None:
        delay = max(delay, min(retry_after, RETRY_AFTER_CEILING_S))
    return delay


class RunwareTask(Task):  # type: ignore[type-arg]
    """Base of every task that calls Runware."""

    # Our own errors are expected outcomes: Celery logs them without a traceback; we log them once.
    throws = (WorkerError,)
    typing = False

    def keyword_only(self, args: tuple[Any, ...]) -> None:
        """Refuse positional arguments with a message that says how to call the task."""
        if args:
            raise ValidationError(
                f"{self.name} takes keyword arguments only (got {len(args)} positional)"
            )

    def reschedule(self, countdown: float, why: str) -> Ignore:
        """Send this job again in `countdown` seconds without touching its retry budget.

        Waiting for the fleet's limits is not a failure: the new message keeps the task id,
        arguments, retry count and chain links, and this run ends without a state change.
        """
        logger.info(
            "Task %s (%s) waits for the fleet's Runware limits (%s); re-scheduled in %.1fs.",
            self.request.id,
            self.name,
            why,
            countdown,
        )
        self.signature_from_request(
            self.request, countdown=countdown, retries=self.request.retries
        ).apply_async()
        return Ignore(f"re-scheduled in {countdown:.1f}s")

    def billed(self, task_uuid: str, account: str, estimate_usd: float, call: Callable[[], C]) -> C:
        """Reserve the estimate under the budgets, make the call, record its real cost once.

        A transient failure keeps the reservation (the call may have been billed; the retry
        reuses it, and it expires if the task dies); any other failure releases it.
        """
        ledger = get_ledger()
        ledger.reserve(task_uuid, account, estimate_usd)
        try:
            result = call()
        except (TransientError, LimiterBusy):
            raise
        except BaseException:
            ledger.release(task_uuid)
            raise
        ledger.commit(task_uuid, account, result.cost)
        return result

    def guarded(self, call: Callable[[], T]) -> T:
        """Run `call`, turning a TransientError into a retry and any WorkerError into a failure."""
        task_id = self.request.id
        try:
            try:
                return call()
            except redis.RedisError as exc:
                raise TransientError(
                    f"Redis (limiter or ledger) failed: {type(exc).__name__}: {exc}"
                ) from None
        except TransientError as exc:
            settings = get_settings()
            retries = int(self.request.retries or 0)
            if retries >= settings.runware_max_retries:
                logger.error(
                    "Task %s (%s) gave up after %d retries: %s",
                    task_id,
                    self.name,
                    retries,
                    exc,
                )
                raise type(exc)(
                    f"{exc} (gave up after {retries} retries)",
                    code=exc.code,
                    status=exc.status,
                    retry_after=exc.retry_after,
                ) from None
            countdown = backoff_seconds(
                retries,
                settings.runware_retry_backoff_s,
                settings.runware_retry_backoff_max_s,
                exc.retry_after,
            )
            logger.warning(
                "Task %s (%s) will retry in %.2fs (retry %d of %d): %s",
                task_id,
                self.name,
                countdown,
                retries + 1,
                settings.runware_max_retries,
                exc,
            )
            raise self.retry(exc=exc, countdown=countdown, max_retries=None) from None
        except LimiterBusy as exc:
            raise self.reschedule(exc.countdown, str(exc)) from None
        except WorkerError as exc:
            logger.error("Task %s (%s) failed: %s", task_id, self.name, exc)
            raise
