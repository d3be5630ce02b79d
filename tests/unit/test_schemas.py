"""Validation of enhance_prompt arguments: every bound, on both sides of the limit."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from config.settings import ENHANCE_MODEL
from enhance_client.schemas import parse_enhance, stable_task_uuid
from tasks.errors import ValidationError

V4 = "91b29c95-7352-4fa0-babd-4673dda40929"

VALID: list[dict[str, Any]] = [
    {"prompt": "x"},
    {"prompt": "x" * 300},
    {"prompt": "fox", "promptMaxLength": 12},
    {"prompt": "fox", "promptMaxLength": 400},
    {"prompt": "fox", "promptVersions": 1},
    {"prompt": "fox", "promptVersions": 5},
    {"prompt": "fox", "taskUUID": V4},
    {"prompt": "fox", "deliveryMethod": "sync"},
    {"prompt": "fox", "deliveryMethod": "async"},
    {"prompt": "fox", "webhookURL": "https://example.com/hook?token=abc"},
    {"prompt": "fox", "webhookURL": "http://127.0.0.1:9/hook"},
    {"prompt": "fox", "webhookURL": "HTTPS://Example.com/hook"},  # schemes are case-insensitive
    {"prompt": "fox", "webhookURL": "https://[::1]:8443/hook"},
]

# (arguments, the field the error must name, a phrase of the limit it must state)
INVALID: list[tuple[dict[str, Any], str, str]] = [
    ({"prompt": ""}, "prompt", "at least 1 character"),
    ({"prompt": "x" * 301}, "prompt", "at most 300 characters"),
    ({"prompt": 42}, "prompt", "valid string"),
    ({}, "prompt", "required"),
    ({"prompt": "fox", "promptMaxLength": 11}, "promptMaxLength", "greater than or equal to 12"),
    ({"prompt": "fox", "promptMaxLength": 401}, "promptMaxLength", "less than or equal to 400"),
    ({"prompt": "fox", "promptMaxLength": "200"}, "promptMaxLength", "valid integer"),
    ({"prompt": "fox", "promptVersions": 0}, "promptVersions", "greater than or equal to 1"),
    ({"prompt": "fox", "promptVersions": 6}, "promptVersions", "less than or equal to 5"),
    ({"prompt": "fox", "promptVersions": 2.5}, "promptVersions", "valid integer"),
    ({"prompt": "fox", "promptVersions": True}, "promptVersions", "valid integer"),
    ({"prompt": "fox", "taskUUID": "not-a-uuid"}, "taskUUID", "UUID v4"),
    ({"prompt": "fox", "taskUUID": str(uuid.uuid1())}, "taskUUID", "UUID v4"),
    ({"prompt": "fox", "deliveryMethod": "push"}, "deliveryMethod", "'sync' or 'async'"),
    ({"prompt": "fox", "webhookURL": "ftp://example.com"}, "webhookURL", "http"),
    ({"prompt": "fox", "webhookURL": "https://"}, "webhookURL", "host"),
    ({"prompt": "fox", "webhookURL": "http://?x=1"}, "webhookURL", "host"),
    ({"prompt": "fox", "webhookURL": "https://exa mple.com/h"}, "webhookURL", "spaces"),
    ({"prompt": "fox", "webhookURL": "https://example.com/a b"}, "webhookURL", "spaces"),
    ({"prompt": "fox", "webhookURL": "https://example.com:99999/"}, "webhookURL", "port"),
    ({"prompt": "fox", "model": "other"}, "model", "unknown argument"),
    ({"prompt": "fox", "includeCost": False}, "includeCost", "unknown argument"),
]


@pytest.mark.parametrize("arguments", VALID)
def test_valid_arguments_are_accepted(arguments: dict[str, Any]) -> None:
    request = parse_enhance(arguments)
    assert request.prompt == arguments["prompt"]


@pytest.mark.parametrize(("arguments", "field", "limit"), INVALID)
def test_invalid_arguments_name_the_field_and_limit(
    arguments: dict[str, Any], field: str, limit: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_enhance(arguments)
    message = str(caught.value)
    assert message.startswith(f"invalid enhance_prompt request: {field}:"), message
    assert limit in message, message


def test_runware_task_has_only_documented_fields() -> None:
    request = parse_enhance({"prompt": "fox", "promptVersions": 3, "promptMaxLength": 100})
    body = request.runware_task(V4)
    assert body == {
        "taskType": "promptEnhance",
        "taskUUID": V4,
        "model": ENHANCE_MODEL,
        "prompt": "fox",
        "promptVersions": 3,
        "promptMaxLength": 100,
        "includeCost": True,
    }


def test_async_and_webhook_are_passed_through() -> None:
    request = parse_enhance(
        {"prompt": "fox", "deliveryMethod": "async", "webhookURL": "https://h.example/x"}
    )
    body = request.runware_task(V4)
    assert body["deliveryMethod"] == "async"
    assert body["webhookURL"] == "https://h.example/x"


def test_stable_task_uuid_keeps_a_v4_task_id_and_derives_a_v4_from_others() -> None:
    assert stable_task_uuid(V4) == V4
    derived = stable_task_uuid("custom-task-id")
    assert uuid.UUID(derived).version == 4
    assert derived == stable_task_uuid("custom-task-id")
    assert derived != stable_task_uuid("another-task-id")


def test_a_generation_limit_is_said_once() -> None:
    from tasks.generate import parse_image

    with pytest.raises(ValidationError) as caught:
        parse_image({"positivePrompt": "a cat on a mat", "model": "runware:101@1", "width": 1000})
    assert str(caught.value).count("(got 1000)") == 1
    assert "width: must be a multiple of 64 (got 1000)" in str(caught.value)


def test_the_contract_keeps_its_former_import_path() -> None:
    """Code written against `tasks.schemas` gets the same objects as `enhance_client.schemas`."""
    import enhance_client.schemas as contract
    import tasks.schemas as former

    for name in former.__all__:
        assert getattr(former, name) is getattr(contract, name), name
