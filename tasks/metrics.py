"""Prometheus metrics, recorded where things happen (client, dispatcher, ledger, task outcomes).

Names follow Prometheus conventions (`enhance_` prefix, `_total` counters, base units). The
worker serves them on METRICS_PORT (workers/metrics.py); with a threads pool that one process is
the whole worker. For a prefork pool, set PROMETHEUS_MULTIPROC_DIR to an empty directory before
starting the worker and prometheus_client aggregates every child process.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram

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
RUNWARE_BATCH_SIZE = Histogram(
    "enhance_runware_request_tasks",
    "Tasks carried by one HTTP request to Runware (RUNWARE_BATCH_MAX, RUNWARE_BATCH_WINDOW_MS).",
    buckets=(1, 2, 3, 4, 6, 8, 10, 16, 25, 50, 100),
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


def start_at_zero(task_names: Iterable[str]) -> None:
    """Create the per-task counters the alerts take increase() of at 0, so that the first
    dead letter or retry of a fresh worker counts (a series born at 1 shows no increase)."""
    for name in task_names:
        DEAD_LETTERS.labels(name)
        RETRIES.labels(name)
