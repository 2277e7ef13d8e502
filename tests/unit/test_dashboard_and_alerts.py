"""contrib/grafana and contrib/prometheus: rules pass `promtool test rules`, and every metric
the dashboard and the rules use is one the daemon exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from repmgr_vip.app.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "contrib" / "grafana" / "repmgr-vip.json"
RULES = ROOT / "contrib" / "prometheus" / "alerts.yml"
RULES_TEST = ROOT / "contrib" / "prometheus" / "alerts.test.yml"
METRIC = re.compile(r"\brepmgr_vip_[a-z_]+\b")
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "info": ("_info",),
            "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("", "_sum", "_count", "_created")}


def exported_names() -> set[str]:
    """Sample names the daemon's registry exposes (labelled families have none until used)."""
    registry = Metrics("127.0.0.1", 0).registry
    return {family.name + suffix for family in registry.collect()
            for suffix in SUFFIXES[family.type]}


def _promtool() -> str:
    for candidate in (Path(sys.executable).parent / "promtool", shutil.which("promtool")):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    if os.environ.get("CI") == "true" or os.environ.get("RVLAB_REQUIRE") == "1":
        pytest.fail("promtool missing: run `make setup`")
    pytest.skip("promtool missing: run `make setup`")


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def test_every_metric_used_is_exported() -> None:
    exported = exported_names()
    assert {"repmgr_vip_held", "repmgr_vip_conflicts_total",
            "repmgr_vip_loop_seconds_bucket"} <= exported
    for path in (DASHBOARD, RULES):
        used = set(METRIC.findall(path.read_text()))
        assert used, path
        assert used <= exported, (path.name, sorted(used - exported))


def test_dashboard_has_the_panels_operators_need() -> None:
    text = " ".join(_dashboard_exprs())
    for metric in ("repmgr_vip_held", "repmgr_vip_conflicts_total", "repmgr_vip_actions_total",
                   "repmgr_vip_loop_seconds", "repmgr_vip_peers_reachable"):
        assert metric in text, metric


def test_alert_rules_pass_promtool(tmp_path: Path) -> None:
    promtool = _promtool()
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                           text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run([promtool, "test", "rules", RULES_TEST.name], cwd=RULES_TEST.parent,
                          capture_output=True, text=True, check=False)
    assert test.returncode == 0, test.stdout + test.stderr


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses them as recording rules, Grafana's variables filled in."""
    promtool = _promtool()
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, expr in enumerate(_dashboard_exprs()):
        filled = (expr.replace("$__rate_interval", "5m").replace("$job", "repmgr-vip")
                  .replace("$instance", ".*"))
        lines += [f"      - record: dashboard_query_{i}", f"        expr: {json.dumps(filled)}"]
    rules = tmp_path / "dashboard-rules.yml"
    rules.write_text("\n".join(lines) + "\n")
    check = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True,
                           text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
