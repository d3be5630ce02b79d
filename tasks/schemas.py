"""The contract under its former name: the models and rules live in `enhance_client.schemas`
(which a producer imports without the worker); `tasks.schemas` keeps importing for code
written against it."""

from enhance_client.schemas import (
    ENHANCE_MODEL,
    PRIORITIES,
    EnhanceRequest,
    EnhanceResult,
    ImageRequest,
    ImageResult,
    VideoRequest,
    VideoResult,
    check_account,
    check_priority,
    enhance_request,
    parse_enhance,
    parse_generation,
    stable_task_uuid,
    summarize,
    upstream_prompt,
    validation_error,
)

__all__ = [
    "ENHANCE_MODEL",
    "PRIORITIES",
    "EnhanceRequest",
    "EnhanceResult",
    "ImageRequest",
    "ImageResult",
    "VideoRequest",
    "VideoResult",
    "check_account",
    "check_priority",
    "enhance_request",
    "parse_enhance",
    "parse_generation",
    "stable_task_uuid",
    "summarize",
    "upstream_prompt",
    "validation_error",
]
