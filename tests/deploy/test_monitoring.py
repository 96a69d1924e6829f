"""deploy/monitoring: the Grafana dashboard and the alert rules use only metrics the code exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tasks.metrics import TaskCollector

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
METRIC = re.compile(r"\b(cloudhost_[a-z0-9_]+)\b")
# The suffixes each metric type adds to its samples in the text exposition.
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


@pytest.fixture
def exported(db, provider) -> set[str]:
    """Every sample name /metrics can carry, from the collector's own families."""
    names = set()
    for family in TaskCollector().collect():
        for suffix in SUFFIXES[family.type]:
            names.add(family.name + suffix)
    return names


def dashboard_expressions() -> list[str]:
    dash = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v.get("type") == "query"]
    return exprs


def alert_rules() -> list[dict]:
    doc = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_dashboard_uses_only_exported_metrics(exported):
    exprs = dashboard_expressions()
    used = {m for e in exprs for m in METRIC.findall(e)}
    assert used, "the dashboard queries no metric"
    assert used <= exported, f"not exported by tasks/metrics.py: {sorted(used - exported)}"
    # What the issue asks the dashboard to show, each by the metric that carries it.
    for needed in (
        "cloudhost_task_queue_length",  # queue length
        "cloudhost_task_queue_wait_seconds",  # queue wait
        "cloudhost_tasks_running",  # running ...
        "cloudhost_provider_concurrency_limit",  # ... vs limit
        "cloudhost_tasks_finished_total",  # throughput, error rate
        "cloudhost_task_failures_total",  # error rate
        "cloudhost_task_duration_seconds_bucket",  # durations
        "cloudhost_task_lease_expiries_total",  # resumptions
        "cloudhost_provider_reachable",  # held providers
    ):
        assert needed in used, needed


def test_dashboard_panels_are_well_formed():
    dash = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert p["title"] and p["targets"] and p["datasource"]["uid"] == "${DS_PROMETHEUS}"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))
        # Brackets balance in every expression (a cheap syntax check when promtool is absent).
        for t in p["targets"]:
            for a, b in ("()", "[]", "{}"):
                assert t["expr"].count(a) == t["expr"].count(b), t["expr"]


def test_alert_rules_use_only_exported_metrics_and_cover_the_four_conditions(exported):
    rules = {r["alert"]: r for r in alert_rules()}
    assert set(rules) == {
        "CloudhostProviderUnreachable",
        "CloudhostQueueWaiting",
        "CloudhostErrorRateHigh",
        "CloudhostNoWorkerHeartbeat",
    }
    for name, rule in rules.items():
        used = set(METRIC.findall(rule["expr"]))
        assert used and used <= exported, (name, sorted(used - exported))
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["for"]
    assert "cloudhost_provider_reachable" in rules["CloudhostProviderUnreachable"]["expr"]
    assert "cloudhost_task_queue_wait_seconds" in rules["CloudhostQueueWaiting"]["expr"]
    assert "cloudhost_task_failures_total" in rules["CloudhostErrorRateHigh"]["expr"]
    assert "cloudhost_workers_live" in rules["CloudhostNoWorkerHeartbeat"]["expr"]


def test_a_metric_the_code_does_not_export_is_caught(exported):
    """The name check itself: a renamed metric in an expression is reported."""
    assert not {"cloudhost_task_queue_lenght"} <= exported
    assert "cloudhost_task_queue_length" in exported


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus)")
def test_promtool_checks_and_unit_tests_the_rules():
    check = subprocess.run(
        ["promtool", "check", "rules", "alerts.yml"], cwd=MONITORING, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    # Each alert fires on the series that should raise it and not before (alerts.test.yml).
    unit = subprocess.run(
        ["promtool", "test", "rules", "alerts.test.yml"], cwd=MONITORING, capture_output=True, text=True, timeout=60
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus)")
def test_promtool_parses_every_dashboard_query(tmp_path):
    """Each panel's PromQL, as a recording rule, passes promtool's parser (Grafana variables filled in)."""
    exprs = [e.replace("$provider", ".*") for e in dashboard_expressions() if not e.startswith("label_values(")]
    rules = {
        "groups": [
            {"name": "dashboard", "rules": [{"record": f"dashboard:q{i}", "expr": e} for i, e in enumerate(exprs)]}
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    check = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
