"""The retry policy as decisions, and the fate of a call's budget reservation: pure functions of
what happened, with no Redis and no Celery, so that each rule has a unit test that runs in
microseconds (tests/unit/test_policy.py). tasks/base.py applies them.

After a TransientError a job:
- waits for unsettled calls to be reconciled (a budget refusal that may fit once they are), its
  retries untouched, for at most RUNWARE_BUDGET_WAIT_MAX_S from its first such refusal;
- else retries after a full-jitter exponential back-off (capped, never sooner than the server's
  Retry-After, itself capped), at most `limit` times;
- else gives up, failing with the last error and the retry count.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from celery.exceptions import Ignore, Retry

from config.settings import Settings
from tasks.errors import BUDGET_UNSETTLED, AuthenticationError, PermanentError, TransientError


def backoff_seconds(
    retries: int,
    base: float,
    cap: float,
    retry_after: float | None,
    retry_after_cap: float,
    uniform: Callable[[float, float], float] = random.uniform,
) -> float:
    """Full-jitter exponential back-off: uniform(0, min(cap, base * 2**retries)), but never
    sooner than the server's Retry-After (itself bounded by `retry_after_cap`)."""
    ceiling = min(cap, base * (2 ** min(retries, 32)))
    delay = uniform(0.0, ceiling)
    if retry_after is not None:
        delay = max(delay, min(retry_after, retry_after_cap))
    return delay


@dataclass(frozen=True)
class WaitForBudget:
    """Re-schedule the job, its retries untouched: it may fit once unsettled calls settle."""

    countdown: float
    since: float  # epoch seconds of its first such refusal (carried in its next message)
    why: str


@dataclass(frozen=True)
class RetryIn:
    """Retry the job after `countdown` seconds: retry number `attempt` of at most `limit`."""

    countdown: float
    attempt: int
    limit: int


@dataclass(frozen=True)
class GiveUp:
    """Fail the job with `error` (the last one, with the retry count)."""

    error: TransientError


Decision = WaitForBudget | RetryIn | GiveUp


@dataclass(frozen=True)
class RetryPolicy:
    """One task's policy: its own options (`retry_limit`, `retry_backoff_s`,
    `retry_backoff_max_s`) where it has them, else the settings."""

    limit: int
    backoff_s: float
    backoff_max_s: float
    retry_after_max_s: float
    budget_wait_max_s: float
    reconcile_s: float

    @classmethod
    def of(cls, task: Any, settings: Settings) -> RetryPolicy:
        def option(name: str, setting: Any) -> Any:
            own = getattr(task, name, None)
            return setting if own is None else own

        return cls(
            limit=option("retry_limit", settings.runware_max_retries),
            backoff_s=option("retry_backoff_s", settings.runware_retry_backoff_s),
            backoff_max_s=option("retry_backoff_max_s", settings.runware_retry_backoff_max_s),
            retry_after_max_s=settings.runware_retry_after_max_s,
            budget_wait_max_s=settings.runware_budget_wait_max_s,
            reconcile_s=settings.runware_reconcile_s,
        )

    def last_attempt(self, retries: int) -> bool:
        """Whether a run with `retries` retries behind it is the job's last: a transient
        failure then fails the job."""
        return retries >= self.limit

    def after(
        self,
        exc: TransientError,
        retries: int,
        budget_wait_since: float | None,
        now: float,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> Decision:
        """What the job does after `exc`, having retried `retries` times."""
        if exc.code == BUDGET_UNSETTLED:
            since = now if budget_wait_since is None else budget_wait_since
            left = self.budget_wait_max_s - (now - since)
            if left > 0:
                countdown = min(exc.retry_after or self.reconcile_s, left)
                why = f"waits for unsettled calls to be reconciled ({exc})"
                return WaitForBudget(countdown, since, why)
        if self.last_attempt(retries):
            reason = f"{exc} (gave up after {retries} retries)"
            error = type(exc)(reason, code=exc.code, status=exc.status, retry_after=exc.retry_after)
            return GiveUp(error)
        countdown = backoff_seconds(
            retries,
            self.backoff_s,
            self.backoff_max_s,
            exc.retry_after,
            self.retry_after_max_s,
            uniform,
        )
        return RetryIn(countdown, retries + 1, self.limit)


# --- a call's budget reservation ---------------------------------------------------------------
Fate = Literal["keep", "release", "give up"]


def reservation_fate(exc: BaseException, submitted: bool, last_attempt: bool) -> Fate:
    """What becomes of a call's budget reservation when the call ends with `exc`:
    - keep it: the job runs again and takes it up (a re-schedule or a Celery retry; a transient
      failure that will be retried; a refused key once Runware had accepted the task, whose
      poll waits for the key);
    - release it: Runware refused the call, so nothing was billed (a permanent error; a refused
      key before any submission);
    - give it up to the reconciler: Runware may have accepted and billed a call whose outcome
      the job will never learn (a transient failure on the last attempt, a timeout, a bug)."""
    if isinstance(exc, Ignore | Retry):
        return "keep"
    if isinstance(exc, TransientError):
        return "give up" if last_attempt else "keep"
    if isinstance(exc, AuthenticationError):
        return "keep" if submitted else "release"
    if isinstance(exc, PermanentError):
        return "release"
    return "give up"
