"""Throughput of the project's worker against a minimal Celery worker, in the same run.
Prints figures; asserts nothing.

  python -m tests.load.bench_throughput [--jobs 3000] [--processes 1,2] [--soak 0]

Starts its own Redis and the sandbox (250 ms latency), then measures the baseline (one process)
and the project's worker, as one process and as one process per core (docs/operating.md's production
layout): a low-load phase of sequential jobs, then N jobs pushed as fast as the producer can.
Reports jobs/s, end-to-end latency p50/p99, the low-load latency that is not the API's, worker
CPU seconds per 1000 jobs, peak RSS, tasks per Runware request, and each ratio project/baseline.
With --soak N it then runs N more jobs through the first project worker and prints its RSS as it
goes (leak check). With --tracing on|both the project's workers export spans over OTLP/HTTP to a
receiver in this process (tests/otlp.py), which counts them; `both` measures each process count
with tracing off, then on, and prints the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

from celery import Celery

from tests.load.common import KEY, done_at, percentile, private_redis
from tests.otlp import HttpReceiver
from tests.producer import backend_app
from workers.sandbox.services import SandboxProcess, WorkerProcess


@dataclass
class Proc:
    pid: int

    def cpu_seconds(self) -> float:
        """User + system CPU of the process and its reaped children."""
        with open(f"/proc/{self.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
        return ticks / os.sysconf("SC_CLK_TCK")

    def rss_mb(self, peak: bool = False) -> float:
        key = "VmHWM:" if peak else "VmRSS:"
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
        return float("nan")


def push(producer: Celery, task: str, count: int, make: Any) -> tuple[float, list[float]]:
    """Send `count` jobs at once; wall time until all are done, and each job's latency."""
    sent: dict[str, float] = {}
    started = time.time()
    for n in range(count):
        result = producer.send_task(task, **make(n))
        sent[result.id] = time.time()
    latencies = []
    for task_id, meta in producer.backend.get_many(list(sent), interval=0.02):
        assert meta["status"] == "SUCCESS", meta
        latencies.append(done_at(meta) - sent[task_id])
    last = max(s + lat for s, lat in zip(sent.values(), latencies, strict=False))
    return last - started, latencies


def sequential(producer: Celery, task: str, count: int, make: Any) -> list[float]:
    latencies = []
    for n in range(count):
        sent = time.time()
        producer.send_task(task, **make(n)).get(timeout=30)
        latencies.append(time.time() - sent)
    return latencies


def measure(
    workers: list[WorkerProcess],
    url: str,
    task: str,
    make: Any,
    jobs: int,
    sandbox: SandboxProcess,
    latency: float,
) -> dict[str, float]:
    producer = backend_app(broker=url, backend=url)
    procs = [Proc(worker.pid) for worker in workers]
    sequential(producer, task, 20, make)  # warm up: connections, imports
    low = sequential(producer, task, 100, make)
    cpu_before = sum(proc.cpu_seconds() for proc in procs)
    api_before = sandbox.stats()
    wall, latencies = push(producer, task, jobs, make)
    cpu = sum(proc.cpu_seconds() for proc in procs) - cpu_before
    api = sandbox.stats()
    producer.close()
    requests = api["requests"] - api_before["requests"]
    return {
        "jobs_per_s": jobs / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "low_load_added_p50_ms": 1000 * (statistics.median(low) - latency),
        "low_load_added_p99_ms": 1000 * (percentile(low, 0.99) - latency),
        "cpu_s_per_1000": 1000 * cpu / jobs,
        "peak_rss_mb": max(proc.rss_mb(peak=True) for proc in procs),
        "tasks_per_request": (api["tasks_received"] - api_before["tasks_received"]) / requests,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--latency", type=float, default=0.25)
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="project worker concurrency (default: its WORKER_CONCURRENCY)",
    )
    parser.add_argument("--soak", type=int, default=0, help="jobs for the leak check")
    parser.add_argument("--cap", action="store_true", help="also set RUNWARE_MAX_IN_FLIGHT")
    parser.add_argument("--rate", default="", help="RUNWARE_RATE_LIMIT (default: none)")
    parser.add_argument(
        "--processes",
        default=f"1,{os.cpu_count() or 1}",
        help="project worker process counts to measure, comma-separated (default: 1 and one "
        "per core, as docs/operating.md documents for production)",
    )
    parser.add_argument("--batch-max", default=None, help="RUNWARE_BATCH_MAX for the project")
    parser.add_argument("--only", choices=["baseline", "project"], default=None)
    parser.add_argument(
        "--tracing",
        choices=["off", "on", "both"],
        default="off",
        help="the project's workers with OpenTelemetry tracing off, on, or both in turn",
    )
    args = parser.parse_args()
    counts = sorted({int(n) for n in args.processes.split(",")})
    baseline: dict[str, float] | None = None
    with private_redis() as server, SandboxProcess("--latency", str(args.latency)) as sandbox:
        if args.only in (None, "baseline"):
            env = {"BASELINE_REDIS_URL": server.url(1), "BASELINE_API_URL": sandbox.url}
            with WorkerProcess(
                env,
                name="baseline",
                app="tests.load.baseline_app",
                extra_args=["-P", "threads", "-c", "200", "-l", "INFO"],
            ) as w:
                baseline = measure(
                    [w],
                    server.url(1),
                    "baseline.enhance",
                    lambda n: {"args": [f"baseline prompt {n}"]},
                    args.jobs,
                    sandbox,
                    args.latency,
                )
            print_row("baseline (1 process, threads, 200, bare requests.post)", baseline)
        if args.only in (None, "project"):
            modes = {"off": [False], "on": [True], "both": [False, True]}[args.tracing]
            db = 2
            for processes in counts:
                by_mode: dict[bool, dict[str, float]] = {}
                for traced in modes:
                    project = by_mode[traced] = run_project(
                        server.url(db), sandbox, processes, args, traced
                    )
                    db += 1
                    if baseline is not None:
                        ratio = project["jobs_per_s"] / baseline["jobs_per_s"]
                        print(
                            f"  ratio project ({processes} process(es), tracing "
                            f"{'on' if traced else 'off'}) / baseline: {ratio:.2f}"
                        )
                if len(by_mode) == 2:
                    on, off = by_mode[True], by_mode[False]
                    print(
                        f"  tracing on / off ({processes} process(es)): jobs/s "
                        f"{on['jobs_per_s'] / off['jobs_per_s']:.2f}, CPU per job "
                        f"{on['cpu_s_per_1000'] / off['cpu_s_per_1000']:.2f}, p50 "
                        f"{on['p50_ms'] - off['p50_ms']:+.1f} ms"
                    )


