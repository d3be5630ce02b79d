"""`tasks.generate_image` and `tasks.generate_video`: the generation chained onto an enhanced
prompt, under the same limits, retry policy, ledger and budgets as enhancement."""

from __future__ import annotations

from typing import Any

from config.celery import app
from config.settings import get_settings
from enhance_client.schemas import (
    ImageRequest,
    ImageResult,
    VideoRequest,
    VideoResult,
    parse_generation,
    upstream_prompt,
)
from tasks.base import RunwareJob, RunwareTask
from tasks.errors import PermanentError, ValidationError
from tasks.ledger import MICRO, to_micro

IMAGE_FIELDS: tuple[str, ...] = (
    "imageUUID",
    "imageURL",
    "imageBase64Data",
    "imageDataURI",
    "seed",
    "NSFWContent",
)
VIDEO_FIELDS: tuple[str, ...] = ("videoUUID", "videoURL", "seed")


def parse_image(arguments: dict[str, Any]) -> ImageRequest:
    request = parse_generation(ImageRequest, arguments, "generate_image")
    assert isinstance(request, ImageRequest)
    return request


def parse_video(arguments: dict[str, Any]) -> VideoRequest:
    request = parse_generation(VideoRequest, arguments, "generate_video")
    assert isinstance(request, VideoRequest)
    return request


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


def _generate(
    task: RunwareTask, args: tuple[Any, ...], kwargs: dict[str, Any], kind: str
) -> dict[str, Any]:
    """The body shared by generate_image and generate_video: validate, call, build the result."""
    arguments, upstream_cost = _generation_arguments(task, args, kwargs)
    settings = get_settings()
    request: ImageRequest | VideoRequest
    result_model: type[ImageResult] | type[VideoResult]
    if kind == "image":
        request = parse_image(arguments)
        unit, timeout_s = settings.runware_image_cost_usd, settings.runware_poll_timeout_s
        deliver_async = request.deliveryMethod == "async"
        fields, listed, result_model = IMAGE_FIELDS, "images", ImageResult
    else:
        request = parse_video(arguments)
        unit, timeout_s = settings.runware_video_cost_usd, settings.runware_video_timeout_s
        deliver_async = True  # video is always asynchronous
        fields, listed, result_model = VIDEO_FIELDS, "videos", VideoResult
    task_uuid = task.call_uuid(request.taskUUID)
    outcome = task.call_runware(
        RunwareJob(
            body=request.runware_task(task_uuid),
            account=request.account,
            estimate_usd=unit * request.numberResults,
            deliver_async=deliver_async,
            timeout_s=timeout_s,
        )
    )
    made = [{k: item[k] for k in fields if k in item} for item in outcome.items]
    if not made:  # answered and billed: the same taskUUID can only answer the same
        raise PermanentError(
            f"Runware answered task {task_uuid} without any {kind}", code="noResult"
        )
    result = result_model.model_validate(
        {
            "taskUUID": task_uuid,
            "positivePrompt": request.positivePrompt,
            listed: made,
            "cost": outcome.cost,
            "totalCost": _total(outcome.cost, upstream_cost),
        }
    )
    return result.model_dump()


@app.task(bind=True, base=RunwareTask, name="tasks.generate_image")
def generate_image(self: RunwareTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Generate images with Runware's imageInference from an enhanced prompt.

    The first positional argument is a `tasks.enhance_prompt` result (its `text` becomes
    `positivePrompt`) or a prompt string. Keyword arguments are imageInference fields: `model`
    (required, an AIR id such as `runware:101@1`), `width`, `height` (multiples of 64,
    128..2048), `numberResults`, `negativePrompt`, `steps`, `CFGScale`, `seed`, `outputType`,
    `outputFormat`, `deliveryMethod`, `webhookURL`, `taskUUID`; plus `account` and `priority`.
    Returns `{"taskType", "taskUUID", "positivePrompt", "images", "cost", "totalCost"}`.
    """
    return _generate(self, args, kwargs, "image")


@app.task(bind=True, base=RunwareTask, name="tasks.generate_video")
def generate_video(self: RunwareTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Generate a video with Runware's videoInference from an enhanced prompt.

    Like `generate_image`, with videoInference fields: `model` (required), `duration`, `width`,
    `height`, `fps`, `seed`, `numberResults`, `outputFormat` (`MP4`|`WEBM`), `negativePrompt`,
    `webhookURL`, `taskUUID`, `account`, `priority`. Video is always submitted asynchronously
    and polled with getResponse by re-scheduling the job, so no worker slot waits while it
    renders; it fails with TaskTimeout after RUNWARE_VIDEO_TIMEOUT_S. Returns `{"taskType",
    "taskUUID", "positivePrompt", "videos", "cost", "totalCost"}`.
    """
    return _generate(self, args, kwargs, "video")
