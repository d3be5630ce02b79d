"""The README's first command: the demo on embedded defaults starts what it needs and cleans up."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from workers.sandbox.services import free_port, redis_answers


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose; its parent (the demo) is gone too.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"


def test_demo_starts_redis_and_the_sandbox_and_leaves_nothing_behind() -> None:
    port = free_port()
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("RUNWARE_", "CELERY_", "REDIS_"))
    }
    env["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"  # nothing answers there
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", "demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "started a private redis-server" in out
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
