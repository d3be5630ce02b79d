"""Fair share and priority under a binding global limit (issue 9). Prints figures; asserts
nothing.

  python -m tests.load.bench_fairness [--backlog 600]

1. RUNWARE_RATE_LIMIT=20, three workers: account A enqueues a batch backlog; 2 s later account
   B enqueues 20 batch jobs. How long B's jobs take, that A's all finish, the global rate.
2. With A's backlog queued, one interactive job of account C: its end-to-end latency.
3. Weights A=3, B=1, both backlogged: the ratio of A to B calls the API sees.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Any

from celery import Celery

from tests.load.common import fleet, max_in_window, private_redis
from workers.services import SandboxProcess


def send(producer: Celery, account: str, count: int, priority: str) -> list[Any]:
    return [
        producer.send_task(
            "tasks.enhance_prompt",
            kwargs={"prompt": f"{account} job {n}", "account": account, "priority": priority},
        )
        for n in range(count)
    ]


def wait_all(results: list[Any], timeout: float = 300) -> float:
    """Seconds until the last of `results` finished."""
    started = time.monotonic()
    for result in results:
        result.get(timeout=timeout)
    return time.monotonic() - started


def scenario_share(backlog: int) -> None:
    with private_redis() as server, SandboxProcess() as sandbox:
        with fleet(server.url(), sandbox, 3, RUNWARE_RATE_LIMIT="20") as producer:
            a_jobs = send(producer, "A", backlog, "batch")
            time.sleep(2.0)
            b_sent = time.monotonic()
            b_jobs = send(producer, "B", 20, "batch")
            for result in b_jobs:
                result.get(timeout=120)
            b_took = time.monotonic() - b_sent
            c_sent = time.monotonic()
            send(producer, "C", 1, "interactive")[0].get(timeout=60)
            c_took = time.monotonic() - c_sent
            wait_all(a_jobs, timeout=600)
        stats = sandbox.stats()
        times = sorted(stats["call_times"])
        span = times[-1] - times[0]
        print(
            f"share: A backlog {backlog} batch, B 20 batch 2 s later: B done in {b_took:.2f}s; "
            f"A all {len(a_jobs)} done; calls {len(times)}, mean rate "
            f"{(len(times) - 1) / span:.3f}/s, busiest 1 s window {max_in_window(times)}",
            flush=True,
        )
        print(
            f"priority: one interactive job of C behind A's backlog: {c_took * 1000:.0f} ms "
            "end to end (sandbox latency 0)",
            flush=True,
        )


def scenario_weights(backlog: int) -> None:
    with private_redis() as server, SandboxProcess() as sandbox:
        env = {**os.environ, "REDIS_URL": server.url()}
        cli = [sys.executable, "-m", "workers.cli", "limits", "set"]
        subprocess.run([*cli, "A", "--weight", "3"], env=env, check=True)
        subprocess.run([*cli, "B", "--weight", "1"], env=env, check=True)
        with fleet(server.url(), sandbox, 3, RUNWARE_RATE_LIMIT="20") as producer:
            a_jobs = send(producer, "A", backlog, "batch")
            b_jobs = send(producer, "B", backlog, "batch")
            wait_all(a_jobs + b_jobs, timeout=900)
        log = sorted(sandbox.stats()["accepted_log"])
        # Count while both were backlogged: up to the moment either account ran out.
        last_a = max(t for t, p in log if p.startswith("A "))
        last_b = max(t for t, p in log if p.startswith("B "))
        window = [p for t, p in log if t <= min(last_a, last_b)]
        a = sum(p.startswith("A ") for p in window)
        b = sum(p.startswith("B ") for p in window)
        print(
            f"weights A=3 B=1, both backlogged: A {a} calls, B {b} calls, ratio {a / b:.2f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backlog", type=int, default=600)
    parser.add_argument("--weights-backlog", type=int, default=200)
    args = parser.parse_args()
    scenario_share(args.backlog)
    scenario_weights(args.weights_backlog)


if __name__ == "__main__":
    main()
