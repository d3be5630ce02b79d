"""Chaos at fleet scale: SIGKILLs at any instant, and a Redis restart, under the fair intake.
Prints one line of figures per scenario; asserts nothing.

  python -m tests.load chaos [--jobs 400] [--kills 16] [--rate 10] [--latency 0.2] [--seed 1]
                             [--redis-restart [--restart-jobs 200]] [--skip-kills]

1. Kills. --jobs jobs through a fleet of 3 workers (WORKER_CONCURRENCY=10) under a global rate,
   the sandbox at --latency, fast redelivery (CELERY_VISIBILITY_TIMEOUT_S=10). --kills SIGKILLs
   at random instants, each followed by a new worker: every other kill hits the worker that was
   just started, within 0.3 s of it becoming ready, while it fills its threads (one that has
   taken no job by then, as under a binding rate a new worker is fed at the rate, not in a
   burst, is killed within 0.1 s of its first job instead, waiting at most 3 s); of the others,
   every other one hits the process that holds the dispatcher lock (`enhance:fair:dispatcher`,
   "hostname:PID:..."), the rest a random worker. Before each replacement starts, the bench waits
   for a dispatcher to hold the lock, so that the new worker is fed at once. Prints jobs
   completed / sent, time to complete, taskUUIDs billed twice (accepted more than once by the
   sandbox, or accepted without a result), the ledger's total against the sandbox's bill, and
   how many "lost between the ready queue and a worker" recoveries the workers logged.
   The default rate (10/s, 40 s of calls for 400 jobs) keeps calls flowing while the kills
   happen: a kill and its replacement take about 2.5 s here (a worker starts in about 2 s).
2. --redis-restart: Redis with append-only persistence stopped (SIGTERM) and started again on
   the same port and directory while --restart-jobs jobs run: every job completes. A worker that
   exits by itself (in either scenario) is counted, its log kept, and replaced, as a process
   manager would.

Every wait is bounded; a job that never completes is reported with where its message is.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import redis

from config.keys import FairKeys
from tests.load.bench_fairness import PRICE_MICRO, read_results, send_backlog
from tests.load.common import KEY, ledger_micro
from workers.sandbox.services import RedisServer, SandboxProcess, WorkerProcess

DISPATCHER_KEY = FairKeys("enhance").dispatcher  # "hostname:PID:..." of the holder
LOST = re.compile(r"(\d+) granted job\(s\) were lost between the ready queue and a worker")
RECEIVED = re.compile(r"Task [\w.]+\[[^\]]+\] received")
ENV = {
    "WORKER_CONCURRENCY": "10",
    # A dead worker's unacknowledged jobs come back after about 12 s (the visibility timeout must
    # outlast a run: connect + read timeout + 1).
    "CELERY_VISIBILITY_TIMEOUT_S": "10",
    "RUNWARE_CONNECT_TIMEOUT_S": "1",
    "RUNWARE_TIMEOUT_S": "3",
    "RUNWARE_RETRY_BACKOFF_S": "0.2",
    "RUNWARE_RETRY_BACKOFF_MAX_S": "2",
    "RUNWARE_MAX_RETRIES": "10",
    # DEBUG: Celery logs each job a worker takes ("Task ... received") only at DEBUG; the bench
    # counts them to show how far a new worker had filled its threads when it was killed.
    "LOG_LEVEL": "DEBUG",
}


class Fleet:
    """Worker processes on one Redis, started and replaced one at a time; logs in one folder."""

    def __init__(self, redis_url: str, sandbox: SandboxProcess, env: dict[str, str]) -> None:
        self.env = {
            "REDIS_URL": redis_url,
            "RUNWARE_API_URL": sandbox.url,
            "RUNWARE_API_KEY": KEY,
            **ENV,
            **env,
        }
        self.logs = tempfile.mkdtemp(prefix="enhance-chaos-")
        self.every: list[WorkerProcess] = []
        self.live: list[WorkerProcess] = []
        self.exited: list[WorkerProcess] = []  # workers that exited by themselves
        self.ready_at: dict[int, float] = {}  # pid -> time.monotonic() when it said ready

    def start(self) -> WorkerProcess:
        name = f"chaos{len(self.every)}"
        worker = WorkerProcess(self.env, name=name, log_path=os.path.join(self.logs, name + ".log"))
        self.every.append(worker)
        worker.start(timeout=60)
        self.ready_at[worker.pid] = time.monotonic()
        self.live.append(worker)
        return worker

    def kill(self, worker: WorkerProcess) -> None:
        worker.kill()  # SIGKILL to its process group
        self.live.remove(worker)

    def replace_exited(self) -> None:
        """Replace every worker that exited by itself, as a process manager would."""
        for worker in list(self.live):
            if worker.process is not None and worker.process.poll() is not None:
                self.live.remove(worker)
                self.exited.append(worker)
                self.start()

    def by_pid(self, pid: int | None) -> WorkerProcess | None:
        return next((w for w in self.live if w.pid == pid), None)

    def recoveries(self) -> int:
        return sum(int(n) for worker in self.every for n in LOST.findall(worker.log()))

    def stop(self, keep_logs: bool) -> None:
        for worker in self.live + self.exited:
            worker.stop()
        self.live = []
        if not keep_logs:
            shutil.rmtree(self.logs, ignore_errors=True)


@dataclass
class Kill:
    fresh: bool  # the worker had just been started
    holder: bool  # it held the dispatcher lock when it was killed
    after_ready_s: float
    received: int  # jobs it had taken when it was killed (from its log)


def jobs_taken(worker: WorkerProcess) -> int:
    """Jobs a worker has taken from the ready queue (Celery logs each at DEBUG)."""
    return len(RECEIVED.findall(worker.log()))


def holder_pid(client: redis.Redis) -> int | None:
    """The PID of the process that holds the dispatcher lock ("hostname:PID:..."), if any."""
    try:
        value = client.get(DISPATCHER_KEY)
    except redis.RedisError:
        return None
    if not value:
        return None
    text = value.decode() if isinstance(value, bytes) else str(value)
    parts = text.rsplit(":", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def wait_holder(client: redis.Redis, fleet: Fleet, timeout: float) -> WorkerProcess | None:
    """The live worker that holds the dispatcher lock, waiting for one (bounded): after the
    holder is killed, the lock names it until it expires and another worker takes it."""
    deadline = time.monotonic() + timeout
    while True:
        holder = fleet.by_pid(holder_pid(client))
        if holder is not None or time.monotonic() > deadline:
            return holder
        time.sleep(0.05)


def completed(client: redis.Redis, ids: list[str]) -> dict[str, dict[str, Any]]:
    """The jobs that have a final state now ({} while Redis does not answer)."""
    try:
        return read_results(client, ids, timeout=0)
    except redis.RedisError:
        return {}


def wait_completed(
    client: redis.Redis, ids: list[str], timeout: float, fleet: Fleet
) -> dict[str, dict[str, Any]]:
    """Wait for every job's final state (bounded), replacing workers that exited by themselves."""
    deadline = time.monotonic() + timeout
    done = completed(client, ids)
    while len(done) < len(ids) and time.monotonic() < deadline:
        time.sleep(0.5)
        fleet.replace_exited()
        done = completed(client, ids)
    return done


