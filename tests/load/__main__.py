"""`python -m tests.load NAME [args]` (or `./run bench NAME [args]`): run one benchmark.

Benchmarks print figures and assert nothing; the test suite never times anything.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "rate": ("tests.load.bench_rate_limit", "fleet-wide rate limit, in-flight cap, lease recovery"),
    "fairness": ("tests.load.bench_fairness", "fair share between accounts, priority, weights"),
    "throughput": ("tests.load.bench_throughput", "the project's worker against a bare Celery one"),
    "latency": (
        "tests.load.bench_latency",
        "interactive latency by arrival pattern; asyncio waits; results behind 5,000 pending",
    ),
    "chaos": ("tests.load.bench_chaos", "SIGKILLs at any instant, a Redis restart: nothing lost"),
    "failover": ("tests.load.bench_failover", "Redis Sentinel failover under a global rate"),
    "capacity": ("tests.load.bench_capacity", "limiter and ledger decisions one Redis carries"),
    "partition": ("tests.load.bench_partition", "worker hosts in network namespaces, one cut off"),
    "alerts": (
        "tests.load.bench_alerts",
        "the alert rules and the dashboard against a real Prometheus",
    ),
    "memory": (
        "tests.load.bench_memory",
        "bytes per finished job by key family, MB held per job/s, a soak",
    ),
    "sizes": (
        "tests.load.bench_sizes",
        "megabyte batches: every result back, Redis's SLOWLOG read",
    ),
    "operations": (
        "tests.load.bench_operations",
        "a stop's duration, idle and busy; what a refused API key costs",
    ),
    "webhooks": (
        "tests.load.bench_webhooks",
        "videos finished by polling against by Runware's webhook: calls, slots, lag",
    ),
    "money": (
        "tests.load.bench_money",
        "budgets hold, unsettled calls settle, one request per slot",
    ),
}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
        print("usage: python -m tests.load NAME [args]\n")
        for name, (_, what) in BENCHMARKS.items():
            print(f"  {name:<10} {what}")
        return 2
    module, _ = BENCHMARKS[sys.argv[1]]
    sys.argv = [module, *sys.argv[2:]]
    importlib.import_module(module).main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
