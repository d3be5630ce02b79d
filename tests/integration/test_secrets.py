"""The API key never reaches Redis, the logs, the results or an error message."""

from __future__ import annotations

import redis

from tests.conftest import SECRET, RunningWorker, StartWorker
from workers.sandbox import Sandbox
from workers.sandbox.services import RedisServer


def _all_redis_bytes(server: RedisServer) -> tuple[int, bytes]:
    """Every key and value in every database of the test Redis, as raw bytes."""
    seen = 0
    blob = bytearray()
    client = redis.Redis.from_url(server.url(0))
    for db in range(64):
        client.execute_command("SELECT", db)
        for key in client.scan_iter(count=500):
            seen += 1
            blob += key
            dumped = client.dump(key)
            if dumped:
                blob += dumped
    client.close()
    return seen, bytes(blob)


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
    sandbox.configure(fail_next=["400"])
    failed = main_worker.send(prompt="will fail")
    errors = []
    try:
        failed.get(timeout=30)
    except Exception as exc:
        errors.append(str(exc))
    wrong = start_worker("leak", RUNWARE_API_KEY=SECRET + "-wrong")
    try:
        wrong.send(prompt="wrong key").get(timeout=30)
    except Exception as exc:
        errors.append(str(exc))

    # The key really was used: the sandbox only accepts SECRET.
    assert sandbox.state.accepted
    assert len(errors) == 2
    keys, blob = _all_redis_bytes(redis_server)
    assert keys > 0
    assert SECRET.encode() not in blob
    for worker_log in (main_worker.process.log(), wrong.process.log()):
        assert "DEBUG" in worker_log
        assert "tasks.enhance_prompt" in worker_log
        assert SECRET not in worker_log
    assert all(SECRET not in repr(r) for r in results)
    assert all(SECRET not in e for e in errors)
