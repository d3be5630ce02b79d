"""What the hot path saves must not cost correctness: shared requests, one-trip result writes."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable

import pytest
import redis
from celery import chord
from celery.exceptions import TimeoutError as CeleryTimeout
from kombu import Connection

from config.backend import ResultStore
from config.celery import result_backend_url
from tests.conftest import StartWorker, assert_billed_once, wait_until
from tests.load.common import ledger_micro
from tests.producer import backend_app
from workers.sandbox import Sandbox
from workers.sandbox.services import RedisServer


def test_a_busy_worker_sends_several_jobs_per_request(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    sandbox.configure(latency_s=0.3)
    worker = start_worker("batching", WORKER_CONCURRENCY="40", RUNWARE_BATCH_WINDOW_MS="50")
    prompts = [f"a lighthouse number {n}" for n in range(40)]
    pending = [worker.send(prompt=prompt) for prompt in prompts]
    results = [p.get(timeout=60) for p in pending]
    for prompt, result in zip(prompts, results, strict=True):
        assert result["prompt"] == prompt
        assert result["text"].startswith(prompt)  # its own answer, not a neighbour's
        assert result["cost"] > 0
    assert sandbox.state.tasks_received == 40
    assert sandbox.state.requests < 40
    assert_billed_once(sandbox, results, ledger=ledger_micro(worker.redis_url))


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_the_app_writes_results_through_the_one_trip_store(
    redis_server: RedisServer, compression: str | None
) -> None:
    """Plain and compressed. Only a SUCCESS is stored compressed (the script reads the marked
    form's leading NUL as SUCCESS, with no second key beside it); the other states stay plain,
    and so does a SUCCESS too small to gain from it."""
    from config.backend import SMALL_RESULT_BYTES

    url = redis_server.url(9)
    app = backend_app(broker=url, backend=result_backend_url(url))
    app.conf.result_compression = compression
    backend = app.backend
    assert isinstance(backend, ResultStore)
    client = redis.Redis.from_url(url)
    done = {"text": "a lighthouse on a cliff at dusk, " * 20}
    task_id = str(uuid.uuid4())
    backend.store_result(task_id, done, "SUCCESS")
    # A late write from a redelivered copy of the job must not replace the success (Celery's
    # own rule, here made atomic).
    backend.store_result(task_id, ValueError("late"), "FAILURE")
    backend.store_result(task_id, None, "RETRY")
    meta = backend.get_task_meta(task_id, cache=False)
    assert meta["status"] == "SUCCESS"
    assert meta["result"] == done
    ttl = client.ttl(f"celery-task-meta-{task_id}")
    assert 0 < ttl <= int(app.conf.result_expires.total_seconds())
    stored = client.get(f"celery-task-meta-{task_id}")
    assert stored is not None
    assert stored.startswith(b"\x00celery-compressed\x00") == (compression is not None)
    assert client.keys(f"*{task_id}*") == [f"celery-task-meta-{task_id}".encode()]
    # Other states replace each other as in Celery, plain whatever the compression, and the
    # reader sees the last one; a stored FAILURE is replaced by a later SUCCESS.
    other = str(uuid.uuid4())
    backend.store_result(other, None, "RETRY")
    assert client.get(f"celery-task-meta-{other}").startswith(b"{")  # type: ignore[union-attr]
    backend.store_result(other, ValueError("bad prompt " * 100), "FAILURE")
    assert client.get(f"celery-task-meta-{other}").startswith(b"{")  # type: ignore[union-attr]
    assert backend.get_task_meta(other, cache=False)["status"] == "FAILURE"
    backend.store_result(other, done, "SUCCESS")
    assert backend.get_task_meta(other, cache=False)["result"] == done
    small = str(uuid.uuid4())
    backend.store_result(small, {"text": "a fox"}, "SUCCESS")
    raw = client.get(f"celery-task-meta-{small}")
    assert raw is not None
    assert len(raw) < SMALL_RESULT_BYTES
    assert raw.startswith(b"{")
    client.close()
    app.close()


def test_a_result_written_by_the_store_reaches_a_waiting_get(redis_server: RedisServer) -> None:
    """The store publishes as Celery's does, so AsyncResult.get wakes without polling. The
    write waits until the reader is subscribed (so only the published message can wake it),
    and the control shows that a write without the message does not wake it."""
    url = redis_server.url(9)
    writer = backend_app(broker=url, backend=result_backend_url(url))
    reader = backend_app(broker=url, backend=url)
    client = redis.Redis.from_url(url)

    def subscribed(task_id: str) -> bool:
        channel = f"celery-task-meta-{task_id}"
        return any(n for _, n in client.pubsub_numsub(channel))

    def once_subscribed(task_id: str, write: Callable[[], object]) -> threading.Thread:
        def run() -> None:
            wait_until(lambda: subscribed(task_id), 10, "the reader's subscription")
            # Celery reads the stored state once right after it subscribes: the write comes
            # well after that read, so only a published message can wake the reader (a write
            # racing that read made the control below fail on a loaded machine).
            time.sleep(0.5)
            write()

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    task_id = str(uuid.uuid4())
    late = once_subscribed(
        task_id, lambda: writer.backend.store_result(task_id, {"text": "published"}, "SUCCESS")
    )
    assert reader.AsyncResult(task_id).get(timeout=10) == {"text": "published"}
    late.join()

    silent_id = str(uuid.uuid4())
    meta = json.dumps({"status": "SUCCESS", "result": {"text": "silent"}, "task_id": silent_id})
    silent = once_subscribed(silent_id, lambda: client.set(f"celery-task-meta-{silent_id}", meta))
    with pytest.raises(CeleryTimeout):
        reader.AsyncResult(silent_id).get(timeout=2)
    silent.join()
    client.close()
    writer.close()
    reader.close()


def test_the_broker_channel_shares_one_client_and_still_delivers(
    redis_server: RedisServer,
) -> None:
    from config.celery import app as project_app
    from config.transport import Transport

    with project_app.connection_for_write() as project_connection:
        assert type(project_connection.transport) is Transport
    with Connection(redis_server.url(9), transport="config.transport:Transport") as connection:
        channel = connection.default_channel
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second  # kombu itself would build two clients here
            assert first.ping()
        queue = connection.SimpleQueue(f"hot-path-{uuid.uuid4().hex[:8]}")
        queue.put({"n": 1})
        message = queue.get(timeout=5)
        assert message.payload == {"n": 1}
        message.ack()
        queue.close()


def test_compressed_results_are_smaller_and_read_by_a_plain_celery_producer(
    start_worker: StartWorker, sandbox: Sandbox
) -> None:
    """A worker at the default CELERY_RESULT_COMPRESSION (zlib): the stored result is Celery's
    marked compressed form, smaller than the JSON it holds, and a producer with no compression
    set reads it (waiting on it, and again from Redis); a chord's callback, in the worker, reads
    its parts."""
    worker = start_worker("compressed")
    prompt = "a lighthouse keeper's cat watching a storm roll over the cliffs " * 4
    sent = worker.send(prompt=prompt, promptVersions=3)
    result = sent.get(timeout=30)  # type: ignore[attr-defined]
    assert result["prompt"] == prompt
    assert len(result["texts"]) == 3
    client = redis.Redis.from_url(worker.redis_url)
    stored = client.get(f"celery-task-meta-{sent.id}")  # type: ignore[attr-defined]
    client.close()
    assert stored is not None
    assert stored.startswith(b"\x00celery-compressed\x00")
    assert len(stored) < len(json.dumps(result))
    assert backend_app(backend=worker.redis_url).AsyncResult(sent.id).get(timeout=5) == result  # type: ignore[attr-defined]
    items = [
        worker.app.signature("tasks.enhance_batch_item", kwargs={"prompt": p, "priority": "batch"})
        for p in ("a fox", "an owl")
    ]
    batch = chord(items)(worker.app.signature("tasks.collect_batch"))
    assert [item["prompt"] for item in batch.get(timeout=60)["results"]] == ["a fox", "an owl"]


def test_a_result_over_a_mebibyte_is_stored_compressed_and_read_as_it_was(
    redis_server: RedisServer,
) -> None:
    """A batch's result (tens of MB for 10,000 prompts) is stored in Celery's marked compressed
    form even with CELERY_RESULT_COMPRESSION=none: its write, its PUBLISH and each read move a
    fraction of it. A plain Celery reader with no compression set reads it as it was; a result
    under the limit is stored as plain JSON."""
    from config.backend import LARGE_RESULT_BYTES

    url = redis_server.url(9)
    writer = backend_app(broker=url, backend=result_backend_url(url))
    reader = backend_app(broker=url, backend=url)
    assert isinstance(writer.backend, ResultStore)
    assert not writer.conf.result_compression
    client = redis.Redis.from_url(url)
    texts = [f"version {n}: {uuid.uuid4()} a lighthouse in a storm" for n in range(30_000)]
    large, small = {"results": texts}, {"results": texts[:10]}
    assert len(json.dumps(large)) > LARGE_RESULT_BYTES
    stored = {}
    for value in (large, small):
        task_id = str(uuid.uuid4())
        writer.backend.store_result(task_id, value, "SUCCESS")
        raw = client.get(f"celery-task-meta-{task_id}")
        assert raw is not None
        stored[len(value["results"])] = raw
        assert reader.AsyncResult(task_id).get(timeout=5) == value
        # Written once: a redelivered job's second SUCCESS does not replace it.
        writer.backend.store_result(task_id, {"results": []}, "SUCCESS")
        assert reader.AsyncResult(task_id).get(timeout=5) == value
    assert stored[30_000].startswith(b"\x00celery-compressed\x00")
    assert len(stored[30_000]) < LARGE_RESULT_BYTES
    assert stored[10].startswith(b"{")
    client.close()
    writer.close()
    reader.close()
