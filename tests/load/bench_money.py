"""Money under load: daily budgets against under-estimated prices, calls whose outcome no job saw,
and a refusal that names no task. Prints one line of figures per scenario; asserts nothing.

  python -m tests.load money [--scenario all|budget|image|kill|unattributed] [--concurrency 4]
                             [--jobs N] [--latency 0.3] [--accounts 1]

Every scenario runs on its own Redis with the sandbox as its own process, and sends its jobs with a
plain Celery producer (`send_task` by name); results are read from the result backend in bulk.
The ledger's figures are read from Redis (the `enhance:ledger:day:*` totals) and with
`enhance-worker cost --json` / `enhance-worker reconcile --json` (subprocesses, REDIS_URL set).

1. budget. One worker (WORKER_CONCURRENCY=--concurrency), RUNWARE_DAILY_BUDGET_USD=0.02 and an
   estimate below the price (RUNWARE_ENHANCE_COST_USD=0.0005; the sandbox bills 0.0013 a
   version), the sandbox at --latency; --jobs (default 40) `tasks.enhance_prompt` jobs. Some end
   BudgetExceeded. Prints the jobs that succeeded and were refused, what the sandbox billed, the
   overshoot (bill - budget) against its bound (concurrency x (price - estimate): only calls
   reserved before the first answer taught the ledger the real price can overshoot), how many
   reservations were below the price and how many of those were made after the price was
   learned (expected 0; a thread reads the reservations and learned prices every 10 ms), the
   ledger's total against the bill, and the estimates the ledger learned.
2. image. The same with `tasks.generate_image` jobs alternating 512x512 and 1024x1024
   (runware:101@1; the sandbox prices by area: 0.000475 and 0.0019) under
   RUNWARE_IMAGE_COST_USD=0.0002; the bound is concurrency x (0.0019 - 0.0002). Each size is its
   own call shape, whose price is learned apart.
3. kill. The sandbox answers every call late (latency 1 s, fault "hang" on every call: accepted
   and billed, answered 6 s later) to one worker with RUNWARE_TIMEOUT_S=3, so every call times
   out and is retried (RUNWARE_MAX_RETRIES=20: no job gives up before the kill); fast
   redelivery (CELERY_VISIBILITY_TIMEOUT_S=10) and reconciliation (RUNWARE_RECONCILE_S=2,
   RUNWARE_RESERVATION_S=15), and a budget of exactly jobs x 0.0013, so that a job refused by
   its own earlier reservation would show. --jobs (default 20) jobs in --accounts accounts
   (default 1: retries of failing calls queue behind the account's jobs that have not started,
   so every job is sent before the kill); once the sandbox
   has accepted every taskUUID (at most 90 s), the worker is SIGKILLed, the hangs are turned off
   and a new worker with the same settings starts. Prints the jobs completed, the seconds from
   the kill until the ledger's total equals the sandbox's bill (polled every 0.2 s), the
   taskUUIDs accepted more than once, the ledger against the bill, the jobs that ended
   BudgetExceeded, and the getResponse tasks the sandbox received (polls and checks).
   Then a variant where the worker is not killed but gives up (RUNWARE_MAX_RETRIES=0, hang on
   every call): every job fails with TransientError and leaves its reservation unsettled; once
   they all failed the hangs are turned off and the reconciler (every 2 s) settles them. Prints
   what `enhance-worker cost --json` said when they had all failed, the seconds until the ledger
   equals the bill, the getResponse checks the sandbox received (one per unsettled call would
   do), and `enhance-worker reconcile --json` after it.
4. unattributed. RUNWARE_RATE_LIMIT=5, RUNWARE_BATCH_WINDOW_MS=450 (requests carry several
   tasks), WORKER_CONCURRENCY=5, and the sandbox's next requests answer none, 400, none, 400 (a
   400 that names no taskUUID, for a shared request: its tasks go again, each alone, in a slot
   of its own; a 400 for a request of one task is that task's own, and fails it). --jobs
   (default 30) jobs; --concurrency does not apply. Prints the jobs that succeeded, the
   sandbox's requests and the tasks they carried, the most requests in any 1 s window (one
   request per slot: at most the rate), and whether every job that succeeded got its own result
   (its taskUUID and its prompt).

Every wait is bounded; a job that never completes is counted as such.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis

from config.keys import StateKeys
from tests.load.bench_fairness import read_results
from tests.load.common import KEY, fleet, ledger_micro, max_in_window, private_redis
from tests.producer import backend_app
from workers.sandbox.services import SandboxProcess, WorkerProcess

ENHANCE = "tasks.enhance_prompt"
IMAGE = "tasks.generate_image"
ENHANCE_PRICE_MICRO = 1300  # the sandbox's price of one promptEnhance version
IMAGE_PRICE_MICRO = {512: 475, 1024: 1900}  # 0.0019 per 1024x1024 image, scaled by its area
BUDGET_USD = 0.02
LEDGER_KEYS = StateKeys("enhance")
KILL_ENV = {
    "RUNWARE_TIMEOUT_S": "3",
    "RUNWARE_CONNECT_TIMEOUT_S": "1",
    "CELERY_VISIBILITY_TIMEOUT_S": "10",
    "RUNWARE_RECONCILE_S": "2",
    # > CELERY_VISIBILITY_TIMEOUT_S + the longest of the three waits below (the settings check)
    "RUNWARE_RESERVATION_S": "15",
    "RUNWARE_RETRY_AFTER_MAX_S": "2",
    "RUNWARE_RETRY_BACKOFF_MAX_S": "1",
    "RUNWARE_POLL_MAX_INTERVAL_S": "1",
}


# --- sending and reading ----------------------------------------------------------------------
def send(redis_url: str, jobs: Iterable[tuple[str, dict[str, Any]]]) -> list[str]:
    """Send (task name, kwargs) jobs through one connection; their task ids, in order."""
    sender = backend_app(broker=redis_url)  # no result backend: results are read in bulk
    ids: list[str] = []
    try:
        with sender.producer_or_acquire() as producer:
            for name, kwargs in jobs:
                ids.append(sender.send_task(name, kwargs=kwargs, producer=producer).id)
    finally:
        sender.close()
    return ids


def outcomes(results: dict[str, dict[str, Any]]) -> dict[str, int]:
    """How the jobs ended: SUCCESS, or the exception type of a failure."""
    counts: dict[str, int] = {}
    for meta in results.values():
        if meta.get("status") == "SUCCESS":
            kind = "SUCCESS"
        else:
            error = meta.get("result")
            kind = str(error.get("exc_type")) if isinstance(error, dict) else str(error)
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def cli(redis_url: str, *command: str, timeout: float = 90.0) -> dict[str, Any]:
    """`enhance-worker COMMAND --json` on this Redis, its JSON answer."""
    env = {**os.environ, "REDIS_URL": redis_url}
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", *command, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {done.stderr.strip()[-300:]}"}
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def wait_settled(client: redis.Redis, sandbox: SandboxProcess, timeout: float) -> float | None:
    """Seconds until the ledger's total equals the sandbox's bill (polled every 0.2 s)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if ledger_micro(client) == sandbox.stats()["billed_micro"]:
            return time.monotonic() - started
        time.sleep(0.2)
    return None


