"""Redis Sentinel failover under load. Prints one line of figures per run; asserts nothing.

  python -m tests.load failover [--jobs 300] [--rate 20] [--workers 2] [--concurrency 8]
                                [--kill-after 0.33]

A primary, a replica and three `redis-server --sentinel` processes (workers/sandbox/services.py's
SentinelGroup, down-after 1 s), the sandbox as its own process (30 ms latency), --workers worker
processes on the sentinel:// URL (REDIS_WAIT_REPLICAS=1, fast redelivery and reconciliation)
under a global --rate, and a plain Celery producer configured as Celery documents it. Once
--kill-after of the jobs were accepted, the primary is SIGKILLed. Prints: jobs completed / sent,
taskUUIDs accepted more than once or without a result, the ledger (read on the new primary once
the unsettled calls are settled, at most 60 s) against the sandbox's bill, the calls in the
busiest second overall and in the 10 s after the kill, how long the fleet stopped calling (the
longest gap between calls around the kill), and how long Sentinel took to promote the replica.
"""

from __future__ import annotations

import argparse
import itertools
import time
from typing import Any

from tests.load.common import KEY, ledger_micro, max_in_window, result_across_failover
from tests.producer import backend_app
from workers.sandbox.services import SandboxProcess, SentinelGroup, WorkerProcess

MASTER = "enhance"
PRICE_MICRO = 1300


def _outcome(result: Any, deadline: float) -> Any:
    """A job's result, its error, or None when it has none by the deadline."""
    try:
        return result_across_failover(result, deadline)
    except TimeoutError:
        return None
    except Exception as exc:  # a failed job: reported as such
        return exc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--rate", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--kill-after", type=float, default=0.33)
    args = parser.parse_args()
    group = SentinelGroup(MASTER).start()
    sandbox = SandboxProcess("--latency", "0.03", "--api-key", KEY).start()
    env = {
        "REDIS_URL": group.url,
        "REDIS_SENTINEL_MASTER": MASTER,
        "REDIS_WAIT_REPLICAS": "1",
        "RUNWARE_API_URL": sandbox.url,
        "RUNWARE_API_KEY": KEY,
        "RUNWARE_RATE_LIMIT": str(args.rate),
        "WORKER_CONCURRENCY": str(args.concurrency),
        "CELERY_VISIBILITY_TIMEOUT_S": "10",
        "RUNWARE_CONNECT_TIMEOUT_S": "1",
        "RUNWARE_TIMEOUT_S": "3",
        "RUNWARE_MAX_RETRIES": "10",
        "RUNWARE_RETRY_BACKOFF_MAX_S": "2",
        "RUNWARE_RECONCILE_S": "2",
        "RUNWARE_RETRY_AFTER_MAX_S": "2",
        "RUNWARE_POLL_MAX_INTERVAL_S": "1",
        "RUNWARE_RESERVATION_S": "15",
        "LOG_LEVEL": "INFO",  # (the ready line the bench waits for is logged at INFO)
    }
    workers = [WorkerProcess(env, name=f"failover{n}") for n in range(args.workers)]
    producer = backend_app(broker=group.url, backend=group.url)
    producer.conf.broker_transport_options = {"master_name": MASTER}
    producer.conf.result_backend_transport_options = {"master_name": MASTER}
    try:
        for worker in workers:
            worker.start()
        results = [
            producer.send_task("tasks.enhance_prompt", kwargs={"prompt": f"failover {n}"})
            for n in range(args.jobs)
        ]
        while len(sandbox.stats()["accepted"]) < args.jobs * args.kill_after:
            time.sleep(0.05)
        killed, calls_at_kill = time.time(), len(sandbox.stats()["accepted"])
        assert group.primary.process is not None
        group.primary.process.kill()
        assert group.replica is not None
        promoted = None
        while promoted is None and time.time() - killed < 60:
            if group.sentinels[0].master() == ("127.0.0.1", group.replica.port):
                promoted = time.time() - killed
            time.sleep(0.05)
        deadline = time.monotonic() + 300
        outcomes = [_outcome(r, deadline) for r in results]
        done = [o for o in outcomes if isinstance(o, dict) and o.get("text")]
        stats = sandbox.stats()
        accepted: dict[str, int] = stats["accepted"]
        uuids = {o["taskUUID"] for o in done}
        twice = sum(1 for n in accepted.values() if n > 1) + len(set(accepted) - uuids)
        bill = int(stats["billed_micro"])
        settle_by = time.monotonic() + 60
        new_primary = f"redis://127.0.0.1:{group.replica.port}/0"
        while ledger_micro(new_primary) != bill and time.monotonic() < settle_by:
            time.sleep(0.2)
        ledger = ledger_micro(new_primary)
        times: list[float] = stats["call_times"]
        after = [t for t in times if killed <= t <= killed + 10]
        around = sorted(t for t in times if killed - 2 <= t <= killed + 60)
        pause = max((b - a for a, b in itertools.pairwise(around)), default=float("nan"))
        print(
            f"failover: {args.workers} workers x {args.concurrency} at {args.rate}/s, primary "
            f"SIGKILLed after {calls_at_kill} calls; replica promoted in "
            f"{promoted if promoted is None else round(promoted, 1)} s; {len(done)}/{args.jobs} "
            f"jobs completed; taskUUIDs billed twice or without a result: {twice}; ledger "
            f"{ledger} micro vs bill {bill} micro ({'equal' if ledger == bill else 'DIFFERENT'})"
            f"; busiest second {max_in_window(times)} calls overall, "
            f"{max_in_window(after) if after else 0} in the 10 s after the kill; the fleet "
            f"stopped calling for {pause:.1f} s"
        )
    finally:
        producer.close()
        for worker in workers:
            worker.stop()
        sandbox.stop()
        group.cleanup()


if __name__ == "__main__":
    main()
