"""Grafana dashboards and provisioning: valid JSON, PromQL that parses, only contract metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from telemetry.exemplars import EXEMPLAR_HISTOGRAMS, TRACE_ID
from tests.ops.promql import (
    PROMETHEUS_LABELS,
    PROMETHEUS_SYNTHETIC,
    analyse,
    contract,
    dashboard_expressions,
    dashboard_legend_labels,
    dashboard_metric_names,
    dashboard_panels,
    read_metric_names,
    recorded_labels,
    recording_rules,
    rule_expressions,
)
from tests.ops.tools import (
    COMPOSE_FILE,
    DASHBOARD_FILES,
    DASHBOARDS,
    require_tool,
    run_tool,
)

PROVISIONING = DASHBOARDS / "provisioning"
DATASOURCES = PROVISIONING / "datasources"
PROVIDERS = PROVISIONING / "dashboards"
MAIN_DASHBOARD = DASHBOARDS / "salon-reports.json"


def panel(title: str) -> dict[str, Any]:
    for found in dashboard_panels(MAIN_DASHBOARD):
        if found["title"] == title:
            return found
    raise AssertionError(f"no panel {title!r} in {MAIN_DASHBOARD.name}")


def provisioned_datasources() -> dict[str, dict[str, Any]]:
    sources = {}
    for path in sorted(DATASOURCES.glob("*.yml")):
        for source in yaml.safe_load(path.read_text())["datasources"]:
            sources[source["uid"]] = source
    return sources


def test_dashboards_are_valid_json_with_unique_ids() -> None:
    assert DASHBOARD_FILES, f"no dashboard JSON in {DASHBOARDS}"
    uids = set()
    for path in DASHBOARD_FILES:
        dashboard = json.loads(path.read_text())
        assert dashboard["uid"]
        assert dashboard["uid"] not in uids
        uids.add(dashboard["uid"])
        assert dashboard["title"]
        assert dashboard.get("id") is None, "a provisioned dashboard must not carry a database id"
        ids = [found["id"] for found in dashboard_panels(path)]
        assert len(ids) == len(set(ids)), f"duplicate panel ids in {path.name}"
        for found in dashboard_panels(path):
            assert {"x", "y", "w", "h"} <= set(found["gridPos"]), found["title"]


def test_every_panel_uses_a_provisioned_datasource() -> None:
    sources = provisioned_datasources()
    for path in DASHBOARD_FILES:
        for found in dashboard_panels(path):
            if found["type"] == "row":
                continue
            for holder in [found, *found.get("targets", [])]:
                datasource = holder.get("datasource")
                assert isinstance(datasource, dict), f"{found['title']}: no datasource"
                assert datasource["uid"] in sources, f"{found['title']}: unknown {datasource}"
                assert datasource["type"] == sources[datasource["uid"]]["type"]


def test_every_promql_expression_parses(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    expressions = dashboard_expressions()
    assert len(expressions) >= 15
    rules = [
        {"record": f"dashboard:expression_{index}", "expr": expr}
        for index, (_, expr) in enumerate(expressions)
    ]
    rule_file = tmp_path / "dashboard-expressions.rules.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = run_tool([promtool, "check", "rules", str(rule_file)])
    index = {f"dashboard:expression_{i}": where for i, (where, _) in enumerate(expressions)}
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n(rule names: {index})"


def test_a_broken_expression_is_caught(tmp_path: Path) -> None:
    """The parse check above can fail: promtool rejects a bad expression."""
    promtool = require_tool("promtool")
    rule_file = tmp_path / "broken.rules.yml"
    rule_file.write_text(
        yaml.safe_dump(
            {"groups": [{"name": "x", "rules": [{"record": "x:y", "expr": "sum(rate(x[5m])"}]}]}
        )
    )
    assert run_tool([promtool, "check", "rules", str(rule_file)]).returncode != 0


def test_dashboards_and_rules_read_only_contract_metrics() -> None:
    """Every metric read is in telemetry/README.md (the lead checks them against /metrics)."""
    names = dashboard_metric_names()
    assert names, "no metric found: the extraction is broken"
    unknown = {
        name: sorted(where)
        for name, where in read_metric_names().items()
        if name not in contract().series and name not in PROMETHEUS_SYNTHETIC
    }
    assert not unknown, f"metrics not in the contract (telemetry/README.md): {unknown}"
    assert "up" not in names


def test_dashboards_and_rules_use_only_contract_labels_and_values() -> None:
    terms = contract()
    # `worker`: /metrics labels every series with the worker that recorded it (telemetry/README.md)
    # `slo`: set by the recording rules of alerts/slo.rules.yml
    allowed = terms.labels | PROMETHEUS_LABELS | {"worker"} | recorded_labels()
    for where, expr in rule_expressions() + dashboard_expressions():
        analysis = analyse(expr)
        assert analysis.labels <= allowed, f"{where}: unknown labels {analysis.labels - allowed}"
        for label, op, value in analysis.matchers:
            if label not in terms.values:
                continue
            listed = value.split("|") if op in {"=~", "!~"} else [value]
            unknown = set(listed) - terms.values[label]
            assert not unknown, f"{where}: {label} has no value {unknown} in the contract"
    for where, label in dashboard_legend_labels():
        assert label in allowed, f"{where}: legend uses unknown label {label}"


def test_every_contract_metric_is_on_a_dashboard() -> None:
    families = {
        name.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")
        for name in contract().series
    }
    shown = {
        name.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")
        for _, expr in dashboard_expressions()
        for name in analyse(expr).metrics
    }
    assert families <= shown, f"metrics without a panel: {families - shown}"


@pytest.mark.parametrize(
    "title",
    [
        "Request rate by route",
        "5xx error ratio by route",
        "Latency p95 by route",
        "Query time p95 by query",
        "Cache hit rate by report",
        "Connection pool: in use vs max",
        "Connection pool: waiting requests",
        "Connection pool: timeouts",
        "Memory vs limit",
        "Slow traces in Jaeger (≥ 500 ms)",
        "Freshness lag p50/p99",
        "Change stream backlog and retained WAL",
        "Change stream state",
        "Error budget left (30 days)",
        "Error budget burn rate",
    ],
)
def test_required_panel_exists_with_data(title: str) -> None:
    found = panel(title)
    assert found["targets"], title


@pytest.mark.parametrize(
    ("title", "threshold"),
    [
        ("Query time p95 by query", 0.5),
        ("Cache hit rate by report", 0.7),
        ("Freshness lag p50/p99", 5),
        ("Change stream backlog and retained WAL", 1024**3),
        ("Error budget burn rate", 14.4),
        ("Error budget burn rate", 6),
        ("Error budget burn rate", 1),
    ],
)
def test_threshold_lines(title: str, threshold: float) -> None:
    defaults = panel(title)["fieldConfig"]["defaults"]
    steps = [step["value"] for step in defaults["thresholds"]["steps"]]
    assert threshold in steps, f"{title}: no {threshold} threshold"
    assert defaults["custom"]["thresholdsStyle"]["mode"] != "off", f"{title}: line not drawn"


def test_memory_panel_draws_the_limit_and_the_alert_line() -> None:
    exprs = [target["expr"] for target in panel("Memory vs limit")["targets"]]
    assert any("process_memory_usage_bytes" in expr for expr in exprs)
    assert any(expr.startswith("max(reports_memory_limit_bytes") for expr in exprs)
    assert any(expr.startswith("0.8 * ") for expr in exprs)


def test_pool_panel_shows_in_use_against_max() -> None:
    exprs = " ".join(t["expr"] for t in panel("Connection pool: in use vs max")["targets"])
    assert 'db_client_connection_state="used"' in exprs
    assert "db_client_connection_max" in exprs


def test_slow_requests_link_to_their_traces_in_jaeger() -> None:
    links = panel("Latency p95 by route")["fieldConfig"]["defaults"]["links"]
    slow = [link for link in links if "minDuration=500ms" in link["url"]]
    assert slow, "no link from the latency panel to the slow traces"
    assert slow[0]["url"].startswith("${jaeger_ui}/search?service=salon-reports")
    assert "${__field.labels.http_route}" in slow[0]["url"]
    table = panel("Slow traces in Jaeger (≥ 500 ms)")
    (target,) = table["targets"]
    assert table["datasource"]["type"] == "jaeger"
    assert target["queryType"] == "search"
    assert target["service"] == "salon-reports"
    assert target["minDuration"] == "500ms"


@pytest.mark.parametrize(
    ("title", "histogram"),
    [
        ("Latency p95 by route", "http_server_request_duration_seconds_bucket"),
        ("Query time p95 by query", "db_client_operation_duration_seconds_bucket"),
    ],
)
def test_latency_panels_show_the_exemplars_linked_to_jaeger(title: str, histogram: str) -> None:
    targets = panel(title)["targets"]
    assert targets
    for target in targets:
        assert histogram in target["expr"]
        assert target.get("exemplar") is True, f"{title}: exemplars not shown"
        assert target["datasource"]["uid"] == "prometheus"
    # The label the service's exemplars carry is the one the data source links to Jaeger.
    destinations = provisioned_datasources()["prometheus"]["jsonData"][
        "exemplarTraceIdDestinations"
    ]
    assert {(d["name"], d["datasourceUid"]) for d in destinations} == {(TRACE_ID, "jaeger")}
    assert histogram.removesuffix("_bucket") in EXEMPLAR_HISTOGRAMS.values()


# -- provisioning -----------------------------------------------------------------------------


def test_datasources_point_at_the_compose_services() -> None:
    sources = provisioned_datasources()
    assert sources["prometheus"]["type"] == "prometheus"
    assert sources["prometheus"]["url"] == "http://prometheus:9090"
    assert sources["prometheus"].get("isDefault") is True
    assert sources["jaeger"]["type"] == "jaeger"
    assert sources["jaeger"]["url"] == "http://jaeger:16686"
    destinations = sources["prometheus"]["jsonData"]["exemplarTraceIdDestinations"]
    assert {d["datasourceUid"] for d in destinations} == {"jaeger"}


def test_dashboard_provider_reads_the_directory_compose_mounts() -> None:
    (provider_file,) = sorted(PROVIDERS.glob("*.yml"))
    (provider,) = yaml.safe_load(provider_file.read_text())["providers"]
    assert provider["type"] == "file"
    assert provider.get("allowUiUpdates") is False, "dashboards are edited in files, not the UI"
    grafana = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["grafana"]
    mounts = {}
    for volume in grafana["volumes"]:
        source, target = volume.split(":")[:2]
        mounts[target] = (COMPOSE_FILE.parent / source).resolve()
    assert mounts.get(provider["options"]["path"]) == DASHBOARDS.resolve()
    assert mounts.get("/etc/grafana/provisioning/datasources") == DATASOURCES.resolve()
    assert mounts.get("/etc/grafana/provisioning/dashboards") == PROVIDERS.resolve()


def test_grafana_home_dashboard_is_a_provisioned_file() -> None:
    grafana = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["grafana"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    (provider_file,) = sorted(PROVIDERS.glob("*.yml"))
    (provider,) = yaml.safe_load(provider_file.read_text())["providers"]
    directory = provider["options"]["path"]
    assert home.startswith(directory + "/")
    assert (DASHBOARDS / home[len(directory) + 1 :]).resolve() == MAIN_DASHBOARD.resolve()


def test_error_budget_panels_read_the_slo_recording_rules() -> None:
    """Budget left over the SLO's 30 days, burn rates over the alerts' long windows: both
    from the ratios alerts/slo.rules.yml records, divided by the recorded budget."""
    recorded = recording_rules()
    left = analyse(" ".join(t["expr"] for t in panel("Error budget left (30 days)")["targets"]))
    assert left.metrics == {"slo:sli_error:ratio_rate30d", "slo:error_budget:ratio"}
    burn = panel("Error budget burn rate")["targets"]
    read = set().union(*(analyse(target["expr"]).metrics for target in burn))
    assert read == {
        "slo:sli_error:ratio_rate1h",
        "slo:sli_error:ratio_rate6h",
        "slo:sli_error:ratio_rate3d",
        "slo:error_budget:ratio",
    }
    assert (left.metrics | read) <= set(recorded)
    assert all("{{slo}}" in target["legendFormat"] for target in burn)
