"""`tasks.enhance_prompt` (one promptEnhance call, its versions and its cost) and
`tasks.enhance_batch_item` (the same for one prompt of a batch)."""

from __future__ import annotations

from typing import Any

from config.celery import app
from config.settings import get_settings
from enhance_client.schemas import EnhanceRequest, EnhanceResult, parse_enhance
from tasks.base import RunwareJob, RunwareTask
from tasks.errors import PermanentError
from tasks.runware import TaskOutcome


def enhance_result(request: EnhanceRequest, outcome: TaskOutcome) -> EnhanceResult:
    """The task's result from Runware's items: every version's text, in order, and the cost."""
    texts = [item["text"] for item in outcome.items if isinstance(item.get("text"), str)]
    if not texts:
        # Runware answered (and billed) this taskUUID without text; asking again for the same
        # taskUUID can only bring the same answer back.
        raise PermanentError(
            f"Runware answered task {outcome.task_uuid} without any enhanced text",
            code="noResult",
        )
    cost = outcome.cost
    return EnhanceResult(
        taskUUID=outcome.task_uuid,
        prompt=request.prompt,
        text=texts[0],
        texts=texts,
        cost=cost,
        totalCost=cost,
    )


def _enhance(task: RunwareTask, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The body shared by enhance_prompt and enhance_batch_item: validate, reserve, call, bill."""
    task.keyword_only(args)
    request = parse_enhance(kwargs)
    task_uuid = task.call_uuid(request.taskUUID)
    settings = get_settings()
    job = RunwareJob(
        body=request.runware_task(task_uuid),
        account=request.account,
        estimate_usd=settings.runware_enhance_cost_usd * request.promptVersions,
        deliver_async=request.deliveryMethod == "async",
        timeout_s=settings.runware_poll_timeout_s,
    )
    return enhance_result(request, task.call_runware(job)).model_dump()


@app.task(bind=True, base=RunwareTask, name="tasks.enhance_prompt")
def enhance_prompt(self: RunwareTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Enhance a prompt with Runware's `runware:llama-3-1-8b@prompt-enhancer`.

    Keyword arguments are Runware's request fields: `prompt` (1..300 characters, required),
    `promptMaxLength` (12..400), `promptVersions` (1..5, default 1), `taskUUID` (UUID v4; made
    from the Celery task id when absent, so every retry and redelivery reuses it),
    `deliveryMethod` (`sync` or `async`) and `webhookURL`; plus `account` (the fairness key and
    the label the cost is attributed to, default `default`) and `priority` (`interactive`, the
    default, or `batch`), neither sent to Runware. Returns
    `{"taskType", "taskUUID", "prompt", "text", "texts", "cost", "totalCost"}`.
    """
    return _enhance(self, args, kwargs)


@app.task(bind=True, base=RunwareTask, name="tasks.enhance_batch_item", failure_as_result=True)
def enhance_batch_item(self: RunwareTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """One prompt of `enhance_batch`: like enhance_prompt, but a final failure is returned as
    `{"prompt", "error"}` (and kept as a dead letter) so that it does not sink the chord."""
    return _enhance(self, args, kwargs)
