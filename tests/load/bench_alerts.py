"""The alerts and the dashboard against a real Prometheus (issue 17). Prints figures; asserts
nothing (tests/integration/test_prometheus_live.py runs the same scenario and asserts).

  python -m tests.load.bench_alerts        (or ./run bench alerts)

A real Prometheus scrapes a real worker every second and evaluates deploy/prometheus/alerts.yml
(every `for:` shortened to 2 s, NoWorkerUp's to 15 s: promtool's unit tests check the real
durations) while the
sandbox throttles every call for a while and then a daily budget runs out. Printed: when each
alert fired, counted from the start of the throttling and from its end (the budget alerts), and
every dashboard query (deploy/grafana/enhance-worker.json) with the series it returned.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from celery import Celery

from tests.producer import backend_app

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "enhance-worker.json"
SHORT_FOR = "2s"
# A scrape slower than its 1 s timeout on a busy machine reads as the worker down: NoWorkerUp
# keeps a longer wait here, so that it fires only when the worker really is gone.
SHORT_FOR_EXCEPT = {"NoWorkerUp": "15s"}
# What Grafana puts in for the dashboard's variables, for a Prometheus that scrapes every second.
VARIABLES = {"$__rate_interval": "15s", "$job": "enhance-worker", "$account": ".*"}
FLEET_BUDGET_USD, ACCOUNT_BUDGET_USD = 0.02, 0.015
# The worker under test: a rate and a cap (drawn by the dashboard), two budgets, retries enough
# to outlast the throttling.
WORKER_SETTINGS = {
    "RUNWARE_RATE_LIMIT": "20",
    "RUNWARE_MAX_IN_FLIGHT": "4",
    "RUNWARE_DAILY_BUDGET_USD": str(FLEET_BUDGET_USD),
    "RUNWARE_ACCOUNT_DAILY_BUDGET_USD": str(ACCOUNT_BUDGET_USD),
    "RUNWARE_MAX_RETRIES": "100",
    "RUNWARE_COOLDOWN_S": "0.2",
    "RUNWARE_COOLDOWN_MAX_S": "1",
    "WORKER_CONCURRENCY": "8",
    "METRICS_PORT": "0",
}


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL as Grafana sends it) for every query of the dashboard."""
    board = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            queries.append((panel["title"], expr))
    return queries


def short_rules(directory: Path) -> Path:
    """alerts.yml with every `for:` shortened, written in `directory`."""
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = SHORT_FOR_EXCEPT.get(rule["alert"], SHORT_FOR)
    path = directory / "alerts.yml"
    path.write_text(yaml.safe_dump(rules))
    return path


@dataclass
class Report:
    throttling_s: float = 0.0  # how long the sandbox answered 429 to everything
    fired_after_throttling_s: dict[str, float] = field(default_factory=dict)
    fired_after_lifted_s: dict[str, float] = field(default_factory=dict)
    ever_fired: set[str] = field(default_factory=set)
    panels: list[tuple[str, str, int]] = field(default_factory=list)  # title, query, series
    outcomes: dict[str, int] = field(default_factory=dict)
    secret_in_prometheus: bool = False

    def lines(self) -> list[str]:
        out = [f"the sandbox answered 429 to every call for {self.throttling_s:.1f} s"]
        for name, after in sorted(self.fired_after_throttling_s.items(), key=lambda i: i[1]):
            out.append(f"  {name} fired {after:.1f} s after the throttling began")
        for name, after in sorted(self.fired_after_lifted_s.items(), key=lambda i: i[1]):
            out.append(f"  {name} fired {after:.1f} s after it ended (jobs ran into the budget)")
        out.append(f"alerts that fired: {', '.join(sorted(self.ever_fired))}")
        out.append(f"jobs: {self.outcomes}")
        empty = [p for p in self.panels if not p[2]]
        out.append(
            f"dashboard queries with data: {len(self.panels) - len(empty)} of {len(self.panels)}"
        )
        for title, expr, series in self.panels:
            out.append(f"  {series:3d} series  {title}: {expr}")
        out.append(f"the API key in any series Prometheus holds: {self.secret_in_prometheus}")
        return out


