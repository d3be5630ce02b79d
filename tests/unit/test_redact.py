"""Secrets are masked in any text the project logs or shows."""

from __future__ import annotations

import json
import logging

import pytest

from config.settings import get_settings
from tasks.redact import redact
from workers.logs import JsonFormatter, RedactingFilter


def test_query_strings_and_credentials_are_masked() -> None:
    text = (
        "posting to https://hooks.example.com/x?token=abc&sig=def and "
        "redis://:hunter2@redis:6379/0 and http://user:pw@host/path"
    )
    masked = redact(text)
    for secret in ("token=abc", "sig=def", "hunter2", "user:pw"):
        assert secret not in masked
    assert "https://hooks.example.com/x?<redacted>" in masked
    assert "redis://<redacted>@redis:6379/0" in masked


def test_the_api_key_is_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNWARE_API_KEY", "rw-live-0123456789")
    get_settings.cache_clear()
    try:
        assert redact("key rw-live-0123456789 leaked") == "key <redacted> leaked"
    finally:
        get_settings.cache_clear()


def test_log_records_are_masked_and_json_lines_carry_job_fields() -> None:
    record = logging.LogRecord(
        "celery",
        logging.DEBUG,
        __file__,
        1,
        "Apply %s",
        ("{'webhookURL': 'https://h/x?t=s3'}",),
        None,
    )
    record.taskUUID = "91b29c95-7352-4fa0-babd-4673dda40929"
    assert RedactingFilter().filter(record)
    line = json.loads(JsonFormatter().format(record))
    assert "s3" not in line["message"]
    assert line["taskUUID"] == "91b29c95-7352-4fa0-babd-4673dda40929"
    assert line["level"] == "DEBUG"
