"""Producer helpers: validate first, then enqueue. Nothing is enqueued for a bad argument."""

from __future__ import annotations

from celery.result import AsyncResult

from tasks.enhancement import enhance_prompt
from tasks.schemas import parse_enhance


def enhance(
    prompt: str,
    max_length: int | None = None,
    versions: int = 1,
    task_uuid: str | None = None,
) -> AsyncResult:  # type: ignore[type-arg]
    """Validate and enqueue one `tasks.enhance_prompt` job; return its AsyncResult.

    Raises `tasks.errors.ValidationError` naming the field and its limit before anything is
    enqueued. `.get()` on the result returns `{"taskType", "taskUUID", "prompt", "text",
    "texts", "cost"}`.
    """
    arguments: dict[str, object] = {"prompt": prompt, "promptVersions": versions}
    if max_length is not None:
        arguments["promptMaxLength"] = max_length
    if task_uuid is not None:
        arguments["taskUUID"] = task_uuid
    request = parse_enhance(arguments)
    return enhance_prompt.apply_async(kwargs=request.task_kwargs())
