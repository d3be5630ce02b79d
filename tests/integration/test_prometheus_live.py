"""The shipped alert rules and dashboard against a real Prometheus scraping a real worker, while
the sandbox throttles and then a budget runs out (tests/load/bench_alerts.py: the scenario, and
`./run bench alerts` prints its figures). Needs Debian's `prometheus` (.ci/run installs it)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import SECRET, StartWorker, metrics_port
from tests.load.bench_alerts import (
    WORKER_SETTINGS,
    held_anywhere,
    run_scenario,
    short_rules,
)
from workers.sandbox import Sandbox
from workers.sandbox.services import PrometheusServer, prometheus_binary

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        prometheus_binary() is None,
        reason="prometheus is not installed (apt-get install prometheus; .ci/run installs it)",
    ),
]

# What the scenario may set off, and nothing else: no starvation, no waits, no worker down.
EXPECTED = {
    "RunwareThrottling",
    "DailyBudgetNearlySpent",
    "DailyBudgetSpent",
    "DeadLettersGrowing",
    "RunwareCallsFailing",
}


def test_alerts_fire_and_every_panel_has_data(
    start_worker: StartWorker, sandbox: Sandbox, tmp_path: Path
) -> None:
    worker = start_worker("prometheus", **WORKER_SETTINGS)
    target = f"127.0.0.1:{metrics_port(worker)}"
    with PrometheusServer([target], [short_rules(tmp_path)]) as prometheus:
        report = run_scenario(worker.app, prometheus, sandbox.configure, SECRET)
        assert "RunwareThrottling" in report.fired_after_throttling_s, report.lines()
        for alert in ("DailyBudgetNearlySpent", "DailyBudgetSpent", "DeadLettersGrowing"):
            assert alert in report.fired_after_lifted_s, report.lines()
        assert report.ever_fired <= EXPECTED, report.lines()
        # $0.02 holds 15 calls of $0.0013: the rest are refused, each with its reason.
        assert report.outcomes == {"succeeded": 15, "BudgetExceeded": 12}
        empty = [(title, expr) for title, expr, series in report.panels if not series]
        assert not empty, empty
        assert len(report.panels) >= 20
        # The secret scan reads what Prometheus holds: an account label is found, the key not.
        assert held_anywhere(prometheus, '"account": "bulk"', time.time() - 600, time.time())
        assert not report.secret_in_prometheus
