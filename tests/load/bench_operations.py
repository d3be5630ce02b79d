"""Operating the fleet: how long a stop takes, and what a refused API key costs. Prints one line
of figures per scenario; asserts nothing.

  python -m tests.load operations [--scenario all|stop|key] [--rounds 3] [--latency 2]
                                  [--jobs 500] [--processes 2]

Each scenario runs on its own Redis with the sandbox as its own process.

1. stop. A worker as every deploy file starts it (REMAP_SIGTERM=SIGQUIT, the default
   WORKER_SOFT_SHUTDOWN_S=30). Idle: SIGTERM, and the seconds until the process exited, --rounds
   times. Busy: 3 jobs whose calls take --latency seconds at the sandbox, SIGTERM once all 3 are
   at the sandbox, the seconds until the process exited, and whether each call was recorded (the
   ledger against the sandbox's bill) and each job's result stored.
2. key. --processes worker processes with a key the sandbox refuses and --jobs jobs queued:
   once the fleet is paused (polled every 0.1 s from a separate client), the HTTP requests the
   sandbox received (all refused), the dead letters, and the jobs' states; then those workers
   stop, one with the right key starts, and the seconds until every job is done.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import time

import redis

from config.keys import FairKeys, StateKeys
from tests.load.common import KEY, ledger_micro, private_redis, worker_env
from tests.producer import backend_app
from workers.sandbox.services import SandboxProcess, WorkerProcess

SCENARIOS = ("stop", "key")
DEPLOYED = {"REMAP_SIGTERM": "SIGQUIT", "WORKER_CONCURRENCY": "3", "RUNWARE_TIMEOUT_S": "30"}


def _sigterm(worker: WorkerProcess) -> float:
    """SIGTERM, then the seconds until the process exited."""
    assert worker.process is not None
    started = time.monotonic()
    worker.process.send_signal(signal.SIGTERM)
    worker.process.wait(timeout=120)
    return time.monotonic() - started


def scenario_stop(args: argparse.Namespace) -> None:
    with private_redis() as server, SandboxProcess("--latency", str(args.latency)) as sandbox:
        url = server.url(0)
        idle = []
        for n in range(args.rounds):
            worker = WorkerProcess(worker_env(url, sandbox, **DEPLOYED), name=f"idle{n}").start()
            idle.append(_sigterm(worker))
        worker = WorkerProcess(worker_env(url, sandbox, **DEPLOYED), name="busy").start()
        producer = backend_app(broker=url, backend=url)
        sent = [
            producer.send_task("tasks.enhance_prompt", kwargs={"prompt": f"stopping {n}"})
            for n in range(3)
        ]
        deadline = time.monotonic() + 30
        while len(sandbox_accepted(sandbox.stats())) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)  # (a call is accepted as it arrives; its answer comes --latency later)
        busy = _sigterm(worker)
        stored = sum(1 for r in sent if r.state == "SUCCESS")
        billed = sandbox.stats()["billed_micro"]
        recorded = ledger_micro(redis.Redis.from_url(url))
        producer.close()
    print(
        f"stop: idle worker, SIGTERM to exit: median {statistics.median(idle):.2f}s, max "
        f"{max(idle):.2f}s over {len(idle)} rounds (Celery alone: the whole 30 s soft-shutdown "
        f"timeout); busy worker with 3 calls of {args.latency:g}s running: exit {busy:.2f}s after "
        f"SIGTERM, {stored}/3 results stored, ledger {recorded} micro-USD vs sandbox bill {billed}"
    )


def scenario_key(args: argparse.Namespace) -> None:
    with private_redis() as server, SandboxProcess("--api-key", KEY) as sandbox:
        url = server.url(0)
        wrong = {"RUNWARE_API_KEY": KEY + "-revoked"}
        workers = [
            WorkerProcess({**worker_env(url, sandbox), **wrong}, name=f"wrong{n}").start()
            for n in range(args.processes)
        ]
        producer = backend_app(broker=url, backend=url)
        client = redis.Redis.from_url(url)
        sent = [
            producer.send_task("tasks.enhance_prompt", kwargs={"prompt": f"key {n}"})
            for n in range(args.jobs)
        ]
        started = time.monotonic()
        while not client.hexists(FairKeys("enhance").overrides, "paused"):
            time.sleep(0.1)
            if time.monotonic() - started > 60:
                print("key: the fleet never paused")
                return
        paused_s = time.monotonic() - started
        time.sleep(2.0)  # whatever else would be called, would be by now
        stats = sandbox.stats()
        dead = client.llen(StateKeys("enhance").dead_letters)
        pending = sum(1 for r in sent if r.state == "PENDING")
        reason = json.loads(client.hget(FairKeys("enhance").overrides, "paused") or "{}")
        for worker in workers:
            worker.stop()
        right = WorkerProcess(worker_env(url, sandbox), name="right").start()
        started = time.monotonic()
        for r in sent:
            r.get(timeout=600)
        done_s = time.monotonic() - started
        billed = len(sandbox_accepted(sandbox.stats()))
        right.stop()
        producer.close()
    print(
        f"key: {args.processes} worker processes with a refused key, {args.jobs} jobs queued: "
        f"paused {paused_s:.2f}s after sending; HTTP requests {stats['requests']} (refused "
        f"{stats['auth_failures']}), dead letters {dead}, jobs still waiting {pending}/{args.jobs}"
        f" ({reason.get('reason', '?')[:60]}...); with the right key: all {args.jobs} done "
        f"{done_s:.1f}s after its worker was ready, {billed} taskUUIDs billed"
    )


def sandbox_accepted(stats: dict[str, object]) -> dict[str, int]:
    accepted = stats.get("accepted")
    return accepted if isinstance(accepted, dict) else {}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", choices=("all", *SCENARIOS), default="all")
    parser.add_argument("--rounds", type=int, default=3, help="stop: idle rounds")
    parser.add_argument("--latency", type=float, default=2.0, help="stop: the busy calls' (s)")
    parser.add_argument("--jobs", type=int, default=500, help="key: jobs queued")
    parser.add_argument("--processes", type=int, default=2, help="key: wrong-key processes")
    args = parser.parse_args()
    chosen = SCENARIOS if args.scenario == "all" else (args.scenario,)
    if "stop" in chosen:
        scenario_stop(args)
    if "key" in chosen:
        scenario_key(args)


if __name__ == "__main__":
    main()
