"""The cache hit rate is one figure: the stats, the alert rule, the dashboard panel and the page.

telemetry/README.md ("Cache hit rate") defines it once. Here one mix of cache outcomes is
recorded by the app's own instrumentation, ``/metrics`` is scraped and ``/performance/stats``
read; then the PromQL of the alert ``SalonReportsCacheHitRateLow`` and of the panel *Cache hit
rate by report* is evaluated by ``promtool`` on the scraped counters (as a 5-minute increase
from zero). The stats' figure, the rule's, the panel's (overall and per report) and the
definition's (``telemetry.stats.hit_rate``) must be the same number, on the same window and
floor.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from telemetry.stats.hit_rate import (
    HIT_RATE_MIN,
    HIT_RATE_MIN_LOOKUPS,
    HIT_RATE_WINDOW_SECONDS,
    cache_hit_rate,
)
from tests.conftest import Api
from tests.ops.promql import dashboard_panels
from tests.ops.tools import DASHBOARDS, RULE_FILES, require_tool

PREFIX = "/api/v1/optimized-reports"
PAGE_JS = Path(__file__).resolve().parents[2] / "service" / "static" / "page.js"
# Outcomes per report: errors count as lookups the cache did not serve, bypass as none.
MIX = {
    "dashboard": {"hit": 37, "stale": 5, "miss": 11, "error": 3, "bypass": 40},
    "bookings": {"hit": 4, "stale": 0, "miss": 9, "error": 6, "bypass": 2},
    "professionals": {"hit": 0, "stale": 1, "miss": 2, "error": 0, "bypass": 0},
}
WINDOW = f"{round(HIT_RATE_WINDOW_SECONDS / 60)}m"


def hit_rate_rule() -> dict[str, Any]:
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if rule.get("alert") == "SalonReportsCacheHitRateLow":
                    return dict(rule)
    raise AssertionError("no SalonReportsCacheHitRateLow rule")


def rule_parts() -> tuple[str, float, str, float]:
    """The rule as ``(<hit rate>) < low and <lookups per second> >= floor``."""
    expr = " ".join(hit_rate_rule()["expr"].split())
    match = re.fullmatch(r"(\(.*\)) < ([0-9.]+) and (sum by \(job\) \(.*\)) >= ([0-9.]+)", expr)
    assert match, f"the rule's shape changed: {expr}"
    return match[1], float(match[2]), match[3], float(match[4])


def panel_expressions() -> dict[str, str]:
    """The panel's expressions by legend: ``{{report_name}}`` and ``all reports``."""
    for panel in dashboard_panels(DASHBOARDS / "salon-reports.json"):
        if panel.get("title") == "Cache hit rate by report":
            return {target["legendFormat"]: target["expr"] for target in panel["targets"]}
    raise AssertionError("no panel 'Cache hit rate by report'")


