"""The one place that decides what is worth a retry, and the service's exception tree.

The classes are defined in `enhance_client.errors` (the producer's side rebuilds a failure from
them without importing the worker) and are the same objects here.

`runware_error` maps an answer of Runware to a class; `for_policy` maps anything a task body
raised to what the retry policy (tasks/base.py) does with it: a TransientError is retried, any
other WorkerError fails the job at once, anything else is a bug and fails with its traceback.
(`tasks.ValidationError` is that tree's class; pydantic's is only ever written
`pydantic.ValidationError`, so the two cannot be confused.)
"""

from __future__ import annotations

import redis

from enhance_client.errors import (
    BUDGET_UNSETTLED,
    AuthenticationError,
    BudgetExceeded,
    ConflictTaskUUID,
    PermanentError,
    RateLimited,
    TaskTimeout,
    TransientError,
    ValidationError,
    WorkerError,
)

__all__ = [
    "AUTH_CODES",
    "BUDGET_UNSETTLED",
    "TRANSIENT_CODES",
    "AuthenticationError",
    "BudgetExceeded",
    "ConflictTaskUUID",
    "PermanentError",
    "RateLimited",
    "TaskTimeout",
    "TransientError",
    "ValidationError",
    "WorkerError",
    "for_policy",
    "runware_error",
]

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
