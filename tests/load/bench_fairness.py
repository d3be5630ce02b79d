"""Fair share and priority with the fair intake (tasks/dispatcher.py): a backlog of any size in
the Celery queue, a small fleet, a binding global limit. Prints one line of figures per scenario;
asserts nothing.

  python -m tests.load fairness [--scenarios a,b,c] [--backlogs 1000,6000,30000] [--rate 80]
                                [--concurrency 10] [--latency 0.03] [--plot FILE.png]
                                [--no-drain] [--slow-ms 10]

Every scenario runs on its own Redis with three workers (WORKER_CONCURRENCY=--concurrency), the
sandbox at --latency seconds, and plain Celery producers (`send_task` by name).

a. RUNWARE_RATE_LIMIT=--rate. Account A enqueues N batch jobs (one run per N of --backlogs), then
   at once one interactive job of account C and 20 batch jobs of account B: C's time from send
   to result, B's from the first send to the last result (both from the result backend), that
   all of A's N finished, the API's mean rate over the run and its deviation from the limit, the
   most calls in any 1 s window, whether any taskUUID was billed twice, and every Redis command
   over --slow-ms (Redis's SLOWLOG). With --no-drain it stops once B and C are done: a backlog
   of 100,000 at 80/s takes 21 minutes to drain, and B's and C's times are what it measures.
b. RUNWARE_RATE_LIMIT=20. A's 600 batch jobs, 2 s later B's 20 batch jobs: B's time.
c. Weights A=3, B=1 (set with `enhance-worker limits set`), 400 batch jobs each at --rate: the A:B
   ratio of the calls the API saw while both accounts had jobs waiting.

`--plot FILE.png` draws, for each scenario run, the tasks per second Runware accepted over time
per account with the limit (FILE-a1000.png, FILE-b.png ... when several run).

Rates are counted per task accepted by the sandbox (its `accepted_log`): the limits count tasks,
and a busy worker may send several tasks in one HTTP request (docs/operating.md, "Several tasks
per Runware request"), so the sandbox's `call_times` (one per request) would undercount.

A's backlog is sent through one broker connection by a producer without a result backend (a
producer with Celery's Redis backend subscribes to every task's result channel as it sends);
its results are then read from the result backend in bulk (MGET), not one `.get()` at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import redis
from celery import Celery
from celery.backends.base import decompress_payload  # type: ignore[attr-defined]
from celery.result import AsyncResult

from tests.load.common import (
    accepted_by_prefix,
    describe,
    fleet,
    max_in_window,
    private_redis,
    slowlog,
    task_times,
)
from tests.load.plot import numbered, plot_rates
from tests.producer import backend_app
from workers.sandbox.services import SandboxProcess

TASK = "tasks.enhance_prompt"
PRICE_MICRO = 1300  # the sandbox's price of one promptEnhance version


# --- sending ----------------------------------------------------------------------------------
def send_backlog(redis_url: str, jobs: Iterable[tuple[str, str]], label: str) -> list[str]:
    """Send (account, priority) jobs through one connection; their task ids, in order."""
    sender = backend_app(broker=redis_url)  # no result backend: no subscription per task
    ids: list[str] = []
    try:
        with sender.producer_or_acquire() as producer:
            for n, (account, priority) in enumerate(jobs):
                prompt = f"{account} {label} {n}"
                kwargs = {"prompt": prompt, "account": account, "priority": priority}
                ids.append(sender.send_task(TASK, kwargs=kwargs, producer=producer).id)
    finally:
        sender.close()
    return ids


def send_one(
    producer: Celery, account: str, priority: str, n: int
) -> tuple[AsyncResult[Any], float]:
    """One job through the producer that has the result backend; and when it was sent."""
    sent = time.time()
    result = producer.send_task(
        TASK, kwargs={"prompt": f"{account} job {n}", "account": account, "priority": priority}
    )
    return result, sent


# --- reading ----------------------------------------------------------------------------------
def done_at(result: AsyncResult[Any], timeout: float) -> float:
    """Wait for `result` (from the result backend) and return when it was stored (epoch s)."""
    result.get(timeout=timeout)
    done: Any = result.date_done
    if isinstance(done, str):
        done = datetime.fromisoformat(done)
    if done is None:
        return time.time()
    if done.tzinfo is None:
        done = done.replace(tzinfo=UTC)
    return float(done.timestamp())


def uuid_of(result: AsyncResult[Any]) -> str:
    """The taskUUID of a finished job's result."""
    value: Any = result.result
    return str(value["taskUUID"])