def wait_accepted(sandbox: SandboxProcess, count: int, timeout: float) -> int:
    """Wait (bounded) until the sandbox has accepted `count` taskUUIDs; how many it has."""
    deadline = time.monotonic() + timeout
    accepted = len(sandbox.stats()["accepted"])
    while accepted < count and time.monotonic() < deadline:
        time.sleep(0.2)
        accepted = len(sandbox.stats()["accepted"])
    return accepted


def seconds(value: float | None, timeout: float) -> str:
    return f"{value:.1f}s" if value is not None else f"not within {timeout:g}s"


def usd(micro: int) -> str:
    return f"${micro / 1e6:.6f}"


def worker_env(redis_url: str, sandbox: SandboxProcess, **env: str) -> dict[str, str]:
    return {
        "REDIS_URL": redis_url,
        "RUNWARE_API_URL": sandbox.url,
        "RUNWARE_API_KEY": KEY,
        "LOG_LEVEL": "INFO",
        **env,
    }


# --- 1 and 2: budgets against an under-estimate -------------------------------------------------
class ReservationWatch(threading.Thread):
    """Reads every reservation (estimate, shape, when it was made) and when each shape's real
    price was first learned, every 10 ms, from the ledger's keys; both times are Redis's clock.
    A reservation lives for at least the sandbox's latency, so none is missed at 0.3 s."""

    def __init__(self, redis_url: str) -> None:
        super().__init__(name="reservation-watch", daemon=True)
        self.client = redis.Redis.from_url(redis_url)
        self.seen: dict[str, tuple[int, str, float]] = {}  # taskUUID -> (estimate, shape, made)
        self.learned: dict[str, float] = {}  # shape -> when its price was first learned
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(0.01):
            with self.client.pipeline(transaction=True) as pipe:
                pipe.time()
                pipe.hgetall(LEDGER_KEYS.reservations)
                for key in self.client.scan_iter(f"{LEDGER_KEYS.ledger}:est:*"):
                    pipe.hkeys(key)
                now_pair, reservations, *learned = pipe.execute()
            now = now_pair[0] + now_pair[1] / 1e6
            for raw_uuid, raw in reservations.items():
                entry = json.loads(raw)
                self.seen.setdefault(
                    raw_uuid.decode(), (int(entry["e"]), entry.get("s", ""), float(entry["t"]))
                )
            for shapes in learned:
                for shape in shapes:
                    self.learned.setdefault(shape.decode(), now)

    def stop(self) -> None:
        if not self._stopped.is_set():
            self._stopped.set()
            self.join(timeout=5)
            self.client.close()

    def under(self, price: Callable[[str], int]) -> tuple[int, int]:
        """Reservations below their shape's price (micro-dollars): all of them, and those made
        after that price was learned."""
        below = [(s, t) for e, s, t in self.seen.values() if e < price(s)]
        late = sum(1 for s, t in below if s in self.learned and t > self.learned[s])
        return len(below), late


