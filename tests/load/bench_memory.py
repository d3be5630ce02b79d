"""What finished jobs leave in Redis, and what a sustained job rate holds there. Prints figures;
asserts nothing.

  python -m tests.load memory [--jobs 600] [--prompt-chars 300] [--versions 1] [--workers 2]
                              [--soak-s 0] [--soak-rate 20] [--set NAME=VALUE ...]

1. Footprint: --jobs enhancements (prompts of --prompt-chars characters of English prose,
   --versions each, worded by the sandbox as unlike the prompt as a model's, ten accounts)
   through real workers on a private Redis at the default settings. Then every key in Redis is
   read (MEMORY USAGE, TTL) and grouped by family: bytes per finished job, how long each family
   keeps them, and so the MB that 1, 20 and 100 sustained jobs/s hold. The bytes are also
   scaled to Redis's own `used_memory` growth per job over the run's second half (allocator
   overhead, the expiry index; not what the run's start costs once), which is what the server
   really spends; the held figures use the larger of the two.
2. With --soak-s N: the retentions cut to a minute or two (CELERY_RESULT_EXPIRES_S,
   RUNWARE_ITEMS_RETENTION_S, RUNWARE_BILLED_RETENTION_S), jobs sent at --soak-rate per second
   for N seconds, then a wait as long as the longest retention: `used_memory` must come back to
   where it started (printed: start, peak, end, and end against start).
"""

from __future__ import annotations

import argparse
import functools
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery

from enhance_client.schemas import PROMPT_MAX, PROMPT_MIN
from tests.load.common import fleet, private_redis, prose_prompts
from workers.sandbox.services import SandboxProcess

ACCOUNTS = tuple(f"acct{n}" for n in range(10))
# Key families: (name, what makes a key one of them, whether it grows with every job)
FAMILIES: tuple[tuple[str, str, bool], ...] = (
    ("celery results", "celery-task-meta-", True),
    ("ledger items", "enhance:ledger:task:", True),
    ("billed-once markers", "enhance:ledger:billed:", True),
    ("daily totals", "enhance:ledger:day:", False),
    ("price estimates", "enhance:ledger:est:", False),
    ("poll markers", "enhance:pending:", True),
    ("dead letters", "enhance:dead", True),
    ("fair intake", "enhance:fair:", False),
    ("kombu", "_kombu.", False),
    ("kombu unacked", "unacked", False),
)
RATES = (1, 20, 100)


@dataclass
class Family:
    keys: int = 0
    bytes: int = 0
    ttls: list[int] = field(default_factory=list)
    per_job: bool = True


def family_of(key: str) -> tuple[str, bool]:
    for name, start, per_job in FAMILIES:
        if key.startswith(start):
            return name, per_job
    return "other", False


def census(client: redis.Redis) -> dict[str, Family]:
    """Every key's MEMORY USAGE (exact: SAMPLES 0) and TTL, by family."""
    found: dict[str, Family] = defaultdict(Family)
    for raw in client.scan_iter(count=1000):
        key = raw.decode(errors="replace")
        name, per_job = family_of(key)
        entry = found[name]
        entry.per_job = per_job
        entry.keys += 1
        entry.bytes += int(client.memory_usage(raw, samples=0) or 0)
        ttl = int(client.ttl(raw))
        if ttl > 0:
            entry.ttls.append(ttl)
    return dict(found)


@functools.cache
def _prose(chars: int) -> list[str]:
    return prose_prompts(4096, chars)


def prompt(n: int, chars: int) -> str:
    """A prompt of about `chars` characters of English prose (CPython's help texts): results
    then compress as real ones do, not as a sentence repeated or a small vocabulary would."""
    return f"job {n}: {_prose(chars)[n % 4096]}"[:chars]


def send(producer: Celery, n: int, chars: int, versions: int) -> Any:
    kwargs: dict[str, Any] = {"prompt": prompt(n, chars), "account": ACCOUNTS[n % len(ACCOUNTS)]}
    if versions > 1:
        kwargs["promptVersions"] = versions
    return producer.send_task("tasks.enhance_prompt", kwargs=kwargs)


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def settle(client: redis.Redis) -> int:
    """used_memory once the last writes and lazy frees are done (read twice, a moment apart)."""
    time.sleep(1.0)
    return used_memory(client)


