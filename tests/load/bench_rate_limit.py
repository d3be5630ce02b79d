"""Benchmark of the fleet-wide limits (issue 3). Prints figures; asserts nothing.

  python -m tests.load.bench_rate_limit [--jobs 300] [--builtin-jobs 300] [--skip-builtin]

1. three workers, RUNWARE_RATE_LIMIT=20: the rate the sandbox observes, and its busiest second;
2. the same with Celery's built-in rate_limit="20/s" on each worker instead;
3. RUNWARE_MAX_IN_FLIGHT=5, three workers of concurrency 10, 500 ms latency: the most calls the
   sandbox saw at once, and the throughput;
4. a worker SIGKILLed while it holds slots: how long until the capacity is whole again.
"""

from __future__ import annotations

import argparse
import time

import redis

from tests.load.common import fleet, private_redis, rate_report, run_jobs
from workers.sandbox.services import SandboxProcess, WorkerProcess


def _print(title: str, figures: dict[str, float]) -> None:
    shown = ", ".join(
        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()
    )
    print(f"{title}: {shown}", flush=True)


def _rate_run(jobs: int, app: str = "workers", **env: str) -> dict[str, float]:
    with private_redis() as server, SandboxProcess() as sandbox:
        with fleet(server.url(), sandbox, 3, app=app, WORKER_CONCURRENCY="32", **env) as p:
            started = time.monotonic()
            run_jobs(p, jobs)
            elapsed = time.monotonic() - started
        figures = rate_report(sandbox.stats()["call_times"])
        figures["wall_s"] = elapsed
        return figures


def global_rate(jobs: int) -> dict[str, float]:
    return _rate_run(jobs, RUNWARE_RATE_LIMIT="20")


def builtin_rate(jobs: int) -> dict[str, float]:
    return _rate_run(jobs, app="tests.load.builtin_rate")


def in_flight(jobs: int) -> dict[str, float]:
    with private_redis() as server, SandboxProcess("--latency", "0.5") as sandbox:
        with fleet(
            server.url(), sandbox, 3, RUNWARE_MAX_IN_FLIGHT="5", WORKER_CONCURRENCY="10"
        ) as producer:
            started = time.monotonic()
            run_jobs(producer, jobs)
            elapsed = time.monotonic() - started
        stats = sandbox.stats()
        return {
            "jobs": jobs,
            "max_in_flight": stats["max_in_flight"],
            "throughput_per_s": jobs / elapsed,
        }


def lease_recovery() -> dict[str, float]:
    lease = 5.0
    with private_redis() as server, SandboxProcess("--latency", "60") as sandbox:
        env = {
            "REDIS_URL": server.url(),
            "RUNWARE_API_URL": sandbox.url,
            "RUNWARE_API_KEY": "bench-key",
            "RUNWARE_MAX_IN_FLIGHT": "4",
            "RUNWARE_LEASE_S": str(lease),
            "RUNWARE_TIMEOUT_S": "120",
        }
        worker = WorkerProcess(env, name="doomed").start()
        from celery import Celery

        producer = Celery(broker=server.url(), backend=server.url())
        for n in range(4):
            producer.send_task("tasks.enhance_prompt", kwargs={"prompt": f"held {n}"})
        client = redis.Redis.from_url(server.url())
        leases = "enhance:fair:leases"
        while client.zcard(leases) < 4:
            time.sleep(0.02)
        worker.kill()
        killed = time.monotonic()
        held_after_kill = client.zcard(leases)
        # A new worker's first job can start only once the dead worker's leases expired (the
        # cap of 4 is full until then).
        sandbox.configure(latency_s=0.0)
        heir = WorkerProcess(env, name="heir").start()
        producer.send_task("tasks.enhance_prompt", kwargs={"prompt": "after"}).get(timeout=120)
        heir.stop()
        recovered = time.monotonic() - killed
        producer.close()
        client.close()
        return {
            "lease_s": lease,
            "slots_held_after_kill": held_after_kill,
            "capacity_back_after_s": recovered,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--builtin-jobs", type=int, default=300)
    parser.add_argument("--in-flight-jobs", type=int, default=150)
    parser.add_argument("--skip-builtin", action="store_true")
    args = parser.parse_args()
    _print("global RUNWARE_RATE_LIMIT=20, 3 workers", global_rate(args.jobs))
    if not args.skip_builtin:
        _print("Celery rate_limit='20/s' on each of 3 workers", builtin_rate(args.builtin_jobs))
    _print(
        "RUNWARE_MAX_IN_FLIGHT=5, 3 workers x 10, 500 ms latency", in_flight(args.in_flight_jobs)
    )
    _print("SIGKILL while holding 4 slots", lease_recovery())


if __name__ == "__main__":
    main()
