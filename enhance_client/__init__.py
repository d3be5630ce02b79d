"""The producer's client of the prompt-enhancement fleet: `from enhance_client import
EnhanceClient`. It imports nothing of the worker (see `enhance_client.client`)."""

from enhance_client.client import EnhanceClient
from enhance_client.errors import (
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
from enhance_client.schemas import ENHANCE_MODEL, EnhanceRequest, EnhanceResult
from enhance_client.waiting import wait, wait_async

__all__ = [
    "ENHANCE_MODEL",
    "AuthenticationError",
    "BudgetExceeded",
    "ConflictTaskUUID",
    "EnhanceClient",
    "EnhanceRequest",
    "EnhanceResult",
    "PermanentError",
    "RateLimited",
    "TaskTimeout",
    "TransientError",
    "ValidationError",
    "WorkerError",
    "wait",
    "wait_async",
]