def run_budget(
    args: argparse.Namespace,
    label: str,
    jobs: list[tuple[str, dict[str, Any]]],
    env: dict[str, str],
    price_micro: int,
    estimate_micro: int,
    price: Callable[[str], int],
    sizes: list[int] | None = None,
) -> None:
    """One worker under a fleet budget of BUDGET_USD, estimates below the price."""
    budget_micro = round(BUDGET_USD * 1e6)
    with private_redis() as server, SandboxProcess("--latency", str(args.latency)) as sandbox:
        url = server.url()
        client = redis.Redis.from_url(url)
        workers_env = {
            "WORKER_CONCURRENCY": str(args.concurrency),
            "RUNWARE_DAILY_BUDGET_USD": f"{BUDGET_USD:g}",
            **env,
        }
        watch = ReservationWatch(url)
        watch.start()
        try:
            with fleet(url, sandbox, 1, **workers_env):
                started = time.monotonic()
                ids = send(url, jobs)
                results = read_results(client, ids, timeout=len(jobs) * 2 + 60)
                took = time.monotonic() - started
                watch.stop()
                report = cli(url, "cost")
        finally:
            watch.stop()
        stats = sandbox.stats()
        ledger = ledger_micro(client)
        client.close()
    counts = outcomes(results)
    billed = stats["billed_micro"]
    bound = args.concurrency * (price_micro - estimate_micro)
    by_size = ""
    if sizes is not None:
        ok_by_size: dict[int, int] = {}
        for task_id, size in zip(ids, sizes, strict=True):
            if results.get(task_id, {}).get("status") == "SUCCESS":
                ok_by_size[size] = ok_by_size.get(size, 0) + 1
        by_size = " (" + ", ".join(f"{s}x{s}: {n}" for s, n in sorted(ok_by_size.items())) + ")"
    others = {k: v for k, v in counts.items() if k not in ("SUCCESS", "BudgetExceeded")}
    learned = report.get("estimates", {}).get("learned", report.get("error"))
    cli_total = report.get("total_usd")
    below, late = watch.under(price)
    print(
        f"{label}: concurrency {args.concurrency}, {len(ids)} jobs in {took:.1f}s: "
        f"{counts.get('SUCCESS', 0)} ok{by_size}, {counts.get('BudgetExceeded', 0)} refused "
        f"(BudgetExceeded), other failures {others or 'none'}, {len(ids) - len(results)} "
        f"never completed; sandbox billed {usd(billed)} for {len(stats['accepted'])} tasks; "
        f"overshoot {usd(billed - budget_micro)} over the {usd(budget_micro)} budget (bound "
        f"{usd(bound)}); {len(watch.seen)} reservations seen, {below} below the price, {late} "
        f"of them made after the price was learned; ledger {usd(ledger)} (cost --json "
        f"total_usd {cli_total}) vs bill {usd(billed)}: "
        f"{'equal' if ledger == billed else 'DIFFERENT'}; left reserved "
        f"{report.get('reserved_calls')}, unsettled {report.get('unsettled_calls')}; "
        f"learned estimates {learned}",
        flush=True,
    )


