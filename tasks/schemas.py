"""The public contract: requests and results, as pydantic models.

The same models validate on the producer side (before anything is enqueued) and on the worker side
(a raw message sent by name), so both ends say the same thing about a bad argument.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from config.settings import ENHANCE_MODEL
from tasks.errors import ValidationError

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
    if not value.startswith(("http://", "https://")) or len(value) < len("http://x"):
        raise ValueError("must be an http:// or https:// URL")
    return value


AccountStr = Annotated[
    StrictStr, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:@-]+$")
]
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
    # Ours, not Runware's: who the cost is attributed to. Never sent to Runware.
    account: AccountStr = "default"

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


def parse_enhance(arguments: dict[str, Any]) -> EnhanceRequest:
    """Validate `tasks.enhance_prompt` keyword arguments, raising ValidationError."""
    try:
        return EnhanceRequest.model_validate(arguments)
    except pydantic.ValidationError as exc:
        raise validation_error(exc, "enhance_prompt") from None


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