def promql_values(
    series: dict[str, float], expressions: dict[str, float | None], tmp: Path
) -> None:
    """Assert with promtool that each expression equals its value, on ``series`` scraped as
    a 5-minute increase from zero, evaluated at the end of the window."""
    rules = tmp / "none.rules.yml"
    rules.write_text("groups: []\n")
    tests = []
    for expr, value in expressions.items():
        # Equal within 1e-9 (float rounding in PromQL's division is no failure), one series.
        check = f"sum(abs(({expr}) - {value!r}) < bool 1e-9)"
        tests.append({"expr": check, "eval_time": WINDOW, "exp_samples": [{"value": 1}]})
    spec = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": WINDOW,
                "input_series": [
                    {"series": labels, "values": f"0 {count:g}"} for labels, count in series.items()
                ],
                "promql_expr_test": tests,
            }
        ],
    }
    path = tmp / "hit-rate.test.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = subprocess.run(
        [require_tool("promtool"), "test", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def test_stats_rule_panel_and_page_agree_on_the_same_scraped_data(
    api: Api, tmp_path: Path
) -> None:
    telemetry = api.resources.telemetry
    for report, outcomes in MIX.items():
        for result, count in outcomes.items():
            for _ in range(count):
                # What the telemetry middleware does for each report request.
                telemetry.stats.record_cache(report, result)
                telemetry.instruments.count_cache(report, result)

    scraped: dict[tuple[str, str], float] = {}
    metrics = await api.get("/metrics")
    for family in text_string_to_metric_families(metrics.text):
        for sample in family.samples:
            if sample.name == "reports_cache_requests_total":
                scraped[(sample.labels["report_name"], sample.labels["cache_result"])] = (
                    sample.value
                )
    response = await api.get(f"{PREFIX}/performance/stats", api.token("ops"))
    stats = response.json()

    def defined(report: str | None) -> float | None:
        def total(result: str) -> int:
            return sum(
                int(value)
                for (name, outcome), value in scraped.items()
                if outcome == result and report in (None, name)
            )

        return cache_hit_rate(total("hit"), total("stale"), total("miss"), total("error"))

    # The scrape holds exactly the mix; the stats follow the definition on it.
    assert {key: int(value) for key, value in scraped.items() if value} == {
        (report, result): count
        for report, outcomes in MIX.items()
        for result, count in outcomes.items()
        if count
    }
    cache = stats["last_5m"]["cache"]
    assert cache["hit_rate"] == pytest.approx(defined(None), abs=1e-12)
    for report in MIX:
        assert cache["by_report"][report]["hit_rate"] == pytest.approx(defined(report), abs=1e-12)
    lookups = sum(
        count
        for outcomes in MIX.values()
        for result, count in outcomes.items()
        if result != "bypass"
    )
    assert cache["lookups"] == lookups
    overall = defined(None)
    assert overall is not None

    # The stats' alert: same threshold, same floor, same window.
    alert = next(entry for entry in stats["alerts"] if entry["name"] == "cache_hit_rate")
    assert alert["threshold"] == HIT_RATE_MIN
    assert alert["value"] == pytest.approx(overall, abs=1e-12)
    assert alert["breached"] is (lookups >= HIT_RATE_MIN_LOOKUPS and overall < HIT_RATE_MIN)
    assert stats["window_seconds"] == HIT_RATE_WINDOW_SECONDS

    # The rule and the panel, evaluated by Prometheus's own engine on the scraped counters.
    rate, low, lookups_per_second, floor = rule_parts()
    assert low == HIT_RATE_MIN
    assert floor * HIT_RATE_WINDOW_SECONDS == pytest.approx(HIT_RATE_MIN_LOOKUPS)
    assert set(re.findall(r"\[(\w+)\]", rate + lookups_per_second)) == {WINDOW}
    panel = panel_expressions()
    assert set(re.findall(r"\[(\w+)\]", " ".join(panel.values()))) == {WINDOW}
    series = {
        f'reports_cache_requests_total{{job="salon-reports", instance="test:8000", '
        f'report_name="{report}", cache_result="{result}"}}': value
        for (report, result), value in scraped.items()
        if value
    }
    expected: dict[str, float | None] = {
        rate: overall,
        lookups_per_second: lookups / HIT_RATE_WINDOW_SECONDS,
        panel["all reports"]: overall,
    }
    for report in MIX:
        by_report = panel["{{report_name}}"].replace(
            'job="salon-reports"', f'job="salon-reports", report_name="{report}"'
        )
        expected[f"sum({by_report})"] = defined(report)
    promql_values(series, expected, tmp_path)

    # The page draws the stats' figure against the stats' threshold, nothing of its own.
    page = PAGE_JS.read_text()
    assert "stats.last_5m.cache.hit_rate" in page
    assert 'entry.name === "cache_hit_rate").threshold' in page
    assert not re.search(r"hit_?rate[^\n]*=\s*0\.\d", page, re.IGNORECASE)
    json.dumps(stats)
