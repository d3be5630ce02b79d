"""The one exception tree of the service, and the one place that decides what is worth a retry.

Every class takes a single message argument, so Celery can store it as JSON and rebuild it on the
client side; extra facts (Runware's `code`, `Retry-After`) are attributes with defaults.

`runware_error` maps an answer of Runware to a class; `for_policy` maps anything a task body
raised to what the retry policy (tasks/base.py) does with it: a TransientError is retried, any
other WorkerError fails the job at once, anything else is a bug and fails with its traceback.
(`tasks.ValidationError` is this module's class; pydantic's is only ever written
`pydantic.ValidationError`, so the two cannot be confused.)
"""

from __future__ import annotations

import redis


class WorkerError(Exception):
    """Root of every error this service raises on purpose."""


# The code of a budget refusal that only waits for unsettled calls to be reconciled (the ledger
# raises it as a TransientError; tasks/base.py waits it out without spending retries).
BUDGET_UNSETTLED = "budgetUnsettled"


class ValidationError(WorkerError, ValueError):
    """A request argument is missing, of the wrong type or out of range; never retried."""


class PermanentError(WorkerError):
    """Runware refused the request for a reason a retry cannot fix (400/401/402/403/404)."""

    def __init__(self, message: str, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class AuthenticationError(PermanentError):
    """Runware rejected the API key (missing, invalid or without permission)."""


class TransientError(WorkerError):
    """A failure that may pass: 408/429/5xx, a timeout, a dropped connection or a garbled body."""

    def __init__(
        self,
        message: str,
        code: str | None = None,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.retry_after = retry_after


class RateLimited(TransientError):
    """Runware asked us to slow down (429) or said it is over capacity (503).

    `strike`: whether this task counts the request's one strike against the fleet's cool-down
    (a throttled request counts once, however many tasks it carried)."""

    strike = True


class ConflictTaskUUID(WorkerError):
    """Runware already accepted this taskUUID (409); its result must be fetched, not resent."""


class TaskTimeout(WorkerError):
    """An asynchronous Runware task did not finish before its deadline."""


class BudgetExceeded(WorkerError):
    """The task's estimated cost would pass a daily budget; it fails without calling Runware."""


# Codes that name a passing condition even when Runware reports them in a 200 body.
TRANSIENT_CODES = frozenset({"timeoutProvider", "serverError", "providerError", "timeout"})
AUTH_CODES = frozenset({"invalidApiKey", "missingApiKey"})


def runware_error(
    message: str, status: int, code: str | None, retry_after: float | None = None
) -> WorkerError:
    """The error for Runware's answer `status` (200 when the error came inside a 200 body) with
    error `code`: the one table of which answers are worth a retry."""
    if status == 409 or code == "conflictTaskUUID":
        return ConflictTaskUUID(message)
    if status in (401, 403) or code in AUTH_CODES:
        hint = " (check RUNWARE_API_KEY)" if status in (401, 403) else ""
        return AuthenticationError(message + hint, code=code, status=status)
    if status in (429, 503):
        return RateLimited(message, code=code, status=status, retry_after=retry_after)
    if status == 408 or status >= 500 or (status == 200 and code in TRANSIENT_CODES):
        return TransientError(message, code=code, status=status, retry_after=retry_after)
    return PermanentError(message, code=code, status=status)


def for_policy(exc: BaseException) -> WorkerError | None:
    """What the retry policy makes of an exception a task body raised: our own errors as they
    are; a Redis failure (the limits', the ledger's or the poller's Redis, already waited out
    for a while) as a TransientError; None for anything else (a bug, failed with its
    traceback, never retried)."""
    if isinstance(exc, WorkerError):
        return exc
    if isinstance(exc, redis.RedisError):
        return TransientError(f"Redis (limits or ledger) failed: {type(exc).__name__}: {exc}")
    return None
