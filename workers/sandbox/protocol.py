"""What the sandbox knows of each Runware task type: its checks (as Runware makes them) and the
items it answers with. Kept apart from the HTTP server in workers/sandbox/server.py."""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from config.settings import ENHANCE_MODEL

MICRO = 1_000_000
COMMON = {"taskType", "taskUUID", "includeCost", "deliveryMethod", "webhookURL"}
FIELDS = {
    "promptEnhance": COMMON | {"model", "prompt", "promptMaxLength", "promptVersions"},
    "imageInference": COMMON
    | {
        "model",
        "positivePrompt",
        "negativePrompt",
        "width",
        "height",
        "numberResults",
        "steps",
        "CFGScale",
        "seed",
        "outputType",
        "outputFormat",
    },
    "videoInference": COMMON
    | {
        "model",
        "positivePrompt",
        "negativePrompt",
        "width",
        "height",
        "duration",
        "fps",
        "seed",
        "numberResults",
        "outputFormat",
    },
}
FLOURISHES = (
    "cinematic lighting, rich textures, sharp focus",
    "soft volumetric light, painterly detail, shallow depth of field",
    "dramatic composition, golden hour glow, intricate detail",
    "moody atmosphere, film grain, wide-angle perspective",
    "vivid colour palette, high dynamic range, crisp detail",
)


class Prices(Protocol):
    cost_per_item: float
    reword_versions: bool
    image_cost: float
    video_cost: float
    async_delay_s: float
    video_render_s: float


@dataclass(frozen=True)
class Accepted:
    """A valid task: its items, what it bills, and how long until an async result is ready."""

    items: list[dict[str, Any]]
    billed_micro: int
    ready_in_s: float
    is_async: bool


def error(
    code: str, message: str, task: dict[str, Any] | None = None, parameter: str | None = None
) -> dict[str, Any]:
    found: dict[str, Any] = {"code": code, "message": message}
    if parameter:
        found["parameter"] = parameter
    if task is not None:
        found["taskType"] = task.get("taskType")
        found["taskUUID"] = task.get("taskUUID")
    return found


def valid_uuid4(value: Any) -> bool:
    try:
        return isinstance(value, str) and uuid.UUID(value).version == 4
    except ValueError:
        return False


def _int(
    task: dict[str, Any], name: str, low: int, high: int, step: int = 1
) -> dict[str, Any] | None:
    value = task.get(name)
    if value is None:
        return None
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or not low <= value <= high
        or value % step
    ):
        extra = f" and a multiple of {step}" if step > 1 else ""
        return error(
            f"invalid{name[0].upper()}{name[1:]}",
            f"{name} must be an integer between {low} and {high}{extra}",
            task,
            name,
        )
    return None


def _string(
    task: dict[str, Any], name: str, low: int, high: int, required: bool
) -> dict[str, Any] | None:
    value = task.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not low <= len(value) <= high:
        code = f"invalid{name[0].upper()}{name[1:]}"
        return error(code, f"{name} must be a string of {low} to {high} characters", task, name)
    return None


