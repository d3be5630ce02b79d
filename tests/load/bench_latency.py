"""Latency of interactive requests as a backend sees them. Prints figures; asserts nothing.

  ./run bench latency [--scenario patterns|async|pending|all] [--jobs 200] [--latency 0]

patterns: the project's worker (one process, its defaults: RUNWARE_BATCH_WINDOW_MS=20) against a
  minimal Celery worker (tests/load/baseline_app.py), in the same run, with the sandbox at
  --latency (0 by default: what is measured is the plumbing). Four arrival patterns: one
  request at a time, Poisson arrivals at 5/s and 50/s, bursts of 20. Each job's latency runs
  from just before its send to the moment this client process sees its result (the same
  waiting helper, `wait_async`, for both workers); added = project - baseline, per pattern.
  Also each system's CPU a job (its worker processes', and Redis's, idle time included): at
  --latency 0 a burst waits for the CPU, so its latency follows what a job costs.
async: 300 concurrent `await tasks.enhance_async(...)` from one event loop against two workers
  of 100 threads (sandbox at 200 ms): how long the loop was ever blocked (a 5 ms ticker), the
  process's threads, and serial `enhance_async` against blocking `.get()` (sandbox at 0 ms).
pending: 5,000 results pending in this process (jobs with an hour's countdown, each waited on),
  then probe jobs one at a time: from the moment a probe's result is stored (its date_done,
  same host clock) to the moment it is seen, with `wait_async`, with `wait` (threads), with
  the project app's `.get()`, and with a plain Celery app's `.get()` that sent the same 5,000.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import random
import statistics
import time
from collections.abc import Callable, Coroutine
from typing import Any

from celery import Celery

from tests.load.bench_throughput import Proc
from tests.load.common import KEY, done_at, percentile, private_redis
from tests.producer import backend_app
from workers.sandbox.services import SandboxProcess, WorkerProcess


def ms(values: list[float]) -> str:
    p50, p99 = 1000 * statistics.median(values), 1000 * percentile(values, 0.99)
    return f"p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  (n={len(values)})"


def producer_for(url: str) -> Celery:
    """A client app whose sends do not subscribe Celery's result consumer (the project's
    result store), so that only the waiting helper is measured."""
    app = backend_app(broker=url, backend=f"config.backend:ResultStore+{url}")
    app.conf.task_routes = {"tasks.*": {"queue": "enhance"}, "baseline.*": {"queue": "celery"}}
    return app


# --- patterns --------------------------------------------------------------------------------
async def _one(app: Celery, task: str, make: Callable[[int], dict[str, Any]], n: int) -> float:
    from enhance_client.waiting import wait_async

    began = time.perf_counter()
    sent = app.send_task(task, **make(n))
    await wait_async(sent, timeout=60)
    return time.perf_counter() - began


async def serial(app: Celery, task: str, make: Any, jobs: int) -> list[float]:
    return [await _one(app, task, make, n) for n in range(jobs)]


async def poisson(app: Celery, task: str, make: Any, jobs: int, rate: float) -> list[float]:
    rng = random.Random(7)
    pending = []
    for n in range(jobs):
        pending.append(asyncio.ensure_future(_one(app, task, make, n)))
        await asyncio.sleep(rng.expovariate(rate))
    return list(await asyncio.gather(*pending))


async def bursts(app: Celery, task: str, make: Any, jobs: int, size: int = 20) -> list[float]:
    found: list[float] = []
    for start in range(0, jobs, size):
        found += await asyncio.gather(*(_one(app, task, make, start + n) for n in range(size)))
        await asyncio.sleep(0.3)
    return found


def patterns_of(
    app: Celery, task: str, make: Any, jobs: int
) -> dict[str, Callable[[], Coroutine[Any, Any, list[float]]]]:
    return {
        "one at a time": lambda: serial(app, task, make, jobs),
        "Poisson 5/s": lambda: poisson(app, task, make, max(10, jobs // 4), 5.0),
        "Poisson 50/s": lambda: poisson(app, task, make, jobs, 50.0),
        "bursts of 20": lambda: bursts(app, task, make, jobs),
    }


def _cpu(workers: list[Proc], redis_proc: Proc | None) -> tuple[float, float]:
    return (
        sum(p.cpu_seconds() for p in workers),
        redis_proc.cpu_seconds() if redis_proc else 0.0,
    )


def run_patterns(args: argparse.Namespace) -> None:
    print(
        f"== patterns: sandbox at {args.latency * 1000:g} ms, {args.jobs} jobs a pattern, "
        f"{args.processes} project worker process(es) against one baseline process"
    )
    with private_redis() as server, SandboxProcess("--latency", str(args.latency)) as sandbox:
        url = server.url(1)
        env_base = {"BASELINE_REDIS_URL": url, "BASELINE_API_URL": sandbox.url}
        project_env = {
            "REDIS_URL": url,
            "RUNWARE_API_URL": sandbox.url,
            "RUNWARE_API_KEY": KEY,
            "LOG_LEVEL": "INFO",
            **({"RUNWARE_BATCH_WINDOW_MS": args.window} if args.window else {}),
        }
        baseline = WorkerProcess(
            env_base,
            name="baseline",
            app="tests.load.baseline_app",
            extra_args=["-P", "threads", "-c", "200", "-l", "INFO", "-Q", "celery"],
        )
        projects = [WorkerProcess(project_env, name=f"project{n}") for n in range(args.processes)]
        app = producer_for(url)
        figures: dict[str, dict[str, list[float]]] = {}
        cpu: dict[str, dict[str, list[float]]] = {}
        with baseline, contextlib.ExitStack() as stack:
            for worker in projects:
                stack.enter_context(worker)
            systems = {
                "baseline": ("baseline.enhance", lambda n: {"args": [f"base {n}"]}),
                "project": ("tasks.enhance_prompt", lambda n: {"kwargs": {"prompt": f"p {n}"}}),
            }
            # What each system's jobs cost in CPU: its worker processes', and Redis's.
            procs = {
                "baseline": [Proc(baseline.pid)],
                "project": [Proc(worker.pid) for worker in projects],
            }
            redis_proc = Proc(server.process.pid) if server.process else None
            for task, make in systems.values():
                asyncio.run(serial(app, task, make, 20))  # warm up: connections, imports
            # This client's own garbage collections would stall either system's figures alike.
            gc.collect()
            gc.freeze()
            # Each pattern in four rounds, the systems taking turns, so that a drift of the
            # machine's speed during the run weighs on both alike.
            rounds = 4
            for pattern in patterns_of(app, "", None, args.jobs):
                for _ in range(rounds):
                    for name, (task, make) in systems.items():
                        run = patterns_of(app, task, make, max(20, args.jobs // rounds))[pattern]
                        figures.setdefault(pattern, {}).setdefault(name, [])
                        before = _cpu(procs[name], redis_proc)
                        figures[pattern][name] += asyncio.run(run())
                        spent = cpu.setdefault(pattern, {}).setdefault(name, [0.0, 0.0])
                        after = _cpu(procs[name], redis_proc)
                        spent[0] += after[0] - before[0]
                        spent[1] += after[1] - before[1]
        app.close()
    for pattern, by in figures.items():
        base, proj = by["baseline"], by["project"]
        added50 = 1000 * (statistics.median(proj) - statistics.median(base))
        added99 = 1000 * (percentile(proj, 0.99) - percentile(base, 0.99))
        print(f"{pattern}:")
        print(f"  baseline {ms(base)}")
        print(f"  project  {ms(proj)}")
        print(f"  added    p50 {added50:+6.2f} ms  p99 {added99:+6.2f} ms")
        for name in ("baseline", "project"):  # idle time's CPU included
            worker_s, redis_s = cpu[pattern][name]
            jobs = len(by[name])
            print(
                f"  CPU a job, {name:8}: worker {1000 * worker_s / jobs:.2f} ms, "
                f"Redis {1000 * redis_s / jobs:.2f} ms"
            )


# --- async -----------------------------------------------------------------------------------
def _threads() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def run_async(args: argparse.Namespace) -> None:
    print("== async: 300 concurrent enhance_async, two workers of 100 threads, sandbox at 200 ms")
    with private_redis() as server, SandboxProcess("--latency", "0.2") as sandbox:
        url = server.url(3)
        os.environ["REDIS_URL"] = url  # this process's `tasks` helpers (imported below)
        env = {
            "REDIS_URL": url,
            "RUNWARE_API_URL": sandbox.url,
            "RUNWARE_API_KEY": KEY,
            "LOG_LEVEL": "INFO",
            "WORKER_CONCURRENCY": "100",
        }
        workers = [WorkerProcess(env, name=f"async{n}") for n in range(2)]
        for worker in workers:
            worker.start()
        try:
            from tasks import enhance, enhance_async

            async def concurrent() -> tuple[list[float], float, int, float]:
                lags: list[float] = []
                stop = asyncio.Event()
                peak = [_threads()]

                async def ticker() -> None:
                    while not stop.is_set():
                        began = time.perf_counter()
                        await asyncio.sleep(0.005)
                        lags.append(time.perf_counter() - began - 0.005)
                        peak[0] = max(peak[0], _threads())

                async def one(n: int) -> float:
                    began = time.perf_counter()
                    await enhance_async(f"concurrent {n}", timeout=120)
                    return time.perf_counter() - began

                tick = asyncio.ensure_future(ticker())
                began = time.perf_counter()
                results = await asyncio.gather(*(one(n) for n in range(args.concurrent)))
                wall = time.perf_counter() - began
                stop.set()
                await tick
                return list(results), max(lags), peak[0], wall

            asyncio.run(enhance_async("warm up", timeout=60))
            latencies, lag, threads, wall = asyncio.run(concurrent())
            done = f"{len(latencies)} of {args.concurrent} done in {wall:.2f} s"
            print(f"  {done}; each {ms(latencies)}")
            print(f"  the loop was blocked at most {1000 * lag:.1f} ms; threads in this process "
                  f"(peak, all kinds): {threads}")  # fmt: skip
            sandbox.configure(latency_s=0.0)

            async def serial_async(count: int) -> list[float]:
                found = []
                for n in range(count):
                    began = time.perf_counter()
                    await enhance_async(f"serial async {n}", timeout=60)
                    found.append(time.perf_counter() - began)
                return found

            blocking = []
            for n in range(args.jobs):
                began = time.perf_counter()
                enhance(f"serial get {n}").get(timeout=60)
                blocking.append(time.perf_counter() - began)
            awaited = asyncio.run(serial_async(args.jobs))
            print(f"  serial, sandbox at 0 ms: .get() {ms(blocking)}")
            print(f"  serial, sandbox at 0 ms: await  {ms(awaited)}")
            print(
                "  await - .get(): p50 "
                f"{1000 * (statistics.median(awaited) - statistics.median(blocking)):+.2f} ms"
            )
        finally:
            for worker in workers:
                worker.stop()


# --- pending ---------------------------------------------------------------------------------
def _date_done(app: Celery, task_id: str) -> float:
    return done_at(app.backend.get_task_meta(task_id))


def run_pending(args: argparse.Namespace) -> None:
    from enhance_client.waiting import wait, wait_async

    print(f"== pending: {args.pending} results pending in this process, then probes one by one")
    with private_redis() as server, SandboxProcess("--latency", "0") as sandbox:
        url = server.url(4)
        env = {
            "REDIS_URL": url,
            "RUNWARE_API_URL": sandbox.url,
            "RUNWARE_API_KEY": KEY,
            "LOG_LEVEL": "INFO",
        }
        with WorkerProcess(env, name="pending"):
            project_app = producer_for(url)  # the project's result store: no subscribe at send
            plain_app = backend_app(broker=url, backend=url)  # Celery's own backend
            held = [
                plain_app.send_task(
                    "tasks.enhance_prompt", kwargs={"prompt": f"later {n}"}, countdown=3600
                )
                for n in range(args.pending)
            ]
            print(f"  sent {len(held)} jobs due in an hour")

            def probe(app: Celery, seen: Callable[[Any], Any]) -> list[float]:
                gaps = []
                for n in range(args.probes):
                    sent = app.send_task("tasks.enhance_prompt", kwargs={"prompt": f"probe {n}"})
                    seen(sent)
                    now = time.time()
                    gaps.append(now - _date_done(app, sent.id))
                return gaps

            async def with_async() -> list[float]:
                waits = [asyncio.ensure_future(wait_async(r)) for r in held]
                await asyncio.sleep(1.0)  # every pending wait subscribed
                gaps = []
                for n in range(args.probes):
                    sent = project_app.send_task(
                        "tasks.enhance_prompt", kwargs={"prompt": f"aprobe {n}"}
                    )
                    await wait_async(sent, timeout=30)
                    gaps.append(time.time() - _date_done(project_app, sent.id))
                for w in waits:
                    w.cancel()
                await asyncio.gather(*waits, return_exceptions=True)
                return gaps

            print(f"  wait_async, {args.pending} waits pending: {ms(asyncio.run(with_async()))}")
            # The same number pending in the waiting thread's loop, then `wait` from here.
            background = [
                asyncio.run_coroutine_threadsafe(wait_async(r), _waiting_loop()) for r in held
            ]
            time.sleep(1.0)
            print(f"  wait (threads), {args.pending} pending: "
                  f"{ms(probe(project_app, lambda s: wait(s, timeout=30)))}")  # fmt: skip
            for future in background:
                future.cancel()
            print(f"  project app .get(), {args.pending} sent: "
                  f"{ms(probe(project_app, lambda s: s.get(timeout=30)))}")  # fmt: skip
            # (Celery's own backend subscribed its result consumer to each of them as it sent.)
            print(f"  plain Celery app .get(), {args.pending} sent: "
                  f"{ms(probe(plain_app, lambda s: s.get(timeout=30)))}")  # fmt: skip
            # Celery's results unsubscribe as they go: let them go while Redis still runs.
            held.clear()
            background.clear()
            gc.collect()
            project_app.close()
            plain_app.close()


def _waiting_loop() -> asyncio.AbstractEventLoop:
    from enhance_client.waiting import _loop

    return _loop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--scenario", choices=["patterns", "async", "pending", "all"], default="all"
    )
    parser.add_argument("--jobs", type=int, default=200, help="jobs per pattern (and serial runs)")
    parser.add_argument("--latency", type=float, default=0.0, help="sandbox latency, seconds")
    parser.add_argument("--window", default="", help="RUNWARE_BATCH_WINDOW_MS for the project")
    parser.add_argument("--processes", type=int, default=1, help="project worker processes")
    parser.add_argument("--concurrent", type=int, default=300)
    parser.add_argument("--pending", type=int, default=5000)
    parser.add_argument("--probes", type=int, default=50)
    args = parser.parse_args()
    if args.scenario in ("patterns", "all"):
        run_patterns(args)
    if args.scenario in ("async", "all"):
        run_async(args)
    if args.scenario in ("pending", "all"):
        run_pending(args)


if __name__ == "__main__":
    main()
