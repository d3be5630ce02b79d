"""`tasks.enhance_prompt`: one promptEnhance call, its versions and its cost."""

from __future__ import annotations

import logging
from typing import Any

from config.celery import app
from config.settings import get_settings
from tasks.base import RunwareTask
from tasks.errors import ConflictTaskUUID, TransientError, WorkerError
from tasks.runware import RunwareClient, get_client
from tasks.schemas import EnhanceRequest, EnhanceResult, parse_enhance, stable_task_uuid

logger = logging.getLogger(__name__)


def run_enhance(request: EnhanceRequest, task_uuid: str, client: RunwareClient) -> EnhanceResult:
    """Call promptEnhance for `request` under `task_uuid` and build the result.

    A 409 conflictTaskUUID means an earlier attempt with this taskUUID was accepted (the answer was
    lost on the way back): its result is fetched with getResponse instead of paying again.
    """
    try:
        outcome = client.run(request.runware_task(task_uuid))
        if request.deliveryMethod == "async":
            outcome = client.wait(task_uuid, first_wait=None)
    except ConflictTaskUUID:
        logger.info("taskUUID %s was already accepted by Runware; fetching its result.", task_uuid)
        outcome = client.wait(task_uuid, first_wait=0.0)
    texts = [item["text"] for item in outcome.items if isinstance(item.get("text"), str)]
    if not texts:
        raise TransientError(f"Runware returned no enhanced text for task {task_uuid}")
    cost = outcome.cost
    return EnhanceResult(
        taskUUID=task_uuid,
        prompt=request.prompt,
        text=texts[0],
        texts=texts,
        cost=cost,
        totalCost=cost,
    )


def _enhance(task: RunwareTask, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The body shared by enhance_prompt and enhance_batch_item: validate, reserve, call, bill."""

    def work() -> dict[str, Any]:
        task.keyword_only(args)
        request = parse_enhance(kwargs)
        task_uuid = request.taskUUID or stable_task_uuid(str(task.request.id))
        estimate = get_settings().runware_enhance_cost_usd * request.promptVersions
        result = task.billed(
            task_uuid,
            request.account,
            estimate,
            lambda: run_enhance(request, task_uuid, get_client()),
        )
        return result.model_dump()

    return task.guarded(work)


@app.task(bind=True, base=RunwareTask, name="tasks.enhance_prompt")
def enhance_prompt(self: RunwareTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Enhance a prompt with Runware's `runware:llama-3-1-8b@prompt-enhancer`.

    Keyword arguments are Runware's request fields: `prompt` (1..300 characters, required),
    `promptMaxLength` (12..400), `promptVersions` (1..5, default 1), `taskUUID` (UUID v4; made
    from the Celery task id when absent, so every retry and redelivery reuses it),
    `deliveryMethod` (`sync` or `async`) and `webhookURL`; plus `account` (a label the cost is
    attributed to, default `default`, never sent to Runware). Returns
    `{"taskType", "taskUUID", "prompt", "text", "texts", "cost", "totalCost"}`.
    """
    return _enhance(self, args, kwargs)


@app.task(bind=True, base=RunwareTask, name="tasks.enhance_batch_item")
def enhance_batch_item(self: RunwareTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """One prompt of `enhance_batch`: like enhance_prompt, but a final failure is returned as
    `{"prompt", "error"}` so that it does not sink the batch's chord."""
    try:
        return _enhance(self, args, kwargs)
    except WorkerError as exc:
        return {"prompt": kwargs.get("prompt"), "error": str(exc)}
