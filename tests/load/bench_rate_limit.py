"""Benchmark of the fleet-wide limits (issue 3). Prints figures; asserts nothing.

  python -m tests.load.bench_rate_limit [--jobs 300] [--builtin-jobs 300] [--skip-builtin]
                                        [--plot rate.png]

1. three workers, RUNWARE_RATE_LIMIT=20: the rate the sandbox observes, and its busiest second;
2. the same with Celery's built-in rate_limit="20/s" on each worker instead;
3. RUNWARE_MAX_IN_FLIGHT=5, three workers of concurrency 10, 500 ms latency: the most calls the
   sandbox saw at once, and the throughput;
4. a worker SIGKILLed while it holds slots: how long until the capacity is whole again.

Jobs of 1 and 2 come from two accounts, A and B. `--plot FILE.png` draws the tasks per second
Runware accepted over time in 1 and 2: per account and in all under the fleet's limit, and in
all under Celery's per-worker one, with the limit drawn.
"""

from __future__ import annotations

import argparse
import time

import redis

from tests.load.common import accepted_by_prefix, fleet, private_redis, rate_report, run_jobs
from tests.load.plot import plot_rates
from tests.producer import backend_app
from workers.sandbox.services import SandboxProcess, WorkerProcess


def _print(title: str, figures: dict[str, float]) -> None:
    shown = ", ".join(
        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()
    )
    print(f"{title}: {shown}", flush=True)


ACCOUNTS = ("A", "B")
Run = tuple[dict[str, float], dict[str, list[float]]]


def _rate_run(jobs: int, app: str = "workers", **env: str) -> Run:
    """The figures of one run, and when each account's tasks were accepted."""
    with private_redis() as server, SandboxProcess() as sandbox:
        with fleet(server.url(), sandbox, 3, app=app, WORKER_CONCURRENCY="32", **env) as p:
            started = time.monotonic()
            run_jobs(p, jobs, accounts=ACCOUNTS)
            elapsed = time.monotonic() - started
        stats = sandbox.stats()
        figures = rate_report(stats["call_times"])
        figures["wall_s"] = elapsed
        return figures, accepted_by_prefix(stats, ACCOUNTS)


def global_rate(jobs: int) -> Run:
    return _rate_run(jobs, RUNWARE_RATE_LIMIT="20")


def builtin_rate(jobs: int) -> Run:
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

        producer = backend_app(broker=server.url(), backend=server.url())
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
    parser.add_argument("--plot", metavar="FILE.png", help="write the rates over time as a PNG")
    args = parser.parse_args()
    figures, fleet_times = global_rate(args.jobs)
    _print("global RUNWARE_RATE_LIMIT=20, 3 workers", figures)
    series = {
        **{f"account {a}, RUNWARE_RATE_LIMIT=20 (fleet)": fleet_times[a] for a in ACCOUNTS},
        "A + B, RUNWARE_RATE_LIMIT=20 (fleet)": sorted(t for a in ACCOUNTS for t in fleet_times[a]),
    }
    if not args.skip_builtin:
        figures, builtin_times = builtin_rate(args.builtin_jobs)
        _print("Celery rate_limit='20/s' on each of 3 workers", figures)
        series["A + B, Celery rate_limit='20/s' on each of 3 workers"] = sorted(
            t for a in ACCOUNTS for t in builtin_times[a]
        )
    if args.plot:
        written = plot_rates(
            args.plot,
            "Tasks Runware accepted per second: 3 workers x 32 threads",
            series,
            limits={"the limit: 20/s for the whole fleet": 20.0},
        )
        print(f"plot: {written}", flush=True)
    _print(
        "RUNWARE_MAX_IN_FLIGHT=5, 3 workers x 10, 500 ms latency", in_flight(args.in_flight_jobs)
    )
    _print("SIGKILL while holding 4 slots", lease_recovery())


if __name__ == "__main__":
    main()