def ledger_tasks(client: redis.Redis) -> int:
    """Tasks the ledger recorded (each taskUUID once): a cheap progress counter."""
    return sum(
        int(client.hget(key, "tasks") or 0) for key in client.scan_iter("enhance:ledger:day:*")
    )


def wait_ledger(client: redis.Redis, count: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    seen = ledger_tasks(client)
    while seen < count and time.monotonic() < deadline:
        time.sleep(1.0)
        seen = ledger_tasks(client)
    return seen


def read_results(
    client: redis.Redis, ids: list[str], timeout: float = 30.0
) -> dict[str, dict[str, Any]]:
    """The stored results of `ids` (MGET in chunks), waiting up to `timeout` for missing ones."""
    found: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while True:
        missing = [task_id for task_id in ids if task_id not in found]
        for start in range(0, len(missing), 1000):
            chunk = missing[start : start + 1000]
            values = client.mget([f"celery-task-meta-{task_id}" for task_id in chunk])
            for task_id, raw in zip(chunk, values, strict=True):
                if raw is not None:  # (a SUCCESS is stored compressed: config/backend.py)
                    meta = json.loads(decompress_payload(raw))
                    if meta.get("status") in ("SUCCESS", "FAILURE"):
                        found[task_id] = meta
        if len(found) == len(ids) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def uuids_of(results: Iterable[dict[str, Any]]) -> list[str]:
    return [
        str(meta["result"]["taskUUID"])
        for meta in results
        if meta.get("status") == "SUCCESS" and isinstance(meta.get("result"), dict)
    ]


def billing(stats: dict[str, Any], result_uuids: list[str], jobs: int) -> str:
    """Whether every job was billed exactly once: accepted taskUUIDs equal the results'."""
    accepted: dict[str, int] = stats["accepted"]
    twice = sum(1 for count in accepted.values() if count > 1)
    unknown = len(set(accepted) - set(result_uuids))
    unbilled = len(set(result_uuids) - set(accepted))
    ok = (
        twice == 0
        and unknown == 0
        and unbilled == 0
        and len(accepted) == len(set(result_uuids)) == jobs
        and stats["billed_micro"] == jobs * PRICE_MICRO
    )
    verdict = "none" if ok else "YES"
    return (
        f"billed twice: {verdict} (accepted {len(accepted)} taskUUIDs for {jobs} jobs, "
        f"{twice} accepted more than once, {unknown} without a result, {unbilled} results never "
        f"billed, bill ${stats['billed_micro'] / 1e6:.4f})"
    )


def rate_figures(times: list[float], limit: float) -> str:
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    mean = (len(times) - 1) / span if span else float("nan")
    deviation = (mean - limit) / limit * 100
    return (
        f"API {len(times)} tasks over {span:.1f}s: mean {mean:.2f}/s ({deviation:+.2f}% vs "
        f"{limit:g}/s), busiest 1 s window {max_in_window(times)}"
    )


def plot(
    args: argparse.Namespace, tag: str, title: str, stats: dict[str, Any], rate: float
) -> None:
    """The scenario's accepted tasks per second and account, if --plot asks for it."""
    if not args.plot:
        return
    target = numbered(args.plot, tag, args.plots > 1)
    series = {f"account {a}": t for a, t in accepted_by_prefix(stats, ("A", "B", "C")).items()}
    limit = {f"RUNWARE_RATE_LIMIT={rate:g}/s (fleet)": rate}
    print(f"plot: {plot_rates(target, title, series, limit)}", flush=True)


def workers_env(args: argparse.Namespace, rate: float) -> dict[str, str]:
    return {"WORKER_CONCURRENCY": str(args.concurrency), "RUNWARE_RATE_LIMIT": f"{rate:g}"}


# --- the scenarios ----------------------------------------------------------------------------
def scenario_a(args: argparse.Namespace, backlog: int) -> None:
    """A's backlog, then one interactive job of C and 20 batch jobs of B."""
    rate = args.rate
    with private_redis() as server, SandboxProcess("--latency", str(args.latency)) as sandbox:
        url = server.url()
        client = redis.Redis.from_url(url)
        with fleet(url, sandbox, 3, **workers_env(args, rate)) as producer:
            with producer.producer_or_acquire() as warm:  # B's and C's sends find it open
                warm.connection.ensure_connection(max_retries=3)
            client.config_set("slowlog-log-slower-than", int(args.slow_ms * 1000))
            client.config_set("slowlog-max-len", 100_000)
            client.slowlog_reset()
            enqueue_started = time.monotonic()
            a_ids = send_backlog(url, (("A", "batch") for _ in range(backlog)), "backlog")
            enqueue_s = time.monotonic() - enqueue_started
            c_result, c_sent = send_one(producer, "C", "interactive", 0)
            b_sent_results = [send_one(producer, "B", "batch", n) for n in range(20)]
            budget = backlog / rate * 2 + 120
            c_took = done_at(c_result, timeout=budget) - c_sent
            b_last = max(done_at(r, timeout=budget) for r, _ in b_sent_results)
            b_took = b_last - b_sent_results[0][1]
            bc_uuids = [uuid_of(r) for r in [c_result] + [r for r, _ in b_sent_results]]
            if args.drain:
                wait_ledger(client, backlog + 21, timeout=budget)
                a_results = read_results(client, a_ids)
            else:
                a_results = {}
            slow = describe(slowlog(client), args.slow_ms)
        stats = sandbox.stats()
        client.close()
    a_ok = sum(1 for meta in a_results.values() if meta.get("status") == "SUCCESS")
    a_accepted = len(task_times(stats, "A "))
    title = (
        f"A: {backlog} batch jobs, then C: 1 interactive and B: 20 batch "
        f"(3 workers x {args.concurrency} threads)"
    )
    plot(args, f"a{backlog}", title, stats, rate)
    uuids = uuids_of(a_results.values()) + bc_uuids
    head = (
        f"a. rate {rate:g}/s, A {backlog} batch, then C 1 interactive + B 20 batch: "
        f"enqueue of A {enqueue_s:.1f}s ({backlog / enqueue_s:.0f}/s); C {c_took * 1000:.0f} ms; "
        f"B's 20 {b_took:.2f}s; "
    )
    if args.drain:
        tail = (
            f"A {a_ok}/{backlog} SUCCESS (sandbox accepted {a_accepted}); "
            f"{rate_figures(task_times(stats), rate)} ({stats['requests']} HTTP requests); "
            f"{billing(stats, uuids, backlog + 21)}"
        )
    else:
        tail = f"A not drained (--no-drain: {a_accepted} of A's jobs called by then)"
    print(f"{head}{tail}; SLOWLOG over the run:", flush=True)
    print("\n".join(slow), flush=True)


def scenario_b(args: argparse.Namespace, backlog: int = 600) -> None:
    """RUNWARE_RATE_LIMIT=20: A's backlog, 2 s later B's 20 batch jobs."""
    rate = 20.0
    with private_redis() as server, SandboxProcess("--latency", str(args.latency)) as sandbox:
        url = server.url()
        client = redis.Redis.from_url(url)
        with fleet(url, sandbox, 3, **workers_env(args, rate)) as producer:
            a_ids = send_backlog(url, (("A", "batch") for _ in range(backlog)), "backlog")
            time.sleep(2.0)
            b_sent_results = [send_one(producer, "B", "batch", n) for n in range(20)]
            budget = backlog / rate * 2 + 120
            b_last = max(done_at(r, timeout=budget) for r, _ in b_sent_results)
            b_took = b_last - b_sent_results[0][1]
            wait_ledger(client, backlog + 20, timeout=budget)
            a_results = read_results(client, a_ids)
        stats = sandbox.stats()
        client.close()
    b_times = task_times(stats, "B ")
    a_between = sum(1 for t in task_times(stats, "A ") if b_times[0] <= t <= b_times[-1])
    a_ok = sum(1 for meta in a_results.values() if meta.get("status") == "SUCCESS")
    uuids = uuids_of(a_results.values()) + [uuid_of(r) for r, _ in b_sent_results]
    plot(args, "b", f"A: {backlog} batch jobs, B: 20 batch jobs 2 s later", stats, rate)
    print(
        f"b. rate {rate:g}/s, A {backlog} batch, B 20 batch 2 s later: B's 20 {b_took:.2f}s "
        f"(A calls between B's first and last: {a_between}); A {a_ok}/{backlog} SUCCESS; "
        f"{rate_figures(task_times(stats), rate)}; {billing(stats, uuids, backlog + 20)}",
        flush=True,
    )


def scenario_c(args: argparse.Namespace, backlog: int) -> None:
    """Weights A=3, B=1, both backlogged: the ratio of their calls at the API."""
    rate = args.rate
    with private_redis() as server, SandboxProcess("--latency", str(args.latency)) as sandbox:
        url = server.url()
        client = redis.Redis.from_url(url)
        env = {**os.environ, "REDIS_URL": url}
        for account, weight in (("A", "3"), ("B", "1")):
            subprocess.run(
                [sys.executable, "-m", "workers.cli", "limits", "set", account, "--weight", weight],
                env=env,
                check=True,
                timeout=60,
                stdout=subprocess.DEVNULL,
            )
        with fleet(url, sandbox, 3, **workers_env(args, rate)):
            # Interleaved, so that both accounts have jobs waiting from the first grant on.
            jobs = ((account, "batch") for _ in range(backlog) for account in ("A", "B"))
            ids = send_backlog(url, jobs, "weighted")
            wait_ledger(client, 2 * backlog, timeout=2 * backlog / rate * 2 + 120)
            results = read_results(client, ids)
        stats = sandbox.stats()
        client.close()
    a_times, b_times = task_times(stats, "A "), task_times(stats, "B ")
    start, end = max(a_times[0], b_times[0]), min(a_times[-1], b_times[-1])
    a = sum(1 for t in a_times if start <= t <= end)
    b = sum(1 for t in b_times if start <= t <= end)
    ok = sum(1 for meta in results.values() if meta.get("status") == "SUCCESS")
    plot(args, "c", f"Weights A=3, B=1: {backlog} batch jobs each", stats, rate)
    print(
        f"c. weights A=3 B=1, {backlog} + {backlog} batch at {rate:g}/s: while both were "
        f"backlogged ({end - start:.1f}s) A {a} calls, B {b} calls, A:B = {a / max(b, 1):.2f}; "
        f"{ok}/{2 * backlog} SUCCESS; {billing(stats, uuids_of(results.values()), 2 * backlog)}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenarios", default="a,b,c", help="any of a,b,c (default a,b,c)")
    parser.add_argument("--backlogs", default="1000,6000,30000", help="A's backlogs in a")
    parser.add_argument("--rate", type=float, default=80.0, help="RUNWARE_RATE_LIMIT of a and c")
    parser.add_argument("--concurrency", type=int, default=10, help="WORKER_CONCURRENCY")
    parser.add_argument("--latency", type=float, default=0.03, help="sandbox latency (s)")
    parser.add_argument("--b-backlog", type=int, default=600, help="A's backlog in b")
    parser.add_argument("--c-backlog", type=int, default=400, help="jobs of each account in c")
    parser.add_argument("--plot", metavar="FILE.png", help="write each run's rates as a PNG")
    parser.add_argument(
        "--no-drain",
        dest="drain",
        action="store_false",
        help="in a, stop once B and C are done instead of waiting for all of A's backlog",
    )
    parser.add_argument(
        "--slow-ms", type=float, default=10.0, help="in a, SLOWLOG entries over this (ms)"
    )
    args = parser.parse_args()
    chosen = {name.strip() for name in args.scenarios.split(",") if name.strip()}
    unknown = chosen - {"a", "b", "c"}
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))} (known: a, b, c)")
    backlogs = [n for n in args.backlogs.split(",") if n.strip()] if "a" in chosen else []
    args.plots = len(backlogs) + len(chosen - {"a"})
    if "a" in chosen:
        for backlog in (int(n) for n in args.backlogs.split(",") if n.strip()):
            scenario_a(args, backlog)
    if "b" in chosen:
        scenario_b(args, args.b_backlog)
    if "c" in chosen:
        scenario_c(args, args.c_backlog)


if __name__ == "__main__":
    main()
