"""The shipped Prometheus rules and Grafana dashboard: valid, tested, and reading only real metrics.

``promtool`` (Debian's ``prometheus`` package) checks the rules and the example config and runs
the rules' unit tests (``deploy/prometheus/alerts_test.yml``: each alert fires on a synthetic
series that should fire it and not on one that should not).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from activities.metrics import METRIC_NAMES
from tests.conftest import REPO, find_binary

PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "sandbox-runtime.json"
_NAME = re.compile(r"\b((?:sandbox|temporal)_[a-z_]+)")
_SERIES_SUFFIXES = ("_bucket", "_count", "_sum")


def _expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    rules = (PROMETHEUS_DIR / "alerts.yml").read_text()
    exprs += [line.split("expr:", 1)[1] for line in rules.splitlines() if line.strip().startswith("expr:")]
    return exprs


def shipped_metric_names(prefix: str) -> set[str]:
    """The metric names the dashboard and alert rules query (histogram series suffixes removed)."""
    names: set[str] = set()
    for expr in _expressions():
        for name in _NAME.findall(expr):
            if name.startswith(prefix):
                for suffix in _SERIES_SUFFIXES:
                    if name.endswith(suffix) and name != "sandbox_operation_failures_total":
                        name = name.removesuffix(suffix)
                names.add(name)
    return names


def _promtool(*args: str, cwd: Path) -> str:
    done = subprocess.run([find_binary("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_alert_rules_are_valid_and_their_unit_tests_pass() -> None:
    assert "SUCCESS: 5 rules found" in _promtool("check", "rules", "alerts.yml", cwd=PROMETHEUS_DIR)
    assert "SUCCESS" in _promtool("test", "rules", "alerts_test.yml", cwd=PROMETHEUS_DIR)
    _promtool("check", "config", "prometheus.yml", cwd=PROMETHEUS_DIR)


def test_a_broken_rule_is_caught(tmp_path: Path) -> None:
    # Positive control: promtool fails on an expression that does not parse.
    (tmp_path / "bad.yml").write_text("groups:\n  - name: x\n    rules:\n      - alert: X\n        expr: sum(\n")
    done = subprocess.run([find_binary("promtool"), "check", "rules", "bad.yml"], cwd=tmp_path, capture_output=True)
    assert done.returncode != 0


def test_the_dashboard_and_alerts_read_only_metrics_the_runtime_defines() -> None:
    used = shipped_metric_names("sandbox_")
    assert used, "the dashboard queries no sandbox metric"
    assert used <= METRIC_NAMES, sorted(used - METRIC_NAMES)
    # And every metric the runtime defines is shown somewhere.
    assert METRIC_NAMES <= used, sorted(METRIC_NAMES - used)
