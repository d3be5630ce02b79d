"""The API key never reaches Redis, the logs, the results or an error message."""

from __future__ import annotations

import json
from collections.abc import Callable

import redis

from tests.conftest import SECRET, RunningWorker, StartWorker, run_cli, wait_until
from workers.sandbox import Sandbox
from workers.sandbox.services import RedisServer


def _all_redis_bytes(server: RedisServer) -> tuple[int, bytes]:
    """Every key and value in every database of the test Redis, as raw bytes, each value read
    by its type. (Not DUMP: it compresses values longer than 20 bytes, so a key inside a
    result-sized value does not appear in its bytes.)"""
    seen = 0
    blob = bytearray()
    client = redis.Redis.from_url(server.url(0))
    readers = {
        b"string": lambda key: [client.get(key)],
        b"hash": lambda key: [b for kv in client.hgetall(key).items() for b in kv],
        b"list": lambda key: client.lrange(key, 0, -1),
        b"set": lambda key: list(client.smembers(key)),
        b"zset": lambda key: [m for m, _ in client.zrange(key, 0, -1, withscores=True)],
        b"stream": lambda key: [
            b for _, fields in client.xrange(key) for kv in fields.items() for b in kv
        ],
    }
    databases = int(client.config_get("databases")["databases"])
    for db in range(databases):
        client.execute_command("SELECT", db)
        for key in client.scan_iter(count=500):
            seen += 1
            blob += key
            kind = client.type(key)
            if kind == b"none":  # deleted between SCAN and TYPE (a wake-up list): no bytes left
                continue
            assert kind in readers, f"no reader for {kind!r} ({key!r})"
            for value in readers[kind](key):
                blob += value or b""
    client.close()
    return seen, bytes(blob)


def test_the_scan_finds_a_key_planted_in_any_kind_of_value(redis_server: RedisServer) -> None:
    """The control: a Celery-result-shaped value of 539 bytes with the key inside (which DUMP
    hid 40 times out of 40), and the key in a hash, a list, a set, a sorted set and a stream."""
    client = redis.Redis.from_url(redis_server.url(63))
    result = json.dumps(
        {
            "status": "SUCCESS",
            "result": {"taskUUID": "6fa459ea-ee8a-4ca4-894e-db77e160355e", "note": SECRET},
            "traceback": None,
            "children": [],
            "date_done": "2026-11-26T19:00:00.000000+00:00",
            "task_id": "d0a4e6c8-0b4c-4b9a-8f43-6c1e7f0f9d21",
            "padding": "x" * 300,
        }
    )
    assert len(result) >= 539
    plants: list[tuple[str, Callable[[str], object]]] = [
        ("string", lambda key: client.set(key, result)),
        ("hash", lambda key: client.hset(key, "field", "a" * 40 + SECRET)),
        ("list", lambda key: client.rpush(key, "b" * 40 + SECRET)),
        ("set", lambda key: client.sadd(key, "c" * 40 + SECRET)),
        ("zset", lambda key: client.zadd(key, {"d" * 40 + SECRET: 1})),
        ("stream", lambda key: client.xadd(key, {"e": "f" * 40 + SECRET})),
    ]
    try:
        for kind, plant in plants:
            key = f"planted:{kind}"
            plant(key)
            assert SECRET.encode() in _all_redis_bytes(redis_server)[1], kind
            client.delete(key)
        assert SECRET.encode() not in _all_redis_bytes(redis_server)[1]
    finally:
        client.flushdb()
        client.close()


def test_the_key_leaks_nowhere(
    main_worker: RunningWorker,
    start_worker: StartWorker,
    sandbox: Sandbox,
    redis_server: RedisServer,
) -> None:
    # Successes, retries, permanent failures and an auth failure, all with debug logging.
    sandbox.configure(fail_next=["429", "500", "garbage"])
    results = [
        main_worker.send(prompt=f"scan {n}", promptVersions=2).get(timeout=30) for n in range(3)
    ]
    # Runware (or a gateway before it) quoting the key back in an error: the job's failure,
    # stored in the result backend and logged, carries the text with the key masked.
    sandbox.configure(fail_next=["400"], echo_key=True)
    failed = main_worker.send(prompt="will fail")
    errors = []
    try:
        failed.get(timeout=30)
    except Exception as exc:
        errors.append(str(exc))
    assert "request made with the API key '<redacted>'" in errors[0], errors
    sandbox.configure(echo_key=False)
    # A refused key pauses the fleet (the job waits): what it says about it is scanned too.
    wrong = start_worker("leak", RUNWARE_API_KEY=SECRET + "-wrong")
    wrong.send(prompt="wrong key")

    def paused() -> str:
        shown = run_cli(wrong.redis_url, "limits", "show", "--json", check=True).stdout
        return shown if json.loads(shown)["paused"] else ""

    wait_until(lambda: bool(paused()), 30, "the fleet paused for the wrong key")
    errors.append(paused())
    errors.append(run_cli(wrong.redis_url, "limits", "show", check=True).stdout)

    # The key really was used: the sandbox only accepts SECRET.
    assert sandbox.state.accepted
    assert len(errors) == 3
    keys, blob = _all_redis_bytes(redis_server)
    assert keys > 0
    logs = {"main worker's log": main_worker.process.log(), "wrong key's log": wrong.process.log()}
    for worker_log in logs.values():
        assert "DEBUG" in worker_log
        assert "tasks.enhance_prompt" in worker_log
    sources = {
        "Redis": blob.decode("latin-1"),
        **logs,
        "results": repr(results),
        "errors": "\n".join(errors),
    }
    assert _holding_the_key(sources) == []
    # The control: the same scan finds the key planted in each source.
    planted = {name: text + f" {SECRET} " for name, text in sources.items()}
    assert _holding_the_key(planted) == sorted(sources)


def _holding_the_key(sources: dict[str, str]) -> list[str]:
    """The names of the sources whose text holds the API key."""
    return sorted(name for name, text in sources.items() if SECRET in text)
