"""The public contract: requests and results, as pydantic models.

The same models validate on the producer side (before anything is enqueued, `enhance_client`) and
on the worker side (a raw message sent by name), so both ends say the same thing about a bad
argument. This module imports nothing of the worker's (no settings, no Celery app).
"""

from __future__ import annotations

import hashlib
import re
import uuid
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

import pydantic
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
)

from enhance_client.errors import ValidationError

ENHANCE_MODEL = "runware:llama-3-1-8b@prompt-enhancer"  # the model every enhancement uses

PROMPT_MIN, PROMPT_MAX = 1, 300
MAX_LENGTH_MIN, MAX_LENGTH_MAX = 12, 400
VERSIONS_MIN, VERSIONS_MAX = 1, 5


def _check_uuid4(value: str) -> str:
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        raise ValueError(
            "must be a UUID v4 string such as 91b29c95-7352-4fa0-babd-4673dda40929"
        ) from None
    if parsed.version != 4:
        raise ValueError(f"must be a UUID v4 (got version {parsed.version})")
    return str(parsed)


def _check_http_url(value: str) -> str:
    """An absolute http(s) URL with a host, as Runware can call it back: no spaces or control
    characters, a valid port. (Sent to Runware as given.)"""
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must be an http:// or https:// URL without spaces or control characters")
    parts = urlsplit(value)
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port outside 0..65535
    except ValueError:
        raise ValueError("must be an http:// or https:// URL with a valid port") from None
    return value


# The same rule is applied by the fair intake (tasks/messages.py reads a message's account with
# check_account): never a `/`, which the Redis key layout reserves (config/keys.py). An integer
# account id (a database key) stands for its decimal string.
ACCOUNT_PATTERN = r"^[A-Za-z0-9_.:@+-]+$"
ACCOUNT_MAX = 64


def _account_text(value: object) -> object:
    return str(value) if type(value) is int else value


AccountStr = Annotated[
    StrictStr,
    BeforeValidator(_account_text),
    Field(min_length=1, max_length=ACCOUNT_MAX, pattern=ACCOUNT_PATTERN),
]


def check_account(label: object) -> str:
    """The account label `label` stands for (an integer id as its decimal string), else
    ValueError naming the rule."""
    label = _account_text(label)
    if (
        not isinstance(label, str)
        or not 1 <= len(label) <= ACCOUNT_MAX
        or not re.fullmatch(ACCOUNT_PATTERN, label)
    ):
        raise ValueError(
            f"account {label!r} is not a label of 1..{ACCOUNT_MAX} letters, digits or _.:@+- "
            "(or an integer id)"
        )
    return label


PriorityStr = Literal["interactive", "batch"]
PRIORITIES: tuple[str, ...] = get_args(PriorityStr)


def check_priority(value: object) -> str:
    """`value` if it is a priority class, else ValueError naming them."""
    if not isinstance(value, str) or value not in PRIORITIES:
        raise ValueError(f"priority {value!r} is not one of {', '.join(PRIORITIES)}")
    return value


UUID4Str = Annotated[StrictStr, pydantic.AfterValidator(_check_uuid4)]
HttpURLStr = Annotated[StrictStr, Field(max_length=2048), pydantic.AfterValidator(_check_http_url)]


