"""Waiting for results from asyncio and from threads (enhance_client/waiting.py): the same values
and errors as `.get()`, timeouts that name the task, cancellation that leaves the job alone,
chains and groups, and one pub/sub connection for every wait of a loop."""

from __future__ import annotations

import asyncio
import re
import threading
import uuid
from typing import Any

import pytest
import redis
from celery import group
from celery.exceptions import TimeoutError as ResultTimeout

from tests.conftest import RunningWorker
from workers.sandbox import Sandbox


def _no_ids(text: str) -> str:
    return re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "ID", text)


def _pubsub_clients(url: str) -> int:
    """Subscribed connections on `url`'s database (the server is shared: the workers of other
    tests, on databases of their own, come and go meanwhile)."""
    client = redis.Redis.from_url(url)
    db = str(client.connection_pool.connection_kwargs.get("db", 0))
    try:
        return sum(
            1 for c in client.client_list() if int(c.get("sub", 0)) > 0 and str(c.get("db")) == db
        )
    finally:
        client.close()


def test_enhance_async_gives_what_get_gives(main_worker: RunningWorker, sandbox: Sandbox) -> None:
    from tasks import PermanentError, ValidationError, enhance, enhance_async

    async def scenario() -> tuple[dict[str, Any], str, str]:
        with pytest.raises(ValidationError, match="promptVersions"):
            await enhance_async("a fox", versions=9)
        value = await enhance_async("a fox at dawn", versions=2, account="async", timeout=30)
        sandbox.configure(fail_next=["400"])
        with pytest.raises(PermanentError) as failed:
            await enhance_async("a refused fox", timeout=30)
        sandbox.configure(fail_next=["400"])
        try:
            enhance("a refused fox").get(timeout=30)
        except PermanentError as exc:
            got = str(exc)
        return value, str(failed.value), got

    value, async_error, get_error = asyncio.run(scenario())
    assert len(value["texts"]) == 2
    assert value["cost"] == pytest.approx(2 * 0.0013)
    assert sandbox.state.accepted[value["taskUUID"]] == 1
    # The same error, with the same message but for the task's own id.
    assert _no_ids(async_error) == _no_ids(get_error)
    assert "HTTP 400, invalidParameter" in async_error


def test_a_timeout_names_the_task_and_cancelling_leaves_the_job(
    main_worker: RunningWorker, sandbox: Sandbox
) -> None:
    from tasks import enhance, wait_async

    sandbox.configure(latency_s=0.6)

    async def scenario() -> tuple[str, str, dict[str, Any], dict[str, Any]]:
        sent = enhance("a slow fox")
        with pytest.raises(ResultTimeout) as timed_out:
            await wait_async(sent, timeout=0.1)
        other = enhance("a cancelled wait")
        waiting = asyncio.ensure_future(wait_async(other))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        # Both jobs go on, and are awaited again later.
        return (
            sent.id,
            str(timed_out.value),
            await wait_async(sent, timeout=30),
            await wait_async(other, timeout=30),
        )

    task_id, message, first, second = asyncio.run(scenario())
    assert task_id in message
    assert first["text"]
    assert second["text"]


def test_chains_and_groups_are_awaited(main_worker: RunningWorker, sandbox: Sandbox) -> None:
    from tasks import enhance_batch, enhance_prompt, enhance_then_image, wait_async

    async def scenario() -> tuple[Any, Any, Any]:
        chained = enhance_then_image(
            "a red lighthouse", versions=2, model="runware:101@1", width=512, height=512
        )
        batch = enhance_batch(["one fox", "two foxes", "three foxes"])
        together = group(enhance_prompt.s(prompt=f"grouped {n}") for n in range(3)).apply_async()
        return await asyncio.gather(
            wait_async(chained, timeout=60),
            wait_async(batch, timeout=60),
            wait_async(together, timeout=60),
        )

    image, batch, grouped = asyncio.run(scenario())
    assert image["prompt"] == "a red lighthouse"
    assert len(image["results"]) == 2
    assert (batch["count"], batch["failed"]) == (3, 0)
    assert [r["prompt"] for r in grouped] == [f"grouped {n}" for n in range(3)]


def test_many_waits_share_one_pubsub_connection_and_threads_wait_too(
    main_worker: RunningWorker, sandbox: Sandbox
) -> None:
    """200 awaits on one loop hold one pub/sub connection, and results stored before the
    wait began are read, not missed; `wait` from threads runs on one waiting thread."""
    from tasks import enhance, enhance_async, wait

    sandbox.configure(latency_s=0.2)
    done_before = enhance("stored before anyone waits")
    done_before.get(timeout=30)
    seen: list[int] = []
    others = _pubsub_clients(main_worker.redis_url)  # the worker's own (remote control)

    async def scenario() -> list[dict[str, Any]]:
        pending = [
            asyncio.ensure_future(enhance_async(f"many {n}", timeout=60)) for n in range(200)
        ]
        while not any(t.done() for t in pending):
            seen.append(_pubsub_clients(main_worker.redis_url))
            await asyncio.sleep(0.05)
        return list(await asyncio.gather(*pending))

    results = asyncio.run(scenario())
    assert len({r["taskUUID"] for r in results}) == 200
    assert seen
    assert max(seen) == others + 1
    answers: list[Any] = [None] * 8

    def one(n: int) -> None:
        answers[n] = wait(enhance(f"threaded {n}"), timeout=30)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(a["text"] for a in answers)
    assert wait(done_before, timeout=5)["text"]
    # Eight threads waited through the process's one waiting thread (none of their own).
    names = [t.name for t in threading.enumerate()]
    assert names.count("enhance-result-waiter") == 1, names


def test_a_result_stored_while_a_wait_subscribes_is_not_missed(
    main_worker: RunningWorker,
) -> None:
    """A result written by hand while the wait starts (no worker involved), 100 times, at
    moments spread over the subscription: each wait ends by reading the stored value or by
    hearing it published, never by the once-a-second re-read that covers lost messages."""
    from config.celery import app
    from enhance_client.waiting import waiter_for
    from tasks import wait_async

    backend = app.backend

    async def scenario() -> tuple[int, int]:
        seen = 0
        for n in range(100):
            task_id = str(uuid.uuid4())
            waiting = asyncio.ensure_future(wait_async(app.AsyncResult(task_id), timeout=10))
            for _ in range(n % 5):  # 0..4 turns of the loop: before, during, after subscribing
                await asyncio.sleep(0)
            await asyncio.to_thread(backend.store_result, task_id, {"n": n}, "SUCCESS")
            assert (await waiting) == {"n": n}
            seen += 1
        return seen, waiter_for(backend).found_late

    assert asyncio.run(scenario()) == (100, 0)