def check(task: dict[str, Any]) -> dict[str, Any] | None:
    """Runware's checks of one task object; an error object, or None when it is valid."""
    kind = task.get("taskType")
    allowed = FIELDS.get(str(kind))
    if allowed is None:
        return error("unsupportedTaskType", f"taskType {kind!r} is not supported", task, "taskType")
    unknown = sorted(set(task) - allowed)
    if unknown:
        return error(
            "unsupportedParameter", f"unsupported parameter {unknown[0]}", task, unknown[0]
        )
    if "includeCost" in task and not isinstance(task["includeCost"], bool):
        return error("invalidIncludeCost", "includeCost must be a boolean", task, "includeCost")
    if task.get("deliveryMethod", "sync") not in ("sync", "async"):
        return error(
            "invalidDeliveryMethod", "deliveryMethod must be sync or async", task, "deliveryMethod"
        )
    hook = task.get("webhookURL")
    if hook is not None and (
        not isinstance(hook, str) or not hook.startswith(("http://", "https://"))
    ):
        return error("invalidWebhookURL", "webhookURL must be an http(s) URL", task, "webhookURL")
    if kind == "promptEnhance":
        if task.get("model") != ENHANCE_MODEL:
            return error("invalidModel", f"model must be {ENHANCE_MODEL}", task, "model")
        return (
            _string(task, "prompt", 1, 300, required=True)
            or _int(task, "promptMaxLength", 12, 400)
            or _int(task, "promptVersions", 1, 5)
        )
    problem = _string(task, "model", 3, 200, required=True) or _string(
        task, "positivePrompt", 2, 3000, required=True
    )
    if problem:
        return problem
    if kind == "imageInference":
        return (
            _int(task, "width", 128, 2048, step=64)
            or _int(task, "height", 128, 2048, step=64)
            or _int(task, "numberResults", 1, 20)
            or _int(task, "steps", 1, 100)
        )
    if task.get("deliveryMethod") != "async":
        return error(
            "invalidDeliveryMethod",
            "videoInference requires deliveryMethod async",
            task,
            "deliveryMethod",
        )
    return _int(task, "numberResults", 1, 4) or _int(task, "fps", 1, 120)


def enhanced_texts(
    prompt: str, versions: int, max_tokens: int | None, reword: bool = False
) -> list[str]:
    """Deterministic stand-ins for the model's output: the prompt, expanded, one per version.
    With `reword`, each version reorders the prompt's words (as a model rewords a prompt, and
    its versions one another), so that results are no more alike than real ones (the sizes and
    memory benchmarks: messages and results that compress as real ones do)."""
    limit = (max_tokens or 400) * 4
    base = prompt.strip().rstrip(".")
    texts = []
    for index in range(versions):
        words = base.split(" ")
        if reword:
            random.Random(f"{base}|{index}").shuffle(words)
        texts.append(f"{' '.join(words)}, {FLOURISHES[index % len(FLOURISHES)]}"[:limit])
    return texts


def accept(task: dict[str, Any], prices: Prices, base_url: str) -> Accepted:
    """The items a valid task answers with, one per version, image or video."""
    kind = str(task["taskType"])
    task_uuid = str(task["taskUUID"])
    is_async = task.get("deliveryMethod") == "async"
    items: list[dict[str, Any]]
    if kind == "promptEnhance":
        unit = prices.cost_per_item
        texts = enhanced_texts(
            task["prompt"],
            task.get("promptVersions", 1),
            task.get("promptMaxLength"),
            reword=prices.reword_versions,
        )
        items = [{"taskType": kind, "taskUUID": task_uuid, "text": text} for text in texts]
    else:
        media, default_format, first_seed = (
            ("image", "JPG", 1000) if kind == "imageInference" else ("video", "MP4", 2000)
        )
        unit = prices.image_cost if media == "image" else prices.video_cost
        if media == "image":  # priced by area, as image models are: 512x512 costs a quarter
            area = int(task.get("width", 1024)) * int(task.get("height", 1024))
            unit = round(unit * area / (1024 * 1024), 6)
        extension = str(task.get("outputFormat", default_format)).lower()
        items = []
        for index in range(task.get("numberResults", 1)):
            media_uuid = str(uuid.uuid4())
            item = {
                "taskType": kind,
                "taskUUID": task_uuid,
                f"{media}UUID": media_uuid,
                f"{media}URL": f"{base_url}/{media}s/{media_uuid}.{extension}",
                "seed": task.get("seed", first_seed + index),
            }
            if media == "image":
                item["NSFWContent"] = False
            items.append(item)
    if task.get("includeCost"):
        for item in items:
            item["cost"] = unit
    delay = 0.0
    if is_async:
        delay = prices.video_render_s if kind == "videoInference" else prices.async_delay_s
    return Accepted(items, round(unit * MICRO) * len(items), delay, is_async)