class EnhanceRequest(BaseModel):
    """Arguments of `tasks.enhance_prompt`, named as Runware's request fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: StrictStr = Field(min_length=PROMPT_MIN, max_length=PROMPT_MAX)
    promptMaxLength: StrictInt | None = Field(default=None, ge=MAX_LENGTH_MIN, le=MAX_LENGTH_MAX)
    promptVersions: StrictInt = Field(default=1, ge=VERSIONS_MIN, le=VERSIONS_MAX)
    taskUUID: UUID4Str | None = None
    deliveryMethod: Literal["sync", "async"] = "sync"
    webhookURL: HttpURLStr | None = None
    # Ours, not Runware's (never sent): who the cost is attributed to and whose fair share of
    # the fleet's calls this job uses, and whether it goes ahead of batch work.
    account: AccountStr = "default"
    priority: PriorityStr = "interactive"

    def task_kwargs(self) -> dict[str, Any]:
        """The keyword arguments to enqueue: only the fields that were set."""
        return self.model_dump(exclude_none=True, exclude_defaults=False)

    def runware_task(self, task_uuid: str) -> dict[str, Any]:
        """The promptEnhance task object sent to Runware: documented fields only."""
        body: dict[str, Any] = {
            "taskType": "promptEnhance",
            "taskUUID": task_uuid,
            "model": ENHANCE_MODEL,
            "prompt": self.prompt,
            "promptVersions": self.promptVersions,
            "includeCost": True,
        }
        if self.promptMaxLength is not None:
            body["promptMaxLength"] = self.promptMaxLength
        if self.deliveryMethod != "sync":
            body["deliveryMethod"] = self.deliveryMethod
        if self.webhookURL is not None:
            body["webhookURL"] = self.webhookURL
        return body


class EnhanceResult(BaseModel):
    """The result of `tasks.enhance_prompt`, stored as JSON in the result backend."""

    taskType: Literal["promptEnhance"] = "promptEnhance"
    taskUUID: str
    prompt: str
    text: str
    texts: list[str]
    cost: StrictFloat | StrictInt
    totalCost: StrictFloat | StrictInt


def _describe(error: dict[str, Any]) -> str:
    loc = ".".join(str(part) for part in error["loc"]) or "arguments"
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{loc}: unknown argument (not a field of this task)"
    if kind == "missing":
        return f"{loc}: required argument is missing"
    shown = repr(error.get("input"))
    if len(shown) > 60:
        shown = shown[:57] + "..."
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{loc}: {message} (got {shown})"


def validation_error(exc: pydantic.ValidationError, what: str) -> ValidationError:
    """Turn a pydantic error into our ValidationError naming every bad field and its limit."""
    details = "; ".join(_describe(dict(e)) for e in exc.errors())
    return ValidationError(f"invalid {what} request: {details}")


def summarize(problems: list[str], shown: int = 5) -> str:
    """The first few problems of a list of inputs, and how many more there are."""
    more = f"; and {len(problems) - shown} more" if len(problems) > shown else ""
    return "; ".join(problems[:shown]) + more


def parse_enhance(arguments: dict[str, Any]) -> EnhanceRequest:
    """Validate `tasks.enhance_prompt` keyword arguments, raising ValidationError."""
    try:
        return EnhanceRequest.model_validate(arguments)
    except pydantic.ValidationError as exc:
        raise validation_error(exc, "enhance_prompt") from None


def enhance_request(
    prompt: str,
    max_length: int | None,
    versions: int,
    task_uuid: str | None = None,
    account: str | int | None = None,
    priority: str | None = None,
    webhook_url: str | None = None,
) -> EnhanceRequest:
    """The validated request of one enhancement (ValidationError naming the field otherwise)."""
    arguments: dict[str, object] = {"prompt": prompt, "promptVersions": versions}
    if webhook_url is not None:
        arguments["webhookURL"] = webhook_url
    if priority is not None:
        arguments["priority"] = priority
    if max_length is not None:
        arguments["promptMaxLength"] = max_length
    if task_uuid is not None:
        arguments["taskUUID"] = task_uuid
    if account is not None:
        arguments["account"] = account
    return parse_enhance(arguments)


def stable_task_uuid(seed: str) -> str:
    """A UUID v4-shaped id derived from `seed` (the Celery task id), stable across redeliveries."""
    if seed:
        try:
            parsed = uuid.UUID(seed)
        except ValueError:
            pass
        else:
            if parsed.version == 4:
                return str(parsed)
    digest = bytearray(hashlib.sha256(seed.encode()).digest()[:16])
    return str(uuid.UUID(bytes=bytes(digest), version=4))


# --- Downstream generation ------------------------------------------------------------------
AIRStr = Annotated[StrictStr, Field(min_length=3, max_length=200, pattern=r"^[\w.-]+:[\w.@-]+$")]
PositivePromptStr = Annotated[StrictStr, Field(min_length=2, max_length=3000)]


def _multiple_of_64(value: int) -> int:
    if value % 64:
        raise ValueError("must be a multiple of 64")
    return value


ImageSide = Annotated[StrictInt, Field(ge=128, le=2048), pydantic.AfterValidator(_multiple_of_64)]


class _Generation(BaseModel):
    """Fields shared by imageInference and videoInference requests."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: AIRStr
    positivePrompt: PositivePromptStr
    negativePrompt: Annotated[StrictStr, Field(min_length=2, max_length=3000)] | None = None
    seed: Annotated[StrictInt, Field(ge=1, le=9223372036854775807)] | None = None
    taskUUID: UUID4Str | None = None
    webhookURL: HttpURLStr | None = None
    account: AccountStr = "default"
    priority: PriorityStr = "interactive"

    def _common(self, task_type: str, task_uuid: str) -> dict[str, Any]:
        body = self.model_dump(exclude_none=True, exclude={"account", "priority", "taskUUID"})
        return {"taskType": task_type, "taskUUID": task_uuid, **body, "includeCost": True}


