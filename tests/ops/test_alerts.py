"""Alert rules (promtool), their unit tests, Alertmanager (amtool) and the Prometheus config."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.config import Settings
from tests.ops.promql import dashboard_panels
from tests.ops.tools import (
    ALERTMANAGER_CONFIG,
    ALERTS,
    DASHBOARD_FILES,
    PROMETHEUS_CONFIG,
    RULE_FILES,
    RULE_TESTS,
    assert_tool_ok,
    require_tool,
    run_tool,
)

REQUIRED_ALERTS = {
    "SalonReportsDown",  # service down
    "SalonReportsHighErrorRate",  # 5xx rate
    "SalonReportsSlowQueries",  # query time > 500 ms
    "SalonReportsDbPoolExhausted",  # connection pool exhaustion
    "SalonReportsDbPoolTimeouts",
    "SalonReportsCacheHitRateLow",  # cache hit rate < 70 %
    "SalonReportsMemoryHigh",  # memory > 80 %
    "SalonReportsFreshnessLagHigh",  # freshness lag (commit -> applied p99 > 5 s)
    "SalonReportsChangeStreamStalled",  # a stuck consumer records no lag: backlog, nothing applied
    "SalonReportsReplicationSlotWalRetention",  # slot WAL retention > 1 GiB
    "SalonReportsChangeStreamLost",  # reports answer 503 until `rollups rebuild`
    "SalonReportsNoChangeConsumer",
}
SEVERITIES = {"page", "warning"}


def alert_rules() -> dict[str, dict[str, Any]]:
    rules = {}
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    rules[rule["alert"]] = rule
    return rules


def test_rule_files_exist() -> None:
    assert RULE_FILES, f"no *.rules.yml in {ALERTS}"
    assert RULE_TESTS, f"no promtool unit tests in {ALERTS / 'tests'}"


def test_promtool_check_rules() -> None:
    promtool = require_tool("promtool")
    assert_tool_ok(run_tool([promtool, "check", "rules", *map(str, RULE_FILES)]))


def test_promtool_unit_tests_pass() -> None:
    promtool = require_tool("promtool")
    result = run_tool([promtool, "test", "rules", *map(str, RULE_TESTS)], timeout=120)
    assert_tool_ok(result)
    assert "FAILED" not in result.stdout + result.stderr


def test_every_required_alert_exists() -> None:
    assert set(alert_rules()) >= REQUIRED_ALERTS


@pytest.mark.parametrize("name", sorted(REQUIRED_ALERTS))
def test_alert_is_actionable(name: str) -> None:
    rule = alert_rules()[name]
    assert rule["labels"]["severity"] in SEVERITIES
    assert rule.get("for"), f"{name} has no `for:` and would page on a single evaluation"
    annotations = rule["annotations"]
    for key in ("summary", "description", "runbook"):
        assert str(annotations.get(key, "")).strip(), f"{name} has no {key} annotation"
    assert "Jaeger" in annotations["runbook"], f"{name}'s runbook says nothing about traces"
    assert 'job="salon-reports"' in rule["expr"], f"{name} does not select the service's job"


def test_runbooks_name_panels_that_exist() -> None:
    titles = {panel["title"] for path in DASHBOARD_FILES for panel in dashboard_panels(path)}
    dashboards = {json.loads(path.read_text())["title"] for path in DASHBOARD_FILES}
    for name, rule in alert_rules().items():
        runbook = rule["annotations"]["runbook"]
        panels = re.findall(r'panel "([^"]+)"', runbook)
        assert panels, f"{name}'s runbook names no dashboard panel to look at first"
        for panel in panels:
            assert panel in titles, f"{name}'s runbook names a panel that does not exist: {panel}"
        for dashboard in re.findall(r'dashboard "([^"]+)"', runbook):
            assert dashboard in dashboards, f"{name}'s runbook names an unknown dashboard"


def _unit_test_cases() -> list[tuple[str, int, list[Any]]]:
    """(alertname, eval_time, exp_alerts) of every alert_rule_test in alerts/tests/."""
    cases = []
    for path in RULE_TESTS:
        document = yaml.safe_load(path.read_text())
        assert document["rule_files"], path
        for rule_file in document["rule_files"]:
            assert (path.parent / rule_file).resolve() in {p.resolve() for p in RULE_FILES}
        for test in document["tests"]:
            for case in test.get("alert_rule_test", []):
                cases.append((case["alertname"], case["eval_time"], case.get("exp_alerts", [])))
    return cases


@pytest.mark.parametrize("name", sorted(REQUIRED_ALERTS))
def test_each_alert_is_tested_firing_and_silent(name: str) -> None:
    cases = [case for case in _unit_test_cases() if case[0] == name]
    assert any(expected for _, _, expected in cases), f"no unit test where {name} fires"
    assert any(not expected for _, _, expected in cases), f"no unit test where {name} is silent"


def test_slow_query_alert_uses_the_services_threshold() -> None:
    threshold_ms = Settings.model_fields["slow_query_ms"].default
    expr = alert_rules()["SalonReportsSlowQueries"]["expr"]
    assert re.search(rf"\)\s*>\s*{threshold_ms / 1000:g}\s*$", expr.strip()), (
        f"the slow-query alert does not use REPORTS_SLOW_QUERY_MS ({threshold_ms} ms): {expr}"
    )


# -- Alertmanager ------------------------------------------------------------------------------


def test_amtool_check_config() -> None:
    amtool = require_tool("amtool")
    assert_tool_ok(run_tool([amtool, "check-config", str(ALERTMANAGER_CONFIG)]))


@pytest.mark.parametrize(("severity", "receiver"), [("page", "pager"), ("warning", "tickets")])
def test_alertmanager_routes_by_severity(severity: str, receiver: str) -> None:
    amtool = require_tool("amtool")
    result = run_tool(
        [
            amtool,
            "config",
            "routes",
            "test",
            f"--config.file={ALERTMANAGER_CONFIG}",
            f"--verify.receivers={receiver}",
            "alertname=SalonReportsSlowQueries",
            f"severity={severity}",
            "job=salon-reports",
        ]
    )
    assert_tool_ok(result)
    assert result.stdout.strip() == receiver


def test_alertmanager_receivers_are_webhooks_that_send_resolutions() -> None:
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    receivers = {receiver["name"]: receiver for receiver in config["receivers"]}
    assert {"pager", "tickets"} <= set(receivers)
    for name in ("pager", "tickets"):
        webhooks = receivers[name].get("webhook_configs", [])
        assert webhooks, f"receiver {name} has no webhook"
        assert all(webhook.get("send_resolved") for webhook in webhooks)
    severities = {rule["labels"]["severity"] for rule in alert_rules().values()}
    routed = {
        match.group(1)
        for route in config["route"]["routes"]
        for matcher in route.get("matchers", [])
        if (match := re.fullmatch(r'severity="?(\w+)"?', matcher.replace(" ", "")))
    }
    assert severities <= routed, f"severities without an explicit route: {severities - routed}"


# -- Prometheus --------------------------------------------------------------------------------


def test_promtool_check_config() -> None:
    promtool = require_tool("promtool")
    result = run_tool([promtool, "check", "config", str(PROMETHEUS_CONFIG)])
    assert_tool_ok(result)
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in result.stdout + result.stderr


def test_prometheus_loads_every_rule_file() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    loaded: set[Path] = set()
    for pattern in config["rule_files"]:
        assert not Path(pattern).is_absolute(), "rule files must resolve next to the config"
        loaded.update(path.resolve() for path in PROMETHEUS_CONFIG.parent.glob(pattern))
    assert loaded == {path.resolve() for path in RULE_FILES}


def test_prometheus_scrapes_the_service_as_the_job_the_rules_select() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert "salon-reports" in jobs
    assert jobs["salon-reports"].get("metrics_path", "/metrics") == "/metrics"