def footprint(args: argparse.Namespace) -> None:
    with private_redis() as server, SandboxProcess() as sandbox:
        sandbox.configure(reword_versions=True)  # texts as unlike the prompt as a model's
        url = server.url(0)
        client = redis.Redis.from_url(url)
        with fleet(url, sandbox, args.workers, **args.env) as producer:
            warm = [send(producer, -n - 1, args.prompt_chars, args.versions) for n in range(20)]
            for job in warm:
                job.get(timeout=120)
            keys_before = census(client)
            started = time.monotonic()
            half = args.jobs // 2
            middle, end = 0, 0
            for first, last in ((0, half), (half, args.jobs)):
                pending = [
                    send(producer, n, args.prompt_chars, args.versions) for n in range(first, last)
                ]
                for job in pending:
                    job.get(timeout=600)
                # with the same clients connected each time
                middle, end = end, settle(client)
            took = time.monotonic() - started
            after = census(client)
        client.close()
    jobs = args.jobs
    grown = {
        name: after[name].bytes - keys_before.get(name, Family()).bytes
        for name in after
        if after[name].per_job
    }
    counted = sum(grown.values())
    # The second half's growth per job: what the first job of a run costs once (buffers, the
    # scripts, a dictionary's first resize) is not a per-job cost.
    per_job_growth = (end - middle) / (jobs - jobs // 2)
    scale = max(1.0, per_job_growth * jobs / counted) if counted else 1.0
    print(
        f"{jobs} jobs ({args.prompt_chars}-character prompts, {args.versions} version(s), "
        f"{len(ACCOUNTS)} accounts) in {took:.1f} s through {args.workers} workers"
        + (f" with {' '.join(args.set)}" if args.set else "")
    )
    print(
        f"used_memory grew {per_job_growth:.0f} B per job (the second half's jobs); the keys' "
        f"MEMORY USAGE "
        f"{counted / jobs:.0f} B per job (x{scale:.2f} for the allocator and the expiry index)"
    )
    print()
    print(f"{'family':<22}{'keys':>7}{'B/job':>8}{'kept':>12}{'MB per job/s':>14}")
    held_per_rate = 0.0
    for name, entry in sorted(after.items(), key=lambda kv: -kv[1].bytes):
        kept_s = max(entry.ttls) if entry.ttls else -1
        kept = _duration(kept_s) if kept_s > 0 else "no TTL"
        if entry.per_job:
            per_job = grown.get(name, 0) / jobs
            held = per_job * scale * max(kept_s, 0) / 1e6
            held_per_rate += held
            print(f"{name:<22}{entry.keys:>7}{per_job:>8.0f}{kept:>12}{held:>14.1f}")
        else:
            print(f"{name:<22}{entry.keys:>7}{'-':>8}{kept:>12}{'(fixed)':>14}")
    print()
    print(f"held at the default retentions: {held_per_rate:.0f} MB per sustained job/s")
    for rate in RATES:
        print(f"  {rate:>3} jobs/s: {held_per_rate * rate / 1000:.2f} GB")


def _duration(seconds: int) -> str:
    if seconds >= 86_400:
        return f"{seconds / 86_400:.1f} d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds} s"


SOAK_SETTINGS = {
    # Every retention cut to minutes; the settings check wants the items to outlast a job's
    # return (visibility timeout + the longest wait), so those are cut too.
    "CELERY_RESULT_EXPIRES_S": "60",
    "CELERY_VISIBILITY_TIMEOUT_S": "40",
    "RUNWARE_TIMEOUT_S": "10",
    "RUNWARE_CONNECT_TIMEOUT_S": "2",
    "RUNWARE_RETRY_BACKOFF_MAX_S": "5",
    "RUNWARE_RETRY_AFTER_MAX_S": "5",
    "RUNWARE_POLL_MAX_INTERVAL_S": "5",
    "RUNWARE_RESERVATION_S": "60",
    "RUNWARE_ITEMS_RETENTION_S": "60",
    "RUNWARE_BILLED_RETENTION_S": "120",
}


def soak(args: argparse.Namespace) -> None:
    longest = max(int(v) for k, v in SOAK_SETTINGS.items() if "RETENTION" in k or "EXPIRES" in k)
    with private_redis() as server, SandboxProcess() as sandbox:
        sandbox.configure(reword_versions=True)
        url = server.url(0)
        client = redis.Redis.from_url(url)
        with fleet(url, sandbox, args.workers, **{**args.env, **SOAK_SETTINGS}) as producer:
            for job in [send(producer, -n - 1, args.prompt_chars, 1) for n in range(20)]:
                job.get(timeout=120)
            time.sleep(longest * 1.25 + 5)  # the warm-up's own keys gone too
            start = settle(client)
            peak, sent, pending = start, 0, []
            began = time.monotonic()
            for moment in _ticks(args.soak_rate, args.soak_s):
                pause = moment - (time.monotonic() - began)
                if pause > 0:
                    time.sleep(pause)
                pending.append(send(producer, sent, args.prompt_chars, args.versions))
                sent += 1
                if sent % 200 == 0:
                    peak = max(peak, used_memory(client))
                    pending = [job for job in pending if not job.ready()]
            for job in pending:
                job.get(timeout=300)
            peak = max(peak, used_memory(client))
            # Everything the jobs wrote expires within the longest retention plus a marker
            # bucket's span (an eighth of RUNWARE_BILLED_RETENTION_S).
            wait = longest * 1.25 + 10
            print(f"sent {sent} jobs in {time.monotonic() - began:.0f} s; waiting {wait:.0f} s")
            time.sleep(wait)
            end = settle(client)
        client.close()
    print(
        f"used_memory: start {start / 1e6:.2f} MB, peak {peak / 1e6:.2f} MB, end "
        f"{end / 1e6:.2f} MB ({(end - start) / start:+.1%} against the start)"
    )


def _ticks(rate: float, seconds: float) -> Iterator[float]:
    step, moment = 1.0 / rate, 0.0
    while moment < seconds:
        yield moment
        moment += step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=600)
    parser.add_argument("--prompt-chars", type=int, default=300)
    parser.add_argument("--versions", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--soak-s", type=float, default=0.0)
    parser.add_argument("--soak-rate", type=float, default=20.0)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a worker setting, e.g. --set CELERY_RESULT_COMPRESSION=gzip (repeatable)",
    )
    args = parser.parse_args()
    if not PROMPT_MIN <= args.prompt_chars <= PROMPT_MAX:
        parser.error(f"--prompt-chars must be {PROMPT_MIN}..{PROMPT_MAX} (promptEnhance's limit)")
    args.env = dict(item.split("=", 1) for item in args.set)
    footprint(args)
    if args.soak_s > 0:
        print()
        soak(args)


if __name__ == "__main__":
    main()
