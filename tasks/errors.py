"""The one exception tree of the service.

Every class takes a single message argument, so Celery can store it as JSON and rebuild it on the
client side; extra facts (Runware's `code`, `Retry-After`) are attributes with defaults.
"""

from __future__ import annotations


class WorkerError(Exception):
    """Root of every error this service raises on purpose."""


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
    """Runware asked us to slow down (429) or said it is over capacity (503)."""


class ConflictTaskUUID(WorkerError):
    """Runware already accepted this taskUUID (409); its result must be fetched, not resent."""


class TaskTimeout(WorkerError):
    """An asynchronous Runware task did not finish before its deadline."""


class BudgetExceeded(WorkerError):
    """The task's estimated cost would pass a daily budget; it fails without calling Runware."""