def _wait_firing(
    prometheus: Any, names: set[str], since: float, deadline_s: float, seen: dict[str, float]
) -> None:
    """Poll the alerts until every one of `names` fires (or the deadline); note when."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and not names <= set(seen):
        for name in prometheus.firing() - set(seen):
            seen[name] = time.monotonic() - since
        time.sleep(0.2)


def run_scenario(
    producer: Celery,
    prometheus: Any,
    configure: Callable[..., None],
    secret: str,
    throttle_alerts: set[str] | None = None,
    budget_alerts: set[str] | None = None,
) -> Report:
    """Throttle, lift, run into the budgets; then read the alerts and every dashboard query."""
    throttle_alerts = throttle_alerts or {"RunwareThrottling"}
    budget_alerts = budget_alerts or {
        "DailyBudgetNearlySpent",
        "DailyBudgetSpent",
        "DeadLettersGrowing",
    }
    # From the worker's first scrape: until then NoWorkerUp fires, rightly.
    deadline = time.monotonic() + 30
    while (
        not prometheus.api("query", query='up{job="enhance-worker"} == 1')["result"]
        or prometheus.firing()
    ):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no scrape of the worker, or {prometheus.firing()} firing")
        time.sleep(0.2)
    report, started = Report(), time.time()

    def send(who: str, priority: str, count: int, **extra: str) -> list[Any]:
        kwargs = {"account": who, "priority": priority, **extra}
        return [
            producer.send_task(
                "tasks.enhance_prompt", kwargs={"prompt": f"{who} prompt {n}", **kwargs}
            )
            for n in range(count)
        ]

    # Throttled: a few jobs (their reservations stay while they retry, within the budgets).
    configure(rate_429=1.0, latency_s=0.05)
    throttled = time.monotonic()
    jobs = send("web", "interactive", 3, deliveryMethod="async") + send("web", "interactive", 2)
    _wait_firing(prometheus, throttle_alerts, throttled, 60, report.fired_after_throttling_s)
    configure(rate_429=0.0)
    lifted = time.monotonic()
    report.throttling_s = lifted - throttled
    # Then more than the budgets hold: a backlog of batch jobs next to interactive ones.
    jobs += send("web", "interactive", 8) + send("bulk", "batch", 14)
    for job in jobs:
        try:
            job.get(timeout=120, propagate=True)
            outcome = "succeeded"
        except Exception as exc:
            outcome = type(exc).__name__
        report.outcomes[outcome] = report.outcomes.get(outcome, 0) + 1
    _wait_firing(prometheus, budget_alerts, lifted, 60, report.fired_after_lifted_s)
    time.sleep(3)  # a few scrapes after the last job
    end = time.time()
    fired = prometheus.query_range('ALERTS{alertstate="firing"}', started, end)
    report.ever_fired = {series["metric"]["alertname"] for series in fired}
    for title, expr in panel_queries():
        series = prometheus.query_range(expr, started, end)
        report.panels.append((title, expr, len(series)))
    report.secret_in_prometheus = held_anywhere(prometheus, secret, started, end)
    return report


def held_anywhere(prometheus: Any, text: str, start: float, end: float) -> bool:
    """Whether `text` is in any series name, label or value Prometheus holds for the worker."""
    everything = prometheus.query_range('{job="enhance-worker"}', start, end, step=5)
    return text in json.dumps(everything)


def main() -> None:
    from tests.load.common import KEY, private_redis
    from workers.sandbox import Sandbox, SandboxConfig
    from workers.sandbox.services import PrometheusServer, WorkerProcess, prometheus_binary

    if prometheus_binary() is None:
        print("prometheus is not installed: apt-get install prometheus")
        return
    with (
        private_redis() as server,
        Sandbox(config=SandboxConfig(api_key=KEY, async_delay_s=0.3)) as sandbox,
        tempfile.TemporaryDirectory() as directory,
    ):
        env = {
            "REDIS_URL": server.url(),
            "RUNWARE_API_URL": sandbox.url,
            "RUNWARE_API_KEY": KEY,
            "LOG_LEVEL": "INFO",
            **WORKER_SETTINGS,
        }
        worker = WorkerProcess(env, name="alerts").start()
        try:
            port = worker.metrics_port()
            rules = short_rules(Path(directory))
            with PrometheusServer([f"127.0.0.1:{port}"], [rules]) as prometheus:
                producer = backend_app(broker=server.url(), backend=server.url())
                report = run_scenario(producer, prometheus, sandbox.configure, KEY)
                producer.close()
        finally:
            worker.stop()
    for line in report.lines():
        print(line)


if __name__ == "__main__":
    main()
