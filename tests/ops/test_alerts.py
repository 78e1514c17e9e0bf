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
    OPERATIONS_DOC,
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
    "SalonReportsTenantThrottled",  # one tenant over its share for long (issue 19)
    "SalonReportsErrorBudgetBurn",  # an SLO's budget: 14.4x over 1h & 5m, 6x over 6h & 30m
    "SalonReportsErrorBudgetBurnSlow",  # 1x over 3d & 6h (a ticket)
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
    for key in ("summary", "description", "runbook_url", "dashboard_url"):
        assert str(annotations.get(key, "")).strip(), f"{name} has no {key} annotation"
    assert 'job="salon-reports"' in rule["expr"], f"{name} does not select the service's job"


# -- runbooks (docs/operations.md) and dashboard links ------------------------------------------

RUNBOOK_URL = re.compile(r"\{\{ \$externalLabels\.runbook_base_url \}\}#([a-z0-9_-]+)")
DASHBOARD_URL = re.compile(
    r"\{\{ \$externalLabels\.grafana_url \}\}/d/([A-Za-z0-9_-]+)\?viewPanel=(\d+)"
)


def github_anchor(heading: str) -> str:
    """The anchor a Git host renders for a Markdown heading (GitHub's rule)."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def runbook_sections() -> dict[str, tuple[str, str]]:
    """anchor -> (heading, text) of every section of docs/operations.md."""
    sections = {}
    for match in re.finditer(
        r"^#{2,4} ([^\n]+)\n(.*?)(?=^#{2,4} |\Z)", OPERATIONS_DOC.read_text(), re.M | re.S
    ):
        sections[github_anchor(match.group(1))] = (match.group(1).strip(), match.group(2))
    return sections


def panels_named(text: str) -> list[str]:
    return re.findall(r'panel "([^"]+)"', " ".join(text.split()))


def test_the_link_bases_are_set_once_in_the_prometheus_config() -> None:
    labels = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["global"]["external_labels"]
    assert labels["runbook_base_url"].endswith("/docs/operations.md")
    assert labels["grafana_url"].startswith("http")


@pytest.mark.parametrize("name", sorted(alert_rules()))
def test_runbook_url_points_at_the_alerts_own_section(name: str) -> None:
    match = RUNBOOK_URL.fullmatch(alert_rules()[name]["annotations"].get("runbook_url", ""))
    assert match, f"{name}'s runbook_url is not <runbook_base_url>#<anchor>"
    sections = runbook_sections()
    assert match.group(1) in sections, f"docs/operations.md has no section #{match.group(1)}"
    heading, text = sections[match.group(1)]
    assert heading == name, f"{name}'s runbook_url points at the section of {heading}"
    assert "Jaeger" in text, f"{name}'s runbook says nothing about traces"


@pytest.mark.parametrize("name", sorted(alert_rules()))
def test_runbook_names_panels_that_exist_and_dashboard_url_opens_the_first(name: str) -> None:
    panels_by_title = {
        panel["title"]: (json.loads(path.read_text())["uid"], panel["id"])
        for path in DASHBOARD_FILES
        for panel in dashboard_panels(path)
    }
    dashboards = {json.loads(path.read_text())["title"] for path in DASHBOARD_FILES}
    _, text = runbook_sections()[name.lower()]
    panels = panels_named(text)
    assert panels, f"{name}'s runbook names no dashboard panel to look at first"
    for panel in panels:
        assert panel in panels_by_title, (
            f"{name}'s runbook names a panel that does not exist: {panel}"
        )
    for dashboard in re.findall(r'dashboard "([^"]+)"', " ".join(text.split())):
        assert dashboard in dashboards, f"{name}'s runbook names an unknown dashboard {dashboard}"
    match = DASHBOARD_URL.fullmatch(alert_rules()[name]["annotations"].get("dashboard_url", ""))
    assert match, f"{name}'s dashboard_url is not <grafana_url>/d/<uid>?viewPanel=<id>"
    assert (match.group(1), int(match.group(2))) == panels_by_title[panels[0]], (
        f"{name}'s dashboard_url does not open panel {panels[0]!r}, the runbook's first look"
    )


def test_every_runbook_section_belongs_to_an_alert() -> None:
    """A renamed or deleted alert leaves no orphaned runbook behind."""
    start = OPERATIONS_DOC.read_text().index("## Runbooks")
    section = OPERATIONS_DOC.read_text()[start:].split("\n## ", 1)[0]
    headings = re.findall(r"^### (SalonReports\w+)$", section, re.M)
    assert sorted(headings) == sorted(alert_rules())


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
