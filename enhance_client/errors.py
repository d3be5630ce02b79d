"""The exception tree of the service, the part of its contract a producer sees: a job's
failure is rebuilt from it (by module and name) wherever the result is read.

Every class takes a single message argument, so Celery can store it as JSON and rebuild it on the
client side; extra facts (Runware's `code`, `Retry-After`) are attributes with defaults. Which of
them a worker retries is decided in the worker (`tasks/errors.py`).
"""

from __future__ import annotations


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