def run_project(
    url: str, sandbox: SandboxProcess, processes: int, args: argparse.Namespace, traced: bool
) -> dict[str, float]:
    env = {
        "REDIS_URL": url,
        "RUNWARE_API_URL": sandbox.url,
        "RUNWARE_API_KEY": KEY,
        "LOG_LEVEL": "INFO",  # the production default
        # No limit set (the fair intake and the free-thread count still decide every grant);
        # the ledger and validation are on.
        "RUNWARE_RATE_LIMIT": args.rate,
    }
    if args.cap:  # the in-flight cap too: one more Redis round trip per call
        env["RUNWARE_MAX_IN_FLIGHT"] = "100000"
    if args.concurrency:
        env["WORKER_CONCURRENCY"] = str(args.concurrency)
    if args.batch_max:
        env["RUNWARE_BATCH_MAX"] = str(args.batch_max)
    receiver = HttpReceiver() if traced else None
    if receiver is not None:
        receiver.start()
        env.update(receiver.env())
    workers = [WorkerProcess(env, name=f"project{n}").start() for n in range(processes)]
    try:
        figures = measure(
            workers,
            url,
            "tasks.enhance_prompt",
            lambda n: {"kwargs": {"prompt": f"project prompt {n}"}},
            args.jobs,
            sandbox,
            args.latency,
        )
        if receiver is not None:
            time.sleep(1.0)  # the last batch of spans
            figures["spans_per_job"] = len(receiver.received.spans) / (args.jobs + 120)
        title = f"project ({processes} worker process(es), tracing {'on' if traced else 'off'})"
        print_row(title, figures)
        if args.soak:
            soak(workers[0], url, args.soak)
        return figures
    finally:
        for worker in workers:
            worker.stop()
        if receiver is not None:
            receiver.stop()


def soak(worker: WorkerProcess, url: str, jobs: int) -> None:
    producer = backend_app(broker=url, backend=url)
    proc = Proc(worker.pid)
    chunk = max(1, jobs // 10)
    for start in range(0, jobs, chunk):
        push(
            producer,
            "tasks.enhance_prompt",
            min(chunk, jobs - start),
            lambda n, first=start: {"kwargs": {"prompt": f"soak {first + n}"}},
        )
        print(f"soak: {start + chunk} jobs, worker RSS {proc.rss_mb():.1f} MB", flush=True)
    producer.close()


def print_row(title: str, figures: dict[str, float]) -> None:
    shown = ", ".join(f"{k}={v:.2f}" for k, v in figures.items())
    print(f"{title}: {shown}", flush=True)


if __name__ == "__main__":
    main()
