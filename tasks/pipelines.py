"""Producer helpers: validate first, then enqueue. Nothing is enqueued for a bad argument.

Also the chord callback that gathers a batch.
"""

from __future__ import annotations

from typing import Any

from celery import chord, group
from celery.result import AsyncResult

from config.celery import app
from tasks.enhancement import enhance_batch_item, enhance_prompt
from tasks.errors import ValidationError
from tasks.ledger import MICRO, to_micro
from tasks.schemas import EnhanceRequest, parse_enhance

MAX_BATCH = 10_000


def _request(
    prompt: str,
    max_length: int | None,
    versions: int,
    task_uuid: str | None = None,
    account: str | None = None,
) -> EnhanceRequest:
    arguments: dict[str, object] = {"prompt": prompt, "promptVersions": versions}
    if max_length is not None:
        arguments["promptMaxLength"] = max_length
    if task_uuid is not None:
        arguments["taskUUID"] = task_uuid
    if account is not None:
        arguments["account"] = account
    return parse_enhance(arguments)


def enhance(
    prompt: str,
    max_length: int | None = None,
    versions: int = 1,
    task_uuid: str | None = None,
    account: str | None = None,
) -> AsyncResult:  # type: ignore[type-arg]
    """Validate and enqueue one `tasks.enhance_prompt` job; return its AsyncResult.

    Raises `tasks.errors.ValidationError` naming the field and its limit before anything is
    enqueued. `.get()` on the result returns `{"taskType", "taskUUID", "prompt", "text",
    "texts", "cost", "totalCost"}`.
    """
    request = _request(prompt, max_length, versions, task_uuid, account)
    return enhance_prompt.apply_async(kwargs=request.task_kwargs())


def enhance_batch(
    prompts: list[str],
    versions: int = 1,
    max_length: int | None = None,
    account: str | None = None,
) -> AsyncResult:  # type: ignore[type-arg]
    """Validate every prompt, then enqueue one job per prompt as a chord; return its AsyncResult.

    Its value is `{"results": [one per prompt, in input order], "count": n, "failed": k,
    "cost": <sum, USD>}`; a prompt that failed appears as `{"prompt": ..., "error": ...}`.
    """
    if isinstance(prompts, str) or not isinstance(prompts, list | tuple):
        raise ValidationError("invalid enhance_batch request: prompts: must be a list of strings")
    if not 1 <= len(prompts) <= MAX_BATCH:
        raise ValidationError(
            f"invalid enhance_batch request: prompts: must hold 1 to {MAX_BATCH} prompts "
            f"(got {len(prompts)})"
        )
    problems: list[str] = []
    requests: list[EnhanceRequest] = []
    for index, prompt in enumerate(prompts):
        try:
            requests.append(_request(prompt, max_length, versions, account=account))
        except ValidationError as exc:
            problems.append(f"prompts[{index}]: {str(exc).split(': ', 1)[1]}")
    if problems:
        shown = "; ".join(problems[:5])
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise ValidationError(f"invalid enhance_batch request: {shown}{more}")
    header = group(enhance_batch_item.s(**request.task_kwargs()) for request in requests)
    result: AsyncResult = chord(header)(collect_batch.s())  # type: ignore[type-arg]
    return result


@app.task(name="tasks.collect_batch")
def collect_batch(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Gather a batch's results (in input order) with the number failed and the summed cost."""
    failed = sum(1 for r in results if "error" in r)
    cost_micro = sum(to_micro(float(r.get("cost") or 0)) for r in results if "error" not in r)
    return {
        "results": results,
        "count": len(results),
        "failed": failed,
        "cost": cost_micro / MICRO,
    }
