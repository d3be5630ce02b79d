"""The public contract, with a real worker process, real Redis and the sandbox."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from celery import Celery

from config.settings import ENHANCE_MODEL
from tests.conftest import RunningWorker, assert_billed_once
from workers.sandbox import Sandbox

RESULT_KEYS = {"taskType", "taskUUID", "prompt", "text", "texts", "cost"}


def _check_shape(result: dict[str, Any], prompt: str, versions: int) -> None:
    assert set(result) >= RESULT_KEYS
    assert result["taskType"] == "promptEnhance"
    assert result["prompt"] == prompt
    assert uuid.UUID(result["taskUUID"]).version == 4
    assert len(result["texts"]) == versions
    assert result["text"] == result["texts"][0]
    assert all(prompt.split(",")[0] in text for text in result["texts"])
    assert result["cost"] == pytest.approx(0.0013 * versions)


def test_a_bare_celery_app_enqueues_by_name(main_worker: RunningWorker, sandbox: Sandbox) -> None:
    """Backend code that does not import this project: send_task by name to the fleet's queue
    (the README's snippet), .get() the result."""
    bare = Celery(broker=main_worker.redis_url, backend=main_worker.redis_url)
    try:
        prompt = "quiet midnight tea ceremony in a giant overgrown glasshouse"
        result = bare.send_task(
            "tasks.enhance_prompt",
            kwargs={"prompt": prompt, "promptVersions": 3, "promptMaxLength": 260},
            queue="enhance",
        ).get(timeout=30)
    finally:
        bare.close()
    _check_shape(result, prompt, versions=3)
    sent = sandbox.state.bodies[result["taskUUID"]]
    assert sent == {
        "taskType": "promptEnhance",
        "taskUUID": result["taskUUID"],
        "model": ENHANCE_MODEL,
        "prompt": prompt,
        "promptVersions": 3,
        "promptMaxLength": 260,
        "includeCost": True,
    }
    assert sandbox.state.accepted == {result["taskUUID"]: 1}


def test_the_given_task_uuid_is_used(main_worker: RunningWorker, sandbox: Sandbox) -> None:
    task_uuid = str(uuid.uuid4())
    result = main_worker.send(prompt="a red fox", taskUUID=task_uuid).get(timeout=30)
    assert result["taskUUID"] == task_uuid
    assert sandbox.state.accepted == {task_uuid: 1}


def test_the_enhance_helper(main_worker: RunningWorker, sandbox: Sandbox) -> None:
    from tasks import enhance

    task_uuid = str(uuid.uuid4())
    async_result = enhance(
        "a lighthouse in a storm", max_length=100, versions=2, task_uuid=task_uuid
    )
    result = async_result.get(timeout=30)
    _check_shape(result, "a lighthouse in a storm", versions=2)
    assert result["taskUUID"] == task_uuid
    assert sandbox.state.bodies[task_uuid]["promptMaxLength"] == 100


def test_async_delivery_is_polled(main_worker: RunningWorker, sandbox: Sandbox) -> None:
    result = main_worker.send(
        prompt="a castle at dusk", deliveryMethod="async", promptVersions=2
    ).get(timeout=30)
    _check_shape(result, "a castle at dusk", versions=2)
    assert sandbox.state.bodies[result["taskUUID"]]["deliveryMethod"] == "async"
    assert sandbox.state.by_type.get("getResponse", 0) >= 1
    assert sandbox.state.accepted == {result["taskUUID"]: 1}


def test_many_jobs_run_concurrently_and_each_is_billed_once(
    main_worker: RunningWorker, sandbox: Sandbox
) -> None:
    sandbox.configure(latency_s=0.2)
    pending = [main_worker.send(prompt=f"prompt number {n}") for n in range(24)]
    results = [p.get(timeout=60) for p in pending]
    assert len(results) == 24
    assert_billed_once(sandbox, results)
    # The threads pool overlaps the waits: more than one call was open at once, in requests
    # of their own or sharing one.
    shared = any(len(uuids) > 1 for _at, _fault, uuids in sandbox.state.request_log)
    assert sandbox.state.max_in_flight > 1 or shared