def whereabouts(client: redis.Redis, task_id: str) -> str:
    """Where a job's message is in Redis (Celery's queue, the fair lists, transit, unacked...)."""
    found = []
    needle = task_id.encode()
    for key in client.scan_iter("*"):
        kind = client.type(key)
        items: list[Any]
        if kind == b"list":
            items = client.lrange(key, 0, -1)
        elif kind == b"hash":
            items = list(client.hgetall(key).values())
        elif kind == b"zset":
            items = client.zrange(key, 0, -1)
        else:
            continue
        if any(needle in item for item in items):
            found.append(key.decode(errors="replace"))
    return ", ".join(found) or "nowhere"


def report_billing(
    client: redis.Redis, stats: dict[str, Any], results: dict[str, dict[str, Any]], jobs: int
) -> str:
    uuids = {
        str(meta["result"]["taskUUID"])
        for meta in results.values()
        if meta.get("status") == "SUCCESS" and isinstance(meta.get("result"), dict)
    }
    accepted: dict[str, int] = stats["accepted"]
    twice = sum(1 for count in accepted.values() if count > 1)
    orphans = len(set(accepted) - uuids)
    ledger = ledger_micro(client)
    return (
        f"duplicates billed: {twice} accepted more than once, {orphans} accepted without a "
        f"result; ledger ${ledger / 1e6:.4f} vs sandbox bill ${stats['billed_micro'] / 1e6:.4f} "
        f"(jobs x price ${jobs * PRICE_MICRO / 1e6:.4f})"
    )


