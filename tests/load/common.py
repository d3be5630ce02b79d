"""Shared pieces of the benchmarks: a private Redis, the sandbox process, a fleet of workers."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import redis
from celery import Celery

from config.keys import StateKeys
from tests.producer import backend_app
from workers.sandbox.services import RedisServer, SandboxProcess, WorkerProcess

KEY = "bench-key"


def worker_env(redis_url: str, sandbox: SandboxProcess, **settings: str) -> dict[str, str]:
    """A benchmark worker's environment: Redis, the sandbox and its key, then `settings`; INFO
    logs always (WorkerProcess waits for the worker's ready line, an INFO line)."""
    return {
        "REDIS_URL": redis_url,
        "RUNWARE_API_URL": sandbox.url,
        "RUNWARE_API_KEY": KEY,
        **settings,
        "LOG_LEVEL": "INFO",
    }


def percentile(values: list[float], q: float) -> float:
    """The `q` quantile of `values` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def done_at(meta: dict[str, Any]) -> float:
    """When a stored Celery result was written (its `date_done`), as a UNIX time."""
    done = meta["date_done"]
    if isinstance(done, str):
        done = datetime.fromisoformat(done)
    if done.tzinfo is None:
        done = done.replace(tzinfo=UTC)
    return float(done.timestamp())


@contextlib.contextmanager
def fleet(
    redis_url: str, sandbox: SandboxProcess, count: int, app: str = "workers", **env: str
) -> Iterator[Celery]:
    """`count` real worker processes on `redis_url`, and a producer app for them."""
    workers = [
        WorkerProcess(worker_env(redis_url, sandbox, **env), name=f"bench{n}", app=app)
        for n in range(count)
    ]
    try:
        for worker in workers:
            worker.start()
        producer = backend_app(broker=redis_url, backend=redis_url)
        yield producer
        producer.close()
    finally:
        for worker in workers:
            worker.stop()


def run_jobs(
    producer: Celery, count: int, timeout: float = 600.0, accounts: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """`count` jobs, round-robin over `accounts` (each prompt starts with its account, so the
    sandbox's accepted_log tells them apart); their results."""

    def kwargs(n: int) -> dict[str, str]:
        if not accounts:
            return {"prompt": f"benchmark prompt {n}"}
        account = accounts[n % len(accounts)]
        return {"prompt": f"{account} benchmark prompt {n}", "account": account}

    pending = [producer.send_task("tasks.enhance_prompt", kwargs=kwargs(n)) for n in range(count)]
    deadline = time.monotonic() + timeout
    return [p.get(timeout=max(1.0, deadline - time.monotonic())) for p in pending]


def accepted_by_prefix(stats: dict[str, Any], prefixes: tuple[str, ...]) -> dict[str, list[float]]:
    """When the sandbox accepted each task, per prompt prefix (an account name), in seconds
    since its first accepted task."""
    first = min((t for t, _ in stats["accepted_log"]), default=0.0)
    return {prefix: [t - first for t in task_times(stats, f"{prefix} ")] for prefix in prefixes}


def task_times(stats: dict[str, Any], prefix: str = "") -> list[float]:
    """When the sandbox accepted each task (of the accounts whose prompts start with prefix)."""
    return sorted(t for t, prompt in stats["accepted_log"] if prompt.startswith(prefix))


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """The most calls in any window of `window` seconds (sliding, half-open)."""
    ordered = sorted(times)
    best = start = 0
    for end, moment in enumerate(ordered):
        while moment - ordered[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


def rate_report(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    span = ordered[-1] - ordered[0] if len(ordered) > 1 else 0.0
    per_second: dict[int, int] = {}
    for moment in ordered:
        second = int(moment - ordered[0])
        per_second[second] = per_second.get(second, 0) + 1
    full = [per_second.get(s, 0) for s in range(int(span))]  # whole seconds only
    return {
        "calls": len(ordered),
        "span_s": span,
        "mean_rate": (len(ordered) - 1) / span if span else float("nan"),
        "max_1s_window": max_in_window(ordered),
        "per_second_stdev": statistics.pstdev(full) if full else 0.0,
    }


@contextlib.contextmanager
def private_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def ledger_micro(target: redis.Redis | str, prefix: str = "enhance") -> int:
    """The ledger's recorded spend over every day, in micro-dollars, from a client or a URL."""
    client = redis.Redis.from_url(target) if isinstance(target, str) else target
    try:
        days = client.scan_iter(StateKeys(prefix).day("*"))
        return sum(int(client.hget(key, "total") or 0) for key in days)
    finally:
        if isinstance(target, str):
            client.close()


def result_across_failover(result: Any, deadline: float) -> Any:
    """A job's result, read again when a Redis failover cuts the producer's connection under the
    read (Celery's result consumer raises the ConnectionError; the result is on the new master).
    A failed job raises its error; no result by `deadline` (monotonic) raises TimeoutError."""
    while True:
        try:
            return result.get(timeout=max(1.0, deadline - time.monotonic()))
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            if time.monotonic() >= deadline:
                raise TimeoutError("no result before the deadline") from None
            time.sleep(0.5)


def slowlog(client: redis.Redis) -> list[dict[str, Any]]:
    """Every entry of Redis's SLOWLOG (set slowlog-log-slower-than first)."""
    return list(client.slowlog_get(100_000))


def describe(entries: list[dict[str, Any]], slow_ms: float) -> list[str]:
    """SLOWLOG entries as lines: how many, the longest per command, the three longest."""
    if not entries:
        return [f"  no command over {slow_ms:g} ms"]
    longest: dict[str, int] = {}
    counts: Counter[str] = Counter()
    for entry in entries:
        name = entry["command"].split(b" ", 1)[0].decode(errors="replace").upper()
        counts[name] += 1
        longest[name] = max(longest.get(name, 0), int(entry["duration"]))
    top = max(int(e["duration"]) for e in entries)
    lines = [f"  {len(entries)} command(s) over {slow_ms:g} ms; the longest {top / 1000:.1f} ms"]
    for name, micros in sorted(longest.items(), key=lambda kv: -kv[1]):
        lines.append(f"    {name:<10} {counts[name]:>5} over, longest {micros / 1000:.1f} ms")
    for entry in sorted(entries, key=lambda e: -int(e["duration"]))[:3]:
        # An EVALSHA names its script by its keys (SLOWLOG keeps the first 32 arguments).
        words = entry["command"].decode(errors="replace").split(" ")
        shown = " ".join(w[:40] for w in words[:6])
        lines.append(f"    {int(entry['duration']) / 1000:.1f} ms: {shown} ...")
    return lines


def prose_prompts(count: int, max_chars: int = 280) -> list[str]:
    """`count` prompts of English prose (CPython's own help texts, in order), up to `max_chars`
    each: a batch's messages then compress as real ones do, not as a repeated line would."""
    from pydoc_data.topics import topics

    words = " ".join(topics[name] for name in sorted(topics)).split()
    prompts, at = [], 0
    while len(prompts) < count:
        text = ""
        while len(text) + len(words[at % len(words)]) + 1 <= max_chars:
            text = f"{text} {words[at % len(words)]}".strip()
            at += 1
        prompts.append(text)
    return prompts
