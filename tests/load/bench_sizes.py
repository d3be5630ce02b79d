"""Production sizes against Redis's own clock: large batches (megabyte messages) through real
workers, and every Redis command that took longer than --slow-ms, read from Redis's SLOWLOG.
Prints figures; asserts nothing.

  python -m tests.load sizes [--batch 5000x2,10000x5] [--workers 2] [--slow-ms 10]
                             [--accounts 0] [--rate 300] [--account-rate 1]
                             [--flood 0] [--real 800] [--cap 12] [--lease-s 0] [--latency-s 0.3]
                             [--backlog 0] [--prompt-chars 300,3000]

For each PROMPTSxVERSIONS: one `enhance_batch` of that many prompts of English prose, up to 280
characters (sent by this process, as a backend would, with the project's helper), every result
read back, then the SLOWLOG: how many commands passed --slow-ms, the longest, and the longest
of each command name (EVALSHA is a script: pump.lua, the ledger's, the result store). The
sandbox answers at once, so the batch is bound by the workers and Redis alone.

With --accounts N (the batches are then skipped unless --batch is given too): N accounts with
one job each, under a global --rate and a per-account --account-rate, through --workers
workers with /metrics on; then an interactive job of another account, timed from this
process. Prints: all done and how long, that job's latency, the series on one worker's
/metrics (during the run and after), and the SLOWLOG.

With --flood N: N jobs that pass without a grant (an invalid `priority`: the task refuses each
without a call) sent first, then --real jobs, under --rate and --cap (--lease-s short, so a
lease that expired by the clock would show), the sandbox answering in --latency-s. Prints the
most calls the API saw in any one second and the most it had in flight, against the limits.

With --backlog N: N jobs of 50 accounts already waiting in the Celery queue (after an outage of
the fleet, or a producer faster than it), read by the dispatcher's steps alone (no workers, a
rate of 1/s so that nothing is granted), for each prompt size of --prompt-chars. Every step's
time in Redis, from the SLOWLOG (threshold 0): median and longest, and per message read.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import redis

from tests.load.common import describe, fleet, private_redis, prose_prompts, slowlog, worker_env
from tests.producer import backend_app
from workers.sandbox.services import SandboxProcess, WorkerProcess


def batch(producer: Any, prompts: int, versions: int) -> tuple[float, int, int]:
    from tasks import enhance_batch

    texts = prose_prompts(prompts)
    started = time.monotonic()
    result = enhance_batch(texts, versions=versions).get(timeout=1800)
    took = time.monotonic() - started
    done = sum(1 for item in result["results"] if "error" not in item)
    return took, done, result["count"]


def series(port: int) -> int:
    import requests

    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def many_accounts(url: str, sandbox: SandboxProcess, args: argparse.Namespace) -> None:

    env = worker_env(
        url,
        sandbox,
        RUNWARE_RATE_LIMIT=f"{args.rate}/s",
        RUNWARE_ACCOUNT_RATE_LIMIT=f"{args.account_rate}/s",
        METRICS_PORT="0",
    )
    workers = [WorkerProcess(env, name=f"acct{n}") for n in range(args.workers)]
    client = redis.Redis.from_url(url)
    try:
        for worker in workers:
            worker.start()
        port = workers[0].metrics_port()
        producer = backend_app(broker=url, backend=url)
        client.slowlog_reset()
        started = time.monotonic()
        pending = [
            producer.send_task(
                "tasks.enhance_prompt",
                kwargs={"prompt": f"account {n}", "account": f"acct-{n}", "priority": "batch"},
            )
            for n in range(args.accounts)
        ]
        sent_in = time.monotonic() - started
        during = series(port)
        probe = backend_app(broker=url, backend=url)  # another client, as another backend process
        asked = time.monotonic()
        probe.send_task(
            "tasks.enhance_prompt", kwargs={"prompt": "now please", "account": "vip"}
        ).get(timeout=120)
        latency = time.monotonic() - asked
        for job in pending:
            job.get(timeout=1800)
        took = time.monotonic() - started
        after = series(port)
        print(
            f"{args.accounts} accounts x 1 job (global {args.rate}/s, each account "
            f"{args.account_rate}/s, {args.workers} workers): sent in {sent_in:.1f} s, all done "
            f"in {took:.1f} s; another account's interactive job {latency * 1000:.0f} ms"
        )
        print(f"  series on one worker's /metrics: {during} while they ran, {after} after")
        for line in describe(slowlog(client), args.slow_ms):
            print(line)
        probe.close()
        producer.close()
    finally:
        for worker in workers:
            worker.stop()
        client.close()


def flood(url: str, sandbox: SandboxProcess, args: argparse.Namespace) -> None:

    from tests.load.common import max_in_window

    env = worker_env(
        url,
        sandbox,
        RUNWARE_RATE_LIMIT=f"{args.rate}/s",
        RUNWARE_MAX_IN_FLIGHT=str(args.cap),
        RUNWARE_BATCH_MAX="1",
        **({"RUNWARE_LEASE_S": str(args.lease_s)} if args.lease_s else {}),
    )
    sandbox.reset()
    sandbox.configure(latency_s=args.latency_s)
    producer = backend_app(broker=url, backend=url)
    workers = [WorkerProcess(env, name=f"flood{n}") for n in range(args.workers)]
    try:
        for worker in workers:
            worker.start()
        started = time.monotonic()
        with producer.connection_for_write() as connection:  # one connection, no result
            for n in range(args.flood):  # subscription per job: the flood goes in first
                producer.send_task(
                    "tasks.enhance_prompt",
                    kwargs={"prompt": f"flood {n}", "priority": "urgent"},
                    connection=connection,
                    ignore_result=True,
                )
        real = [
            producer.send_task("tasks.enhance_prompt", kwargs={"prompt": f"real {n}"})
            for n in range(args.real)
        ]
        for job in real:
            job.get(timeout=3600)
        took = time.monotonic() - started
    finally:
        for worker in workers:
            worker.stop()
    stats = sandbox.stats()
    times = sorted(stats["call_times"])
    print(
        f"a flood of {args.flood} jobs without a grant in front of {args.real} real ones (rate "
        f"{args.rate}/s, cap {args.cap}, lease {args.lease_s or 'default'} s, API "
        f"{args.latency_s} s): all done in {took:.0f} s"
    )
    print(
        f"  the API saw {len(times)} calls; at most {max_in_window(times)} in one second "
        f"(rate {args.rate:g}) and {stats['max_in_flight']} in flight (cap {args.cap})"
    )
    producer.close()


def backlog_steps(args: argparse.Namespace) -> None:
    import statistics

    from config.settings import load_settings
    from tasks import dispatcher
    from tasks.dispatcher import Dispatcher, Intake

    task = "tasks.enhance_prompt"
    for chars in (int(c) for c in args.prompt_chars.split(",")):
        with private_redis() as server:
            url = server.url(0)
            client = redis.Redis.from_url(url)
            sender = backend_app(broker=url)
            with sender.producer_or_acquire() as producer:
                for n in range(args.backlog):
                    kwargs = {"prompt": "x" * chars, "account": f"a{n % 50}", "priority": "batch"}
                    sender.send_task(task, kwargs=kwargs, producer=producer)
            sender.close()
            settings = load_settings(_env_file=None, runware_rate_limit=1.0)
            intake = Intake(("enhance",), frozenset({task}), frozenset({task}))
            pump = Dispatcher(client, settings, intake, 4)
            client.config_set("slowlog-log-slower-than", 0)
            client.config_set("slowlog-max-len", 1_000_000)
            client.slowlog_reset()
            started = time.monotonic()
            while client.llen("enhance"):
                client.set(pump.keys.dispatcher, pump.id)  # this process holds the role
                pump.pump()
            took = time.monotonic() - started
            steps = [
                int(e["duration"])
                for e in slowlog(client)
                if e["command"].startswith(b"EVALSHA") and b"fair:intake" in e["command"]
            ]
            read = dispatcher.MAX_READ
            median = statistics.median(steps)
            p99 = sorted(steps)[int(len(steps) * 0.99)]
            print(
                f"backlog of {args.backlog} jobs, prompts of {chars} characters: read in "
                f"{took:.1f} s ({args.backlog / took:.0f}/s) by {len(steps)} steps of up to "
                f"{read}; a step held Redis {median / 1000:.2f} ms (median), "
                f"{p99 / 1000:.2f} (p99), {max(steps) / 1000:.2f} ms at most, "
                f"{median / read:.1f} us per message"
            )
            client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", default=None, help="5000x2,10000x5; none with --accounts")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--slow-ms", type=float, default=10.0)
    parser.add_argument("--accounts", type=int, default=0)
    parser.add_argument("--rate", type=float, default=300.0)
    parser.add_argument("--account-rate", type=float, default=1.0)
    parser.add_argument("--flood", type=int, default=0)
    parser.add_argument("--real", type=int, default=800)
    parser.add_argument("--cap", type=int, default=12)
    parser.add_argument("--lease-s", type=float, default=0.0)
    parser.add_argument("--latency-s", type=float, default=0.3)
    parser.add_argument("--backlog", type=int, default=0)
    parser.add_argument("--prompt-chars", default="300,3000")
    args = parser.parse_args()
    if args.backlog:
        backlog_steps(args)
    if args.batch is None:
        args.batch = "" if args.accounts or args.flood or args.backlog else "5000x2,10000x5"
    sizes = [tuple(int(v) for v in item.split("x")) for item in args.batch.split(",") if item]
    with private_redis() as server, SandboxProcess() as sandbox:
        url = server.url(0)
        os.environ["REDIS_URL"] = url  # the helper's app (config.celery) reads it
        client = redis.Redis.from_url(url)
        client.config_set("slowlog-log-slower-than", int(args.slow_ms * 1000))
        client.config_set("slowlog-max-len", 100_000)
        sandbox.configure(reword_versions=True)  # versions as unlike as a model's
        with fleet(url, sandbox, args.workers) as producer:
            for prompts, versions in sizes:
                client.slowlog_reset()
                took, done, count = batch(producer, prompts, versions)
                print(
                    f"enhance_batch of {prompts} prompts x {versions} versions: {done} of "
                    f"{count} results back in {took:.1f} s"
                )
                for line in describe(slowlog(client), args.slow_ms):
                    print(line)
        if args.accounts:
            many_accounts(url, sandbox, args)
        if args.flood:
            flood(url, sandbox, args)
        client.close()


if __name__ == "__main__":
    main()
