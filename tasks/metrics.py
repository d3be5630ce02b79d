"""Prometheus metrics, recorded where things happen (client, dispatcher, ledger, task outcomes).

Names follow Prometheus conventions (`enhance_` prefix, `_total` counters, base units). The
worker serves them on METRICS_PORT (workers/metrics.py); with a threads pool that one process is
the whole worker. For a prefork pool, set PROMETHEUS_MULTIPROC_DIR to an empty directory before
starting the worker and prometheus_client aggregates every child process.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram

from config.keys import PRIORITY_CLASSES

# The account label of everything beyond METRICS_TOP_ACCOUNTS: no account can be named so
# (labels are letters, digits and _.:@- only).
OTHER = "(other)"

RUNWARE_CALLS = Counter(
    "enhance_runware_calls_total",
    "Tasks sent to Runware, by task type and the outcome of the request that carried them.",
    ["task_type", "outcome"],
)
RUNWARE_LATENCY = Histogram(
    "enhance_runware_call_duration_seconds",
    "Duration of one HTTP call to Runware, from request to parsed answer.",
    ["task_type"],
    buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 8, 13, 21, 34, 60),
)
WEBHOOK_LAG = Histogram(
    "enhance_webhook_lag_seconds",
    "From a webhook's arrival at the receiver to the end of the job it finished",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
)
WEBHOOK_MISSED = Counter(
    "enhance_webhooks_missed",
    "Async calls that expected Runware's webhook and were finished by the fallback poll",
)
RUNWARE_BATCH_SIZE = Histogram(
    "enhance_runware_request_tasks",
    "Tasks carried by one HTTP request to Runware (RUNWARE_BATCH_MAX, RUNWARE_BATCH_WINDOW_MS).",
    buckets=(1, 2, 3, 4, 6, 8, 10, 16, 25, 50, 100),
)
UNREAD_QUEUE = Gauge(
    "enhance_unread_queue_jobs",
    "Jobs waiting in the fleet's own queue while no live worker reads it (each started with a "
    "-Q that leaves it out); 0 while it is read.",
    ["queue"],
)
UNKNOWN_TASK_JOBS = Gauge(
    "enhance_unknown_task_jobs",
    "Jobs parked because no live worker of the fleet registers their task (`enhance-worker "
    "unknown`); they go back by themselves once one does.",
)
RUNWARE_IN_FLIGHT = Gauge(
    "enhance_runware_in_flight_calls",
    "Calls to Runware open right now in this worker.",
)
LIMIT_WAIT = Histogram(
    "enhance_rate_limit_wait_seconds",
    "Time a call waited for the fleet's limits and its fair share, by account and priority.",
    ["account", "priority"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
)
SPENT = Counter(
    "enhance_spent_usd_total",
    "USD recorded in the ledger by this worker, by account (each taskUUID once).",
    ["account"],
)
JOBS = Counter(
    "enhance_jobs_total",
    "Jobs finished by this worker, by task and outcome (success, failure).",
    ["task", "outcome"],
)
RETRIES = Counter(
    "enhance_job_retries_total",
    "Retries scheduled after a transient failure, by task.",
    ["task"],
)
RESCHEDULES = Counter(
    "enhance_job_reschedules_total",
    "Jobs re-scheduled to wait (async polling, a 409 answered by a poll) without using a retry, "
    "by task.",
    ["task"],
)
BUDGET_REFUSALS = Counter(
    "enhance_budget_refusals_total",
    "Jobs refused without a call because a daily budget is spent (BudgetExceeded), by budget "
    "(fleet, account).",
    ["scope"],
)
for _scope in ("fleet", "account"):  # at 0 from the start: increase() sees the first refusal
    BUDGET_REFUSALS.labels(_scope)
DEAD_LETTERS = Counter(
    "enhance_dead_letters_total",
    "Jobs recorded in the dead-letter list by this worker, by task.",
    ["task"],
)


class AccountLabels:
    """Which accounts have series of their own in this process's per-account metrics
    (LIMIT_WAIT, SPENT): at most `limit` at a time, first come; one with no activity for
    `idle_s` seconds gives its place back and its series are removed; every other account is
    counted under OTHER. So one worker's /metrics stays bounded at any number of accounts."""

    def __init__(self, limit: int = 100, idle_s: float = 900.0) -> None:
        self.limit = limit
        self.idle_s = idle_s
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self._swept = time.monotonic()

    def configure(self, limit: int, idle_s: float) -> None:
        with self._lock:
            self.limit, self.idle_s = limit, idle_s

    def label(self, account: str) -> str:
        now = time.monotonic()
        with self._lock:
            if account in self._seen:
                self._seen[account] = now
                return account
            if now - self._swept >= min(60.0, self.idle_s / 10):
                self._sweep(now)
            if len(self._seen) < self.limit:
                self._seen[account] = now
                return account
            return OTHER

    def tracked(self) -> list[str]:
        with self._lock:
            return sorted(self._seen)

    def _sweep(self, now: float) -> None:
        self._swept = now
        for account, seen in list(self._seen.items()):
            if now - seen > self.idle_s:
                del self._seen[account]
                _remove(SPENT, account)
                for priority in PRIORITY_CLASSES:
                    _remove(LIMIT_WAIT, account, priority)


def _remove(metric: Counter | Histogram, *labels: str) -> None:
    with contextlib.suppress(KeyError):  # it never had a series with these labels
        metric.remove(*labels)


ACCOUNTS = AccountLabels()


def start_at_zero(task_names: Iterable[str]) -> None:
    """Create the per-task counters the alerts take increase() of at 0, so that the first
    dead letter or retry of a fresh worker counts (a series born at 1 shows no increase)."""
    for name in task_names:
        DEAD_LETTERS.labels(name)
        RETRIES.labels(name)
