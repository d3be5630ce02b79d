"""deploy/grafana/enhance-worker.json and deploy/prometheus/alerts.yml read only metrics the
worker exports, aggregate the fleet-wide gauges with max (every worker reports the same value),
and the dashboard takes its data source from a variable. The live check that every query
returns data is tests/integration/test_prometheus_live.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
BOARD = json.loads((ROOT / "deploy" / "grafana" / "enhance-worker.json").read_text())
RULES = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
SOURCES = "".join(
    (ROOT / path).read_text()
    for path in ("tasks/metrics.py", "workers/metrics.py", "workers/webhooks.py")
)
EXPORTED = set(re.findall(r'"(enhance_[a-z_]+)"', SOURCES))
# The gauges workers/metrics.py reads from Redis: the same value from every worker.
FLEET_GAUGES = set(
    re.findall(r'"(enhance_[a-z_]+)"', (ROOT / "workers" / "metrics.py").read_text())
)
SUFFIXES = ("_bucket", "_count", "_sum", "_total")  # (a Counter's name gains _total)


def _queries() -> list[str]:
    panels = [t["expr"] for p in BOARD["panels"] for t in p.get("targets", [])]
    rules = [r["expr"] for g in RULES["groups"] for r in g["rules"]]
    return panels + rules


def _metric(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix) and name.removesuffix(suffix) in EXPORTED:
            return name.removesuffix(suffix)
    return name


def test_every_query_reads_metrics_the_worker_exports() -> None:
    assert len(EXPORTED) > 25
    assert len(FLEET_GAUGES) > 15
    for expr in _queries():
        for name in re.findall(r"\benhance_[a-z_]+", expr):
            assert _metric(name) in EXPORTED, f"{name} in {expr!r} is not exported"


def test_fleet_wide_gauges_are_never_summed() -> None:
    for expr in _queries():
        for name in re.findall(r"\benhance_[a-z_]+", expr):
            if name in FLEET_GAUGES:
                summed = re.search(rf"\bsum\s*(?:by\s*\([^)]*\)\s*)?\(\s*{name}\b", expr)
                assert not summed, f"{name} is summed over workers in {expr!r}"


def test_the_data_source_is_a_variable() -> None:
    variables = {v["name"]: v for v in BOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    targets = [t for p in BOARD["panels"] for t in p.get("targets", [])]
    assert targets
    for panel in BOARD["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    assert all(t["datasource"]["uid"] == "${datasource}" for t in targets)


def test_the_panels_answer_the_issues_questions() -> None:
    titles = {p["title"] for p in BOARD["panels"]}
    for wanted in (
        "Calls per second by outcome",
        "Call latency",
        "Spend per hour by account",
        "Budget left",
        "In flight vs cap",
        "Waiting jobs by account",
        "Dwell time p90 by account",
        "Retries and re-schedules",
        "Dead letters",
    ):
        assert wanted in titles
    ids = [p["id"] for p in BOARD["panels"]]
    assert len(ids) == len(set(ids))
