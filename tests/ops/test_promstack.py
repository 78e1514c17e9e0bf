"""The paging path for real: Prometheus scrapes a stub /metrics, evaluates the project's rules
and Alertmanager delivers the page to a webhook in the test, then its resolution.

The stub stands in for the service (the end-to-end test with the real service builds on the
same helpers, tests/ops/promstack.py). Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Self

import pytest
import yaml

from tests.ops.promstack import (
    LoopbackServer,
    PromStack,
    QuietHandler,
    WebhookReceiver,
    alertmanager_test_config,
    compress_expr,
    compress_rules,
    format_duration,
    parse_duration,
    wait_until,
)
from tests.ops.tools import PROMETHEUS_CONFIG, RULE_FILES, assert_tool_ok, require_tool, run_tool

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10)


class StubExporter:
    """A /metrics target on 127.0.0.1 for the length of a ``with``; subclasses say what it
    exposes at each scrape (``exposition``)."""

    def __init__(self) -> None:
        self._last = time.monotonic()
        self._lock = threading.Lock()
        stub = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                body = stub.exposition().encode()
                self.send_response(200 if self.path == "/metrics" else 404)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._http = LoopbackServer(Handler)
        self.target = self._http.address

    def __enter__(self) -> Self:
        self._http.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.__exit__(*exc)

    def exposition(self) -> str:
        raise NotImplementedError


class StubMetrics(StubExporter):
    """A /metrics endpoint with one query's duration histogram, slow or fast on demand.

    At every scrape it adds the executions of the time elapsed since the previous one:
    ``slow`` is 20 executions/s of 0.6 s (p95 in the (0.5, 0.75] bucket), ``fast`` is
    200 executions/s of 20 ms. Counters only ever grow, as a real process's do.
    """

    QUERY = "report.dashboard"

    def __init__(self, mode: str = "slow") -> None:
        self.mode = mode
        self.scrapes = 0
        self._observations: dict[float, float] = {}  # duration -> executions
        super().__init__()

    def exposition(self) -> str:
        with self._lock:
            now = time.monotonic()
            elapsed, self._last = now - self._last, now
            duration, rate = (0.6, 20.0) if self.mode == "slow" else (0.02, 200.0)
            self._observations[duration] = self._observations.get(duration, 0.0) + rate * elapsed
            self.scrapes += 1
            observations = dict(self._observations)
        labels = f'db_system_name="postgresql",db_query_summary="{self.QUERY}"'
        name = "db_client_operation_duration_seconds"
        lines = [
            f"# HELP {name} Duration of database client operations.",
            f"# TYPE {name} histogram",
        ]
        for bound in (*BUCKETS, float("inf")):
            count = sum(n for d, n in observations.items() if d <= bound)
            le = "+Inf" if bound == float("inf") else repr(float(bound)).removesuffix(".0")
            lines.append(f'{name}_bucket{{{labels},le="{le}"}} {int(count)}')
        total = sum(observations.values())
        lines.append(f"{name}_sum{{{labels}}} {sum(d * n for d, n in observations.items())}")
        lines.append(f"{name}_count{{{labels}}} {int(total)}")
        return "\n".join(lines) + "\n"


@pytest.mark.timeout(90)
def test_slow_queries_page_the_webhook_then_resolve() -> None:
    started = time.monotonic()
    with (
        StubMetrics(mode="fast") as stub,
        WebhookReceiver() as webhook,
        PromStack(stub.target, webhook.url, time_scale=30) as stack,
    ):
        assert sorted(group["name"] for group in stack.rule_groups()) == [
            "salon-reports",
            "salon-reports-slo",
            "salon-reports-slo-budget",
        ]
        # Healthy: several evaluations with data, longer than the compressed `for` of 2 s,
        # and not even a pending alert (SalonReportsDown's absent(up) included).
        for _ in range(6):
            assert stack.alerts() == [], stack.alerts()
            time.sleep(0.5)
        assert stack.query('up{job="salon-reports"}')[0]["value"][1] == "1"

        stub.mode = "slow"
        breached = time.monotonic()
        firing = webhook.wait_for(
            "SalonReportsSlowQueries", "firing", timeout=35, db_query_summary=stub.QUERY
        )
        paged_after = time.monotonic() - breached
        assert firing["receiver"] == "pager", firing
        assert firing["labels"]["severity"] == "page"
        assert firing["labels"]["job"] == "salon-reports"
        assert firing["annotations"]["summary"].startswith(f"Query {stub.QUERY} is slow: p95 ")
        # The links are rendered from the external labels set once in alerts/prometheus.yml.
        bases = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["global"]["external_labels"]
        assert firing["annotations"]["runbook_url"] == (
            f"{bases['runbook_base_url']}#salonreportsslowqueries"
        )
        assert firing["annotations"]["dashboard_url"].startswith(
            f"{bases['grafana_url']}/d/salon-reports-overview?viewPanel="
        )
        # The compressed `for` is 10 s: a page much sooner would mean it was not waited for.
        assert 9 < paged_after < 30, paged_after

        stub.mode = "fast"
        webhook.wait_for("SalonReportsSlowQueries", "resolved", timeout=35)

        others = {
            alert["labels"]["alertname"]
            for alert in webhook.alerts()
            if alert["labels"]["alertname"] != "SalonReportsSlowQueries"
        }
        assert not others, f"unexpected alerts: {others}\n{stack.logs()}"
    assert stub.scrapes >= 10
    assert time.monotonic() - started < 60


class StubRequests(StubExporter):
    """A /metrics endpoint with the report requests' duration histogram, up or down on demand.

    At every scrape it adds the requests of the time elapsed since the previous one: ``up``
    is 50 requests/s answered 200 in 20 ms, ``down`` 50 requests/s answered 503 in 5 ms. The
    503 series appears with the first 503, as it does in the service.
    """

    ROUTE = "/api/v1/optimized-reports/dashboard"

    def __init__(self) -> None:
        self.mode = "up"
        self._counts: dict[str, float] = {}  # status code -> requests
        super().__init__()

    def exposition(self) -> str:
        with self._lock:
            now = time.monotonic()
            elapsed, self._last = now - self._last, now
            status = "200" if self.mode == "up" else "503"
            self._counts[status] = self._counts.get(status, 0.0) + 50.0 * elapsed
            counts = dict(self._counts)
        name = "http_server_request_duration_seconds"
        lines = [f"# HELP {name} Duration of HTTP server requests.", f"# TYPE {name} histogram"]
        for status, count in sorted(counts.items()):
            labels = (
                f'http_request_method="GET",http_route="{self.ROUTE}",'
                f'http_response_status_code="{status}"'
            )
            duration = 0.02 if status == "200" else 0.005
            for bound in (*BUCKETS, float("inf")):
                le = "+Inf" if bound == float("inf") else repr(float(bound)).removesuffix(".0")
                inside = count if duration <= bound else 0
                lines.append(f'{name}_bucket{{{labels},le="{le}"}} {int(inside)}')
            lines.append(f"{name}_sum{{{labels}}} {count * duration}")
            lines.append(f"{name}_count{{{labels}}} {int(count)}")
        return "\n".join(lines) + "\n"


@pytest.mark.timeout(120)
def test_a_total_outage_burns_the_availability_budget_and_pages() -> None:
    """alerts/slo.rules.yml in a real Prometheus (windows compressed 60 times: 1 h is 60 s, the
    short windows 5 s and 30 s): healthy traffic pages nobody; every request answered 503
    pages SalonReportsErrorBudgetBurn for the availability SLO, with its runbook and dashboard
    links, and it resolves once the short windows have seen the recovery."""
    with (
        StubRequests() as stub,
        WebhookReceiver() as webhook,
        PromStack(stub.target, webhook.url, time_scale=60) as stack,
    ):
        # Healthy for a while: the ratio is 0 (no 5xx series at all), not absent, and no alert.
        assert wait_until(
            lambda: stack.query('slo:sli_error:ratio_rate5m{slo="availability"} == 0'), 15
        ), stack.logs()
        for _ in range(6):
            assert stack.alerts() == [], stack.alerts()
            time.sleep(0.5)

        stub.mode = "down"
        firing = webhook.wait_for("SalonReportsErrorBudgetBurn", "firing", timeout=40)
        assert firing["receiver"] == "pager", firing
        assert firing["labels"]["slo"] == "availability"
        assert firing["labels"]["severity"] == "page"
        bases = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["global"]["external_labels"]
        assert firing["annotations"]["runbook_url"] == (
            f"{bases['runbook_base_url']}#salonreportserrorbudgetburn"
        )
        assert firing["annotations"]["dashboard_url"].startswith(
            f"{bases['grafana_url']}/d/salon-reports-overview?viewPanel="
        )
        # A 503 answers fast: the latency SLO (answered requests over 100 ms) is not burnt.
        latency = [alert for alert in webhook.alerts() if alert["labels"].get("slo") == "latency"]
        assert latency == [], latency

        stub.mode = "up"
        webhook.wait_for("SalonReportsErrorBudgetBurn", "resolved", timeout=60, slo="availability")


# -- the helpers themselves -------------------------------------------------------------------


def test_durations_round_trip() -> None:
    assert parse_duration("5m") == 300
    assert parse_duration("1h30m") == 5400
    assert parse_duration("500ms") == 0.5
    assert format_duration(10) == "10s"
    assert format_duration(2.5) == "2500ms"
    with pytest.raises(ValueError, match="duration"):
        parse_duration("5 minutes")


def test_compression_divides_windows_and_for_durations(tmp_path: Path) -> None:
    assert compress_expr("rate(x[5m]) > 0 and increase(y[10m])", 30) == (
        "rate(x[10s]) > 0 and increase(y[20s])"
    )
    assert compress_expr("max_over_time(rate(x[1m])[30m:1m])", 30) == (
        "max_over_time(rate(x[5s])[60s:2s])"
    )
    written = compress_rules(RULE_FILES, tmp_path, time_scale=30)
    original = [
        rule
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]
    compressed = [
        rule
        for path in written
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]
    assert len(compressed) == len(original)
    for rule, source in zip(compressed, original, strict=True):
        assert rule.get("alert") == source.get("alert")
        assert rule.get("record") == source.get("record")
        if "for" in source:
            expected = max(parse_duration(source["for"]) / 30, 1)
            assert parse_duration(rule["for"]) == expected
        for window in ("5m", "10m", "1h", "3d", "30d"):
            assert f"[{window}]" not in rule["expr"]
        assert rule.get("annotations") == source.get("annotations")
        assert rule.get("labels") == source.get("labels")
    promtool = require_tool("promtool")
    assert_tool_ok(run_tool([promtool, "check", "rules", *map(str, written)]))


def test_alertmanager_test_config_keeps_the_routing_and_pages_the_given_url() -> None:
    config = alertmanager_test_config("http://127.0.0.1:1/alerts")
    urls = {
        webhook["url"]
        for receiver in config["receivers"]
        for webhook in receiver.get("webhook_configs", [])
    }
    assert urls == {"http://127.0.0.1:1/alerts"}
    assert config["route"]["group_wait"] == "1s"
    assert all(route["group_wait"] == "1s" for route in config["route"]["routes"])
    assert {route["receiver"] for route in config["route"]["routes"]} == {"pager", "tickets"}
