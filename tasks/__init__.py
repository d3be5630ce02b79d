"""The public names backend code imports: `from tasks import enhance`.

Importing this package registers the tasks on the shared Celery app (config.celery.app).
"""

from enhance_client.schemas import EnhanceRequest, EnhanceResult
from enhance_client.waiting import wait, wait_async
from tasks import redact as _redact  # noqa: F401 - masks secrets in published task headers
from tasks.enhancement import enhance_prompt
from tasks.errors import (
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
from tasks.generate import generate_image, generate_video
from tasks.pipelines import (
    enhance,
    enhance_async,
    enhance_batch,
    enhance_then_image,
    enhance_then_video,
)

__all__ = [
    "AuthenticationError",
    "BudgetExceeded",
    "ConflictTaskUUID",
    "EnhanceRequest",
    "EnhanceResult",
    "PermanentError",
    "RateLimited",
    "TaskTimeout",
    "TransientError",
    "ValidationError",
    "WorkerError",
    "enhance",
    "enhance_async",
    "enhance_batch",
    "enhance_prompt",
    "enhance_then_image",
    "enhance_then_video",
    "generate_image",
    "generate_video",
    "wait",
    "wait_async",
]