def report_missing(
    client: redis.Redis, stats: dict[str, Any], ids: list[str], done: dict[str, Any]
) -> None:
    missing = [task_id for task_id in ids if task_id not in done]
    for task_id in missing[:10]:
        accepted = stats["accepted"].get(task_id, 0)  # the taskUUID is the Celery task id
        print(
            f"   never completed: {task_id} (accepted by the sandbox {accepted}x; its message "
            f"is in: {whereabouts(client, task_id)})",
            flush=True,
        )
    failures = [meta for meta in done.values() if meta.get("status") != "SUCCESS"]
    for meta in failures[:10]:
        print(f"   failed: {meta.get('task_id')}: {meta.get('result')}", flush=True)


# --- the scenarios ----------------------------------------------------------------------------
def scenario_kills(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    with RedisServer() as server, SandboxProcess("--latency", str(args.latency)) as sandbox:
        client = redis.Redis.from_url(server.url())
        fleet = Fleet(server.url(), sandbox, {"RUNWARE_RATE_LIMIT": f"{args.rate:g}"})
        complete = False
        try:
            for _ in range(3):
                fleet.start()
            started = time.monotonic()
            ids = send_backlog(server.url(), (("default", "batch") for _ in range(args.jobs)), "c")
            kills: list[Kill] = []
            last_kill = 0.0
            waited_for_first = 0
            for number in range(args.kills):
                if len(completed(client, ids)) == len(ids):
                    break
                fleet.replace_exited()
                fresh = number % 2 == 1
                victim: WorkerProcess | None
                if fresh:  # the replacement started at the end of the previous round
                    victim = fleet.live[-1]
                    moment = fleet.ready_at[victim.pid] + rng.uniform(0.0, 0.3)
                    time.sleep(max(0.0, moment - time.monotonic()))
                    if jobs_taken(victim) == 0:  # not fed yet: kill it as its first jobs come
                        waited_for_first += 1
                        deadline = time.monotonic() + 3.0
                        while jobs_taken(victim) == 0 and time.monotonic() < deadline:
                            time.sleep(0.01)
                        time.sleep(rng.uniform(0.0, 0.1))
                else:
                    time.sleep(rng.uniform(0.3, 2.0))
                    victim = wait_holder(client, fleet, 5.0) if number % 4 == 0 else None
                    victim = victim or rng.choice(fleet.live)
                was_holder = holder_pid(client) == victim.pid
                after_ready = time.monotonic() - fleet.ready_at[victim.pid]
                fleet.kill(victim)
                received = jobs_taken(victim)
                kills.append(Kill(fresh, was_holder, after_ready, received))
                last_kill = time.monotonic() - started
                wait_holder(client, fleet, 10.0)  # the new worker is fed from its first instant
                fleet.start()
            done = wait_completed(client, ids, args.jobs / args.rate * 3 + 180, fleet)
            took = time.monotonic() - started
            complete = len(done) == len(ids)
            stats = sandbox.stats()
            ok = sum(1 for meta in done.values() if meta.get("status") == "SUCCESS")
            fresh_kills = [k for k in kills if k.fresh]
            count = max(1, len(fresh_kills))
            mean_after = sum(k.after_ready_s for k in fresh_kills) / count
            mean_received = sum(k.received for k in fresh_kills) / count
            print(
                f"kills: {ok}/{len(ids)} jobs completed (SUCCESS) in {took:.1f}s at "
                f"{args.rate:g}/s; {len(kills)} SIGKILLs ({len(fresh_kills)} of a new worker, "
                f"{mean_after:.2f}s after ready and {mean_received:.1f} jobs taken on average, "
                f"{waited_for_first} of them after waiting past 0.3 s for a first job; "
                f"{sum(k.holder for k in kills)} of the dispatcher holder; last kill at "
                f"{last_kill:.1f}s), {len(fleet.every) - 3} replacements, "
                f"{len(fleet.exited)} workers exited by themselves; "
                f"{report_billing(client, stats, done, args.jobs)}; grants recovered (lost "
                f"between the ready queue and a worker): {fleet.recoveries()}",
                flush=True,
            )
            if not complete or ok < len(ids):
                report_missing(client, stats, ids, done)
            if not complete or ok < len(ids) or fleet.exited:
                print(f"   worker logs kept in {fleet.logs}", flush=True)
        finally:
            fleet.stop(keep_logs=not complete or bool(fleet.exited))
            client.close()


def scenario_redis_restart(args: argparse.Namespace) -> None:
    jobs = args.restart_jobs
    with SandboxProcess("--latency", str(args.latency)) as sandbox:
        server = RedisServer(appendonly=True).start()
        client = redis.Redis.from_url(server.url())
        fleet = Fleet(server.url(), sandbox, {"RUNWARE_RATE_LIMIT": f"{args.rate:g}"})
        complete = False
        try:
            for _ in range(3):
                fleet.start()
            started = time.monotonic()
            ids = send_backlog(server.url(), (("default", "batch") for _ in range(jobs)), "r")
            deadline = time.monotonic() + 60
            while len(sandbox.stats()["accepted"]) < jobs // 4 and time.monotonic() < deadline:
                time.sleep(0.1)
            accepted_at_stop = len(sandbox.stats()["accepted"])
            server.stop()  # SIGTERM: Redis writes its append-only file and exits
            time.sleep(1.0)
            server.start()  # the same port and directory: it loads the append-only file
            done = wait_completed(client, ids, jobs / args.rate * 3 + 180, fleet)
            took = time.monotonic() - started
            complete = len(done) == len(ids)
            stats = sandbox.stats()
            ok = sum(1 for meta in done.values() if meta.get("status") == "SUCCESS")
            print(
                f"redis restart: {ok}/{jobs} jobs completed (SUCCESS) in {took:.1f}s at "
                f"{args.rate:g}/s (Redis stopped after {accepted_at_stop} accepted, down 1 s); "
                f"workers that exited by themselves: {len(fleet.exited)} (of "
                f"{len(fleet.every)} started; each replaced, as a process manager would); "
                f"{report_billing(client, stats, done, jobs)}; grants recovered: "
                f"{fleet.recoveries()}",
                flush=True,
            )
            if not complete or ok < jobs:
                report_missing(client, stats, ids, done)
            if not complete or ok < jobs or fleet.exited:
                print(f"   worker logs kept in {fleet.logs}", flush=True)
        finally:
            fleet.stop(keep_logs=not complete or bool(fleet.exited))
            client.close()
            server.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--kills", type=int, default=16)
    parser.add_argument("--rate", type=float, default=10.0, help="RUNWARE_RATE_LIMIT (calls/s)")
    parser.add_argument("--latency", type=float, default=0.2, help="sandbox latency (s)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the kill instants")
    parser.add_argument(
        "--redis-restart", action="store_true", help="also run the Redis restart scenario"
    )
    parser.add_argument("--restart-jobs", type=int, default=200)
    parser.add_argument("--skip-kills", action="store_true", help="skip the kill scenario")
    args = parser.parse_args()
    if not args.skip_kills:
        scenario_kills(args)
    if args.redis_restart:
        scenario_redis_restart(args)


if __name__ == "__main__":
    main()