def scenario_budget(args: argparse.Namespace) -> None:
    count = args.jobs or 40
    jobs = [(ENHANCE, {"prompt": f"budget prompt {n}"}) for n in range(count)]
    run_budget(
        args,
        "budget",
        jobs,
        {"RUNWARE_ENHANCE_COST_USD": "0.0005"},
        ENHANCE_PRICE_MICRO,
        500,
        lambda shape: ENHANCE_PRICE_MICRO,
    )


def scenario_image(args: argparse.Namespace) -> None:
    count = args.jobs or 40
    sizes = [512 if n % 2 == 0 else 1024 for n in range(count)]
    jobs = [
        (
            IMAGE,
            {"positivePrompt": "a fox", "model": "runware:101@1", "width": size, "height": size},
        )
        for size in sizes
    ]
    run_budget(
        args,
        "image",
        jobs,
        {"RUNWARE_IMAGE_COST_USD": "0.0002"},
        IMAGE_PRICE_MICRO[1024],
        200,
        lambda shape: IMAGE_PRICE_MICRO[512 if "width=512" in shape else 1024],
        sizes,
    )


# --- 3: calls whose outcome no job saw ----------------------------------------------------------
def scenario_kill(args: argparse.Namespace) -> None:
    count = args.jobs or 20
    budget = f"{count * ENHANCE_PRICE_MICRO / 1e6:.6f}"
    sandbox_args = ("--latency", "1", "--rate-hang", "1", "--hang", "6")
    with private_redis() as server, SandboxProcess(*sandbox_args) as sandbox:
        url = server.url()
        client = redis.Redis.from_url(url)
        env = worker_env(
            url,
            sandbox,
            WORKER_CONCURRENCY=str(args.concurrency),
            RUNWARE_DAILY_BUDGET_USD=budget,
            RUNWARE_MAX_RETRIES="20",
            **KILL_ENV,
        )
        first = WorkerProcess(env, name="money-doomed").start()
        heir: WorkerProcess | None = None
        try:
            started = time.monotonic()
            # One account per job: a retried job goes back to the head of its account's list,
            # so with one account the first jobs, retrying every second against the hangs, would
            # hold every thread and the last ones would never be sent before the kill.
            jobs = (
                (
                    ENHANCE,
                    {
                        "prompt": f"kill prompt {n}",
                        "account": f"k{n % args.accounts}",
                    },
                )
                for n in range(count)
            )
            ids = send(url, jobs)
            accepted = wait_accepted(sandbox, count, 90)
            accepted_s = time.monotonic() - started
            first.kill()
            killed = time.monotonic()
            sandbox.configure(rate_hang=0.0)
            heir = WorkerProcess(env, name="money-heir").start()
            settled = wait_settled(client, sandbox, 150)
            settled_s = None if settled is None else time.monotonic() - killed
            results = read_results(
                client, ids, timeout=max(10.0, 170 - (time.monotonic() - killed))
            )
            done_s = time.monotonic() - killed
        finally:
            first.stop()
            if heir is not None:
                heir.stop()
        stats = sandbox.stats()
        ledger = ledger_micro(client)
        client.close()
    counts = outcomes(results)
    twice = sum(1 for n in stats["accepted"].values() if n > 1)
    others = {k: v for k, v in counts.items() if k not in ("SUCCESS", "BudgetExceeded")}
    print(
        f"kill: concurrency {args.concurrency}, {count} jobs in "
        f"{args.accounts} account(s), budget ${budget}; "
        f"SIGKILL after "
        f"{accepted}/{count} accepted ({accepted_s:.1f}s); {counts.get('SUCCESS', 0)}/{count} "
        f"completed {done_s:.1f}s after the kill, {counts.get('BudgetExceeded', 0)} "
        f"BudgetExceeded, other failures {others or 'none'}, {count - len(results)} never "
        f"completed; ledger = bill {seconds(settled_s, 150)} after the kill; taskUUIDs accepted "
        f"more than once: {twice}; ledger {ledger} micro vs bill {stats['billed_micro']} micro "
        f"({'equal' if ledger == stats['billed_micro'] else 'DIFFERENT'}); getResponse tasks "
        f"sent (job polls and reconciler checks): {stats['by_type'].get('getResponse', 0)}",
        flush=True,
    )


