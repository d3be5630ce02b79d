"""The README's first command: the demo on embedded defaults starts what it needs and cleans up."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import tempfile

import pytest
import redis
from celery import Celery

from workers.sandbox.services import RedisServer, free_port, redis_answers

pytestmark = pytest.mark.slow  # real worker processes, seconds each: `-m 'not slow'` skips them


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose; its parent (the demo) is gone too.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"


def _demo(**env: str) -> subprocess.CompletedProcess[str]:
    """`enhance-worker demo` with none of the project's settings in its environment but `env`."""
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("RUNWARE_", "CELERY_", "REDIS_"))
    }
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", "demo"],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def _demo_logs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "enhance-demo-*.log")))


def test_demo_starts_redis_and_the_sandbox_and_leaves_nothing_behind() -> None:
    logs_before = _demo_logs()
    done = _demo()  # REDIS_URL unset: a private redis-server, whatever answers on 6379
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "Started a private redis-server" in out
    assert _demo_logs() == logs_before
    assert "using the local Runware SANDBOX" in out
    costs = [float(c) for c in re.findall(r"cost \$([0-9.]+)", out)]
    assert costs == [0.0013, 0.0013, 0.0039]
    assert re.search(r"v3 a red fox in fresh snow at dawn", out)
    total = re.search(r"Total cost: \$([0-9.]+) for 3 enhancements", out)
    assert total is not None
    assert abs(float(total.group(1)) - sum(costs)) < 1e-9

    worker_pid = int(re.search(r"Started a worker \(pid (\d+)", out).group(1))  # type: ignore[union-attr]
    redis_port = int(re.search(r"redis-server on port (\d+)", out).group(1))  # type: ignore[union-attr]
    assert not _alive(worker_pid)
    assert not redis_answers(f"redis://127.0.0.1:{redis_port}/0", timeout=0.5)


def test_demo_with_a_dead_redis_url_says_so_in_one_line() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    done = _demo(REDIS_URL=url)
    assert done.returncode == 3
    assert done.stdout.strip() == (
        f"enhance-worker: no Redis answers at {url} (REDIS_URL); start it, or unset REDIS_URL "
        "to let the demo start a private redis-server"
    )


def test_demo_on_a_shared_redis_leaves_other_apps_jobs_alone() -> None:
    """On a Redis set on purpose, another app's job in the default queue and another fleet's
    granted job stay where they are, and the demo's own jobs all finish."""
    with RedisServer() as server:
        url = server.url(0)
        other = Celery("otherapp", broker=url)
        other.send_task("otherapp.resize", kwargs={"image": "cat.png"})
        other.close()
        client = redis.Redis.from_url(url)
        client.lpush("enhance.ready", "another fleet's granted job")
        done = _demo(REDIS_URL=url)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"Using the Redis set in REDIS_URL: {url}" in done.stdout
        assert "for 3 enhancements" in done.stdout
        assert client.llen("celery") == 1
        assert client.lrange("enhance.ready", 0, -1) == [b"another fleet's granted job"]
        client.close()
