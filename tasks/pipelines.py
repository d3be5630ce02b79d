"""Producer helpers: validate first, then enqueue. Nothing is enqueued for a bad argument.

`enhance`, `enhance_batch` (a chord, gathered by `tasks.collect_batch`), and the chains
`enhance_then_image` / `enhance_then_video` (with `tasks.fan_out_generation` and
`tasks.collect_generation` when several versions each get a generation).
"""

from __future__ import annotations

from typing import Any

from celery import Signature, Task, chain, chord, group
from celery.result import AsyncResult

from config.celery import app
from enhance_client.schemas import (
    EnhanceRequest,
    ImageRequest,
    VideoRequest,
    enhance_request,
    parse_generation,
    summarize,
)
from enhance_client.waiting import off_loop, wait_async
from tasks.enhancement import enhance_batch_item, enhance_prompt
from tasks.errors import ValidationError
from tasks.generate import generate_image, generate_video
from tasks.ledger import MICRO, to_micro

MAX_BATCH = 10_000
CALLBACK_COMPRESSION = "zlib"  # of a batch's callback message (kombu's name)


def enhance(
    prompt: str,
    max_length: int | None = None,
    versions: int = 1,
    task_uuid: str | None = None,
    account: str | None = None,
    priority: str = "interactive",
) -> AsyncResult:  # type: ignore[type-arg]
    """Validate and enqueue one `tasks.enhance_prompt` job; return its AsyncResult.

    `account` is the fairness key and cost label; `priority` is "interactive" (default: goes
    ahead of batch work) or "batch".

    Raises `tasks.errors.ValidationError` naming the field and its limit before anything is
    enqueued. `.get()` on the result returns `{"taskType", "taskUUID", "prompt", "text",
    "texts", "cost", "totalCost"}`.
    """
    request = enhance_request(prompt, max_length, versions, task_uuid, account, priority)
    return enhance_prompt.apply_async(kwargs=request.task_kwargs())


async def enhance_async(
    prompt: str,
    max_length: int | None = None,
    versions: int = 1,
    task_uuid: str | None = None,
    account: str | None = None,
    priority: str = "interactive",
    timeout: float | None = None,
) -> dict[str, Any]:
    """`await` one enhancement from asyncio code (FastAPI, Starlette, aiohttp, Django's async
    views) without blocking the event loop: validated and enqueued as `enhance(...)` is (a
    ValidationError before anything is enqueued), then awaited on the process's one pub/sub
    connection. Returns what `enhance(...).get()` returns and raises what it raises; a
    `timeout` (seconds) raises celery.exceptions.TimeoutError naming the task id. Cancelling
    the await stops the wait, not the job."""
    sent = await off_loop(
        lambda: enhance(prompt, max_length, versions, task_uuid, account, priority)
    )
    value: dict[str, Any] = await wait_async(sent, timeout)
    return value


def enhance_batch(
    prompts: list[str],
    versions: int = 1,
    max_length: int | None = None,
    account: str | None = None,
    priority: str = "batch",
) -> AsyncResult:  # type: ignore[type-arg]
    """Validate every prompt, then enqueue one job per prompt as a chord; return its AsyncResult.
    Its jobs have `priority` "batch" unless told otherwise.

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
            requests.append(
                enhance_request(prompt, max_length, versions, account=account, priority=priority)
            )
        except ValidationError as exc:
            problems.append(f"prompts[{index}]: {str(exc).split(': ', 1)[1]}")
    if problems:
        raise ValidationError(f"invalid enhance_batch request: {summarize(problems)}")
    header = group(enhance_batch_item.s(**request.task_kwargs()) for request in requests)
    result: AsyncResult = chord(header)(batch_callback())  # type: ignore[type-arg]
    # Its .get() waits for the callback alone. With the group as its parent, Celery would check
    # every part's state each time it wakes (O(parts) per result, O(parts²) in all: minutes of
    # the caller's CPU for 10,000 prompts). A part never fails the chord (a failed prompt is
    # an {"prompt", "error"} item), so there is no part error to re-raise early.
    result.parent = None
    return result


def batch_callback() -> Signature:
    """The chord's callback: its message carries every part's result (20-40 MB for 10,000
    prompts of 5 versions), so it is sent compressed, and every Redis command that moves it (the
    publish, the fair intake's step, the worker's fetch) moves a fifth of that. The fleet never
    decodes its body."""
    return collect_batch.s().set(compression=CALLBACK_COMPRESSION)


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


# --- enhance, then generate one image or video per enhanced version ---------------------------
GENERATORS: dict[str, Task] = {"image": generate_image, "video": generate_video}  # type: ignore[type-arg]


def _enhance_then(kind: str, prompt: str, versions: int, options: dict[str, Any]) -> AsyncResult:  # type: ignore[type-arg]
    account = options.get("account")
    priority = options.get("priority")
    request = enhance_request(prompt, None, versions, account=account, priority=priority)
    model = ImageRequest if kind == "image" else VideoRequest
    # Check the generation arguments now, with a stand-in prompt, so nothing is enqueued for a
    # bad one; the real prompt is the enhanced text.
    parse_generation(model, {**options, "positivePrompt": prompt}, f"generate_{kind}")
    if "positivePrompt" in options or "taskUUID" in options:
        raise ValidationError(
            f"invalid generate_{kind} request: positivePrompt and taskUUID are set per version"
        )
    pipeline = chain(
        enhance_prompt.s(**request.task_kwargs()),
        fan_out_generation.s(kind=kind, options=options),
    )
    result: AsyncResult = pipeline.apply_async()  # type: ignore[type-arg]
    return result


def enhance_then_image(prompt: str, versions: int = 1, **image: Any) -> AsyncResult:  # type: ignore[type-arg]
    """Enhance `prompt` into `versions` versions, then make one image per version (a chord).

    `image` holds `tasks.generate_image` keyword arguments (`model`, `width`, ...; `account`
    applies to both steps). The value is `{"prompt", "results": [one image result per version],
    "cost": <enhancement plus every image, USD>}`.
    """
    return _enhance_then("image", prompt, versions, image)


def enhance_then_video(prompt: str, versions: int = 1, **video: Any) -> AsyncResult:  # type: ignore[type-arg]
    """Like enhance_then_image, with one `tasks.generate_video` per enhanced version."""
    return _enhance_then("video", prompt, versions, video)


@app.task(bind=True, name="tasks.fan_out_generation")
def fan_out_generation(
    self: Task,  # type: ignore[type-arg]
    upstream: dict[str, Any],
    kind: str,
    options: dict[str, Any],
) -> None:
    """Replace itself with a chord: one generation per enhanced version, then collect them."""
    generator = GENERATORS[kind]
    upstream_total = upstream.get("totalCost", upstream.get("cost", 0.0))
    header = group(
        generator.s({"text": text, "totalCost": upstream_total}, **options)
        for text in upstream["texts"]
    )
    callback = collect_generation.s(prompt=upstream["prompt"], upstream_cost=upstream_total)
    raise self.replace(chord(header, callback))


@app.task(name="tasks.collect_generation")
def collect_generation(
    results: list[dict[str, Any]], prompt: str, upstream_cost: float
) -> dict[str, Any]:
    """The pipeline's value: every generation result and the whole pipeline's cost."""
    cost_micro = to_micro(upstream_cost) + sum(to_micro(float(r["cost"])) for r in results)
    return {"prompt": prompt, "results": results, "cost": cost_micro / MICRO}
