"""Bad input: refused before enqueueing by the helper, and a clean FAILURE at the worker."""

from __future__ import annotations

import time
from typing import Any

import pytest
from celery.result import AsyncResult

from tasks.errors import ValidationError
from tests.conftest import RunningWorker
from tests.unit.test_schemas import INVALID, VALID
from workers.sandbox import Sandbox


def _received(worker: RunningWorker) -> int:
    return worker.process.log().count("Task tasks.enhance_prompt[")


def test_the_helper_refuses_before_enqueueing(main_worker: RunningWorker, sandbox: Sandbox) -> None:
    from tasks import enhance

    before = _received(main_worker)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x" * 301}, "prompt"),
        ({"prompt": "fox", "max_length": 11}, "promptMaxLength"),
        ({"prompt": "fox", "max_length": 401}, "promptMaxLength"),
        ({"prompt": "fox", "versions": 0}, "promptVersions"),
        ({"prompt": "fox", "versions": 6}, "promptVersions"),
        ({"prompt": "fox", "task_uuid": "123"}, "taskUUID"),
    ]
    for arguments, field in cases:
        with pytest.raises(ValidationError, match=field):
            enhance(**arguments)
    time.sleep(0.5)  # anything enqueued by mistake would have reached the worker by now
    assert _received(main_worker) == before
    assert sandbox.state.requests == 0


def test_raw_bad_messages_fail_at_the_worker_without_a_call(
    main_worker: RunningWorker, sandbox: Sandbox
) -> None:
    pending = [(main_worker.send(**arguments), field, limit) for arguments, field, limit in INVALID]
    for async_result, field, limit in pending:
        assert isinstance(async_result, AsyncResult)
        with pytest.raises(Exception) as caught:  # noqa: PT011 - rebuilt by Celery, checked below
            async_result.get(timeout=30)
        message = str(caught.value)
        assert field in message, message
        assert limit in message, message
        assert async_result.state == "FAILURE"
        assert f"{async_result.id}" not in _retried(main_worker)
    assert sandbox.state.requests == 0
    # The worker keeps serving.
    assert main_worker.send(prompt="still here").get(timeout=30)["prompt"] == "still here"


def test_positional_arguments_are_refused(main_worker: RunningWorker, sandbox: Sandbox) -> None:
    async_result = main_worker.app.send_task("tasks.enhance_prompt", args=["a fox"])
    with pytest.raises(Exception, match="keyword arguments only"):
        async_result.get(timeout=30)
    assert sandbox.state.requests == 0


def test_version_six_names_prompt_versions(main_worker: RunningWorker, sandbox: Sandbox) -> None:
    """The issue's own example: promptVersions 6 fails naming the field, with no HTTP call."""
    async_result = main_worker.send(prompt="a red fox", promptVersions=6)
    with pytest.raises(Exception, match=r"promptVersions: .*less than or equal to 5"):
        async_result.get(timeout=30)
    assert sandbox.state.requests == 0


def test_every_valid_bound_succeeds_at_the_worker(
    main_worker: RunningWorker, sandbox: Sandbox
) -> None:
    cases = [dict(c) for c in VALID if "webhookURL" not in c]
    pending = [main_worker.send(**arguments) for arguments in cases]
    results = [p.get(timeout=60) for p in pending]
    for arguments, result in zip(cases, results, strict=True):
        assert result["prompt"] == arguments["prompt"]
        assert len(result["texts"]) == arguments.get("promptVersions", 1)
    assert len(sandbox.state.accepted) == len(cases)


def _retried(worker: RunningWorker) -> str:
    return "\n".join(line for line in worker.process.log().splitlines() if "will retry" in line)
