"""`tasks.generate_image` and `tasks.generate_video`: the generation chained onto an enhanced
prompt, under the same limits, retry policy, ledger and budgets as enhancement."""

from __future__ import annotations

from typing import Any

from config.celery import app
from config.settings import get_settings
from tasks.base import RunwareJob, RunwareTask
from tasks.errors import TransientError, ValidationError
from tasks.ledger import MICRO, to_micro
from tasks.schemas import (
    ImageRequest,
    ImageResult,
    VideoRequest,
    VideoResult,
    parse_generation,
    stable_task_uuid,
    upstream_prompt,
)

IMAGE_FIELDS = ("imageUUID", "imageURL", "imageBase64Data", "imageDataURI", "seed", "NSFWContent")
VIDEO_FIELDS = ("videoUUID", "videoURL", "seed")


def _generation_arguments(
    task: RunwareTask, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[dict[str, Any], float]:
    """The validated-to-be arguments and the upstream totalCost: the first positional argument
    is the upstream result or a prompt (or `positivePrompt` is given as a keyword)."""
    if len(args) > 1:
        raise ValidationError(
            f"{task.name} takes one positional argument, the upstream result (got {len(args)})"
        )
    arguments = dict(kwargs)
    upstream_cost = 0.0
    if args:
        prompt, upstream_cost = upstream_prompt(args[0])
        arguments.setdefault("positivePrompt", prompt)
    return arguments, upstream_cost


def _total(cost: float, upstream_cost: float) -> float:
    return (to_micro(cost) + to_micro(upstream_cost)) / MICRO


@app.task(bind=True, base=RunwareTask, name="tasks.generate_image")
def generate_image(self: RunwareTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Generate images with Runware's imageInference from an enhanced prompt.

    The first positional argument is a `tasks.enhance_prompt` result (its `text` becomes
    `positivePrompt`) or a prompt string. Keyword arguments are imageInference fields: `model`
    (required, an AIR id such as `runware:101@1`), `width`, `height` (multiples of 64,
    128..2048), `numberResults`, `negativePrompt`, `steps`, `CFGScale`, `seed`, `outputType`,
    `outputFormat`, `deliveryMethod`, `webhookURL`, `taskUUID`; plus `account`. Returns
    `{"taskType", "taskUUID", "positivePrompt", "images", "cost", "totalCost"}`.
    """

    def work() -> dict[str, Any]:
        arguments, upstream_cost = _generation_arguments(self, args, kwargs)
        request = parse_generation(ImageRequest, arguments, "generate_image")
        assert isinstance(request, ImageRequest)
        task_uuid = request.taskUUID or stable_task_uuid(str(self.request.id))
        settings = get_settings()
        outcome = self.call_runware(
            RunwareJob(
                body=request.runware_task(task_uuid),
                account=request.account,
                priority=request.priority,
                estimate_usd=settings.runware_image_cost_usd * request.numberResults,
                deliver_async=request.deliveryMethod == "async",
                timeout_s=settings.runware_poll_timeout_s,
            )
        )
        images = [{k: i[k] for k in IMAGE_FIELDS if k in i} for i in outcome.items]
        if not images:
            raise TransientError(f"Runware returned no image for task {task_uuid}")
        return ImageResult(
            taskUUID=task_uuid,
            positivePrompt=request.positivePrompt,
            images=images,
            cost=outcome.cost,
            totalCost=_total(outcome.cost, upstream_cost),
        ).model_dump()

    return self.guarded(work)


@app.task(bind=True, base=RunwareTask, name="tasks.generate_video")
def generate_video(self: RunwareTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Generate a video with Runware's videoInference from an enhanced prompt.

    Like `generate_image`, with videoInference fields: `model` (required), `duration`, `width`,
    `height`, `fps`, `seed`, `numberResults`, `outputFormat` (`MP4`|`WEBM`), `negativePrompt`,
    `webhookURL`, `taskUUID`, `account`. Video is always submitted asynchronously and polled
    with getResponse by re-scheduling the job, so no worker slot waits while it renders; it
    fails with TaskTimeout after RUNWARE_VIDEO_TIMEOUT_S. Returns `{"taskType", "taskUUID",
    "positivePrompt", "videos", "cost", "totalCost"}`.
    """

    def work() -> dict[str, Any]:
        arguments, upstream_cost = _generation_arguments(self, args, kwargs)
        request = parse_generation(VideoRequest, arguments, "generate_video")
        assert isinstance(request, VideoRequest)
        task_uuid = request.taskUUID or stable_task_uuid(str(self.request.id))
        settings = get_settings()
        outcome = self.call_runware(
            RunwareJob(
                body=request.runware_task(task_uuid),
                account=request.account,
                priority=request.priority,
                estimate_usd=settings.runware_video_cost_usd * request.numberResults,
                deliver_async=True,
                timeout_s=settings.runware_video_timeout_s,
            )
        )
        videos = [{k: v[k] for k in VIDEO_FIELDS if k in v} for v in outcome.items]
        if not videos:
            raise TransientError(f"Runware returned no video for task {task_uuid}")
        return VideoResult(
            taskUUID=task_uuid,
            positivePrompt=request.positivePrompt,
            videos=videos,
            cost=outcome.cost,
            totalCost=_total(outcome.cost, upstream_cost),
        ).model_dump()

    return self.guarded(work)
