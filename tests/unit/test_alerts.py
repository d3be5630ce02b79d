"""deploy/prometheus/: the rules pass `promtool check`, their unit tests pass, every alert is
tested both firing and not firing, and those tests fail when the rule they test is broken.
Needs `promtool` (Debian's `prometheus` package; .ci/run installs it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

PROMETHEUS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not installed (apt-get install prometheus; .ci/run installs it)",
)


def _promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_the_rules_and_the_compose_config_pass_promtool_check() -> None:
    for args in (("check", "rules", "alerts.yml"), ("check", "config", "prometheus.yml")):
        done = _promtool(*args)
        assert done.returncode == 0, done.stdout + done.stderr


def test_the_rule_unit_tests_pass() -> None:
    done = _promtool("test", "rules", "alerts.test.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    cases = yaml.safe_load((PROMETHEUS / "alerts.test.yml").read_text())["tests"]
    checks = [check for case in cases for check in case["alert_rule_test"]]
    for rule in _rules():
        mine = [check for check in checks if check["alertname"] == rule["alert"]]
        assert any(check["exp_alerts"] for check in mine), f"{rule['alert']} never fires"
        assert any(not check["exp_alerts"] for check in mine), f"{rule['alert']} always fires"
        assert "summary" in rule["annotations"], rule["alert"]


@pytest.mark.parametrize("alert", [rule["alert"] for rule in _rules()] if PROMTOOL else [])
@pytest.mark.parametrize("broken", ["vector(0) > 1", "vector(1)"])
def test_the_unit_tests_fail_when_a_rule_never_or_always_fires(
    alert: str, broken: str, tmp_path: Path
) -> None:
    """Each alert's expression replaced by one that never fires, then by one that always does:
    the unit tests must catch both."""
    text = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    for group in text["groups"]:
        for rule in group["rules"]:
            if rule["alert"] == alert:
                rule["expr"] = broken
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(text))
    shutil.copy(PROMETHEUS / "alerts.test.yml", tmp_path / "alerts.test.yml")
    done = _promtool("test", "rules", "alerts.test.yml", cwd=tmp_path)
    assert done.returncode != 0, f"{alert} = {broken!r} passes its unit tests"
    assert f"alertname: {alert}," in done.stdout + done.stderr