class ImageRequest(_Generation):
    """Arguments of `tasks.generate_image`, named as Runware's imageInference fields."""

    width: ImageSide = 1024
    height: ImageSide = 1024
    numberResults: Annotated[StrictInt, Field(ge=1, le=20)] = 1
    steps: Annotated[StrictInt, Field(ge=1, le=100)] | None = None
    CFGScale: Annotated[StrictFloat | StrictInt, Field(ge=0, le=50)] | None = None
    outputType: Literal["URL", "base64Data", "dataURI"] = "URL"
    outputFormat: Literal["JPG", "PNG", "WEBP"] = "JPG"
    deliveryMethod: Literal["sync", "async"] = "sync"

    def runware_task(self, task_uuid: str) -> dict[str, Any]:
        return self._common("imageInference", task_uuid)


class VideoRequest(_Generation):
    """Arguments of `tasks.generate_video`, named as Runware's videoInference fields.

    Sizes and durations are per model, so only broad bounds are checked here; Runware's answer
    (a 400 naming the parameter) covers the rest.
    """

    width: Annotated[StrictInt, Field(ge=64, le=4096)] | None = None
    height: Annotated[StrictInt, Field(ge=64, le=4096)] | None = None
    duration: Annotated[StrictFloat | StrictInt, Field(gt=0, le=60)] = 5
    fps: Annotated[StrictInt, Field(ge=1, le=120)] | None = None
    numberResults: Annotated[StrictInt, Field(ge=1, le=4)] = 1
    outputFormat: Literal["MP4", "WEBM"] = "MP4"

    def runware_task(self, task_uuid: str) -> dict[str, Any]:
        # Video is always delivered asynchronously and polled with getResponse.
        return {**self._common("videoInference", task_uuid), "deliveryMethod": "async"}


class ImageResult(BaseModel):
    """The result of `tasks.generate_image`."""

    taskType: Literal["imageInference"] = "imageInference"
    taskUUID: str
    positivePrompt: str
    images: list[dict[str, Any]]
    cost: float
    totalCost: float


class VideoResult(BaseModel):
    """The result of `tasks.generate_video`."""

    taskType: Literal["videoInference"] = "videoInference"
    taskUUID: str
    positivePrompt: str
    videos: list[dict[str, Any]]
    cost: float
    totalCost: float


def upstream_prompt(upstream: Any) -> tuple[str, float]:
    """The positive prompt and the upstream totalCost from a generation task's first argument:
    a `tasks.enhance_prompt` result (its `text`) or a plain prompt string (cost 0)."""
    if isinstance(upstream, str):
        return upstream, 0.0
    if isinstance(upstream, dict):
        if "error" in upstream:
            raise ValidationError(f"the upstream task failed: {upstream['error']}")
        text = upstream.get("text")
        if isinstance(text, str):
            total = upstream.get("totalCost", upstream.get("cost", 0.0))
            return text, float(total) if isinstance(total, int | float) else 0.0
    raise ValidationError(
        "upstream: the first argument must be a tasks.enhance_prompt result (with `text`) or a "
        f"prompt string (got {type(upstream).__name__})"
    )


def parse_generation(
    model: type[ImageRequest] | type[VideoRequest], arguments: dict[str, Any], what: str
) -> ImageRequest | VideoRequest:
    """Validate generation keyword arguments, raising ValidationError naming the field."""
    try:
        return model.model_validate(arguments)
    except pydantic.ValidationError as exc:
        raise validation_error(exc, what) from None