def scenario_give_up(args: argparse.Namespace) -> None:
    count = args.jobs or 20
    budget = f"{count * ENHANCE_PRICE_MICRO / 1e6:.6f}"
    sandbox_args = ("--latency", "1", "--rate-hang", "1", "--hang", "6")
    with private_redis() as server, SandboxProcess(*sandbox_args) as sandbox:
        url = server.url()
        client = redis.Redis.from_url(url)
        env = {
            "WORKER_CONCURRENCY": str(args.concurrency),
            "RUNWARE_DAILY_BUDGET_USD": budget,
            "RUNWARE_MAX_RETRIES": "0",
            **KILL_ENV,
        }
        with fleet(url, sandbox, 1, **env):
            started = time.monotonic()
            ids = send(url, ((ENHANCE, {"prompt": f"give-up prompt {n}"}) for n in range(count)))
            results = read_results(client, ids, timeout=count * 4 + 60)
            failed_s = time.monotonic() - started
            before = cli(url, "cost")
            ledger_before = ledger_micro(client)
            sandbox.configure(rate_hang=0.0)
            settled = wait_settled(client, sandbox, 90)
            reconciled = cli(url, "reconcile", "--timeout", "20")
            after = cli(url, "cost")
        stats = sandbox.stats()
        ledger = ledger_micro(client)
        client.close()
    counts = outcomes(results)
    print(
        f"give up: concurrency {args.concurrency}, {count} jobs, RUNWARE_MAX_RETRIES=0: ended "
        f"{counts} in {failed_s:.1f}s ({count - len(results)} never completed); then ledger "
        f"{ledger_before} micro, unsettled {before.get('unsettled_calls')} calls "
        f"(${before.get('unsettled_usd')}), reserved {before.get('reserved_calls')}; hangs off: "
        f"ledger = bill {seconds(settled, 90)} later; ledger {ledger} micro vs bill "
        f"{stats['billed_micro']} micro for {len(stats['accepted'])} accepted; getResponse "
        f"checks sent {stats['by_type'].get('getResponse', 0)}; reconcile --json "
        f"{json.dumps(reconciled)}; left unsettled {after.get('unsettled_calls')}, reserved "
        f"{after.get('reserved_calls')}",
        flush=True,
    )


# --- 4: a refusal that names no task --------------------------------------------------------
def scenario_unattributed(args: argparse.Namespace) -> None:
    count = args.jobs or 30
    rate = 5.0
    with private_redis() as server, SandboxProcess() as sandbox:
        url = server.url()
        client = redis.Redis.from_url(url)
        sandbox.configure(fail_next=["none", "400-unnamed", "none", "400-unnamed"])
        env = {
            "WORKER_CONCURRENCY": "5",
            "RUNWARE_RATE_LIMIT": f"{rate:g}",
            "RUNWARE_BATCH_WINDOW_MS": "450",
        }
        prompts = [f"unattributed prompt {n}" for n in range(count)]
        with fleet(url, sandbox, 1, **env):
            started = time.monotonic()
            ids = send(url, ((ENHANCE, {"prompt": p}) for p in prompts))
            results = read_results(client, ids, timeout=count / rate * 3 + 60)
            took = time.monotonic() - started
        stats = sandbox.stats()
        client.close()
    counts = outcomes(results)
    ok = [task_id for task_id in ids if results.get(task_id, {}).get("status") == "SUCCESS"]
    own = 0
    for task_id, prompt in zip(ids, prompts, strict=True):
        value = results.get(task_id, {}).get("result")
        if (
            task_id in ok
            and isinstance(value, dict)
            and value.get("taskUUID") == task_id
            and value.get("prompt") == prompt
            and str(value.get("text", "")).startswith(prompt)
        ):
            own += 1
    failures = [
        f"{meta['result'].get('exc_type')}: {str(meta['result'].get('exc_message'))[:160]}"
        for meta in results.values()
        if meta.get("status") != "SUCCESS" and isinstance(meta.get("result"), dict)
    ]
    requests = stats["requests"]
    verdict = "yes" if own == len(ok) else "NO"
    print(
        f"unattributed: {count} jobs at {rate:g}/s in {took:.1f}s: {len(ok)} ok, ended "
        f"{counts}, {count - len(results)} never completed; sandbox {requests} requests carrying "
        f"{stats['tasks_received']} tasks ({stats['tasks_received'] / max(requests, 1):.2f} a "
        f"request, {stats['statuses'].get('400', 0)} answered 400), {len(stats['accepted'])} "
        f"taskUUIDs accepted, {sum(1 for n in stats['accepted'].values() if n > 1)} more than "
        f"once; most requests in any 1 s window {max_in_window(stats['call_times'])} (rate "
        f"{rate:g}/s); every job that succeeded got its own result (taskUUID, prompt): "
        f"{verdict} ({own}/{len(ok)})",
        flush=True,
    )
    for failure in failures[:5]:
        print(f"   failed: {failure}", flush=True)


SCENARIOS = ("budget", "image", "kill", "unattributed")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", choices=("all", *SCENARIOS), default="all")
    parser.add_argument("--concurrency", type=int, default=4, help="WORKER_CONCURRENCY")
    parser.add_argument(
        "--jobs", type=int, default=None, help="jobs (default 40 budget/image, 20 kill, 30 other)"
    )
    parser.add_argument(
        "--latency", type=float, default=0.3, help="sandbox latency of budget and image (s)"
    )
    parser.add_argument("--accounts", type=int, default=1, help="kill: accounts of the jobs")
    args = parser.parse_args()
    chosen = SCENARIOS if args.scenario == "all" else (args.scenario,)
    if "budget" in chosen:
        scenario_budget(args)
    if "image" in chosen:
        scenario_image(args)
    if "kill" in chosen:
        scenario_kill(args)
        scenario_give_up(args)
    if "unattributed" in chosen:
        scenario_unattributed(args)


if __name__ == "__main__":
    main()
