"""The PromQL reader behind the metric-name checks: it must find what an expression reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.ops.promql import (
    analyse,
    contract,
    dashboard_expressions,
    dashboard_metric_names,
    substitute_variables,
)


def test_metrics_labels_and_matchers() -> None:
    analysis = analyse(
        "histogram_quantile(0.95, sum by (db_query_summary, le) "
        '(rate(db_client_operation_duration_seconds_bucket{job="salon-reports"}[5m]))) > 0.5'
        ' and on(job) group_left(instance) absent(up{job=~"a|b"}) offset 1h30m'
    )
    assert analysis.metrics == {"db_client_operation_duration_seconds_bucket", "up"}
    assert analysis.labels == {"db_query_summary", "le", "job", "instance"}
    assert analysis.matchers == [("job", "=", "salon-reports"), ("job", "=~", "a|b")]
    assert analysis.functions == {"histogram_quantile", "sum", "rate", "absent"}


def test_aggregation_with_a_trailing_or_leading_clause_is_no_metric() -> None:
    assert analyse("max without (pid) (x) / sum(y) by (job)").metrics == {"x", "y"}


def test_strings_with_quotes_and_subqueries() -> None:
    analysis = analyse(r'max_over_time(rate(a{b="x\"y",c!~`z.*`}[1m])[30m:1m]) * 60 + count(d)')
    assert analysis.metrics == {"a", "d"}
    assert analysis.matchers == [("b", "=", 'x"y'), ("c", "!~", "z.*")]


def test_name_matcher_counts_as_a_metric() -> None:
    assert analyse('{__name__="reports_cache_requests_total"}').metrics == {
        "reports_cache_requests_total"
    }


def test_unknown_function_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown PromQL function"):
        analyse("rates(x[5m])")


def test_grafana_variables() -> None:
    assert substitute_variables("rate(x[$__rate_interval])") == "rate(x[5m])"
    assert substitute_variables('x{a="${v}"}', {"v": "1"}) == 'x{a="1"}'
    with pytest.raises(ValueError, match="unknown Grafana variable"):
        substitute_variables('x{job="$job"}')


def test_contract_table_is_read() -> None:
    terms = contract()
    assert "http_server_request_duration_seconds_bucket" in terms.series
    assert "db_client_connection_timeouts_total" in terms.series
    assert terms.series["reports_cache_requests_total"] == {"report_name", "cache_result"}
    assert terms.values["cache_result"] == {"hit", "miss", "stale", "error", "bypass"}
    assert "db_query_summary" not in terms.values  # "e.g.": not an exhaustive list


def test_a_metric_outside_the_contract_would_be_reported(tmp_path: Path) -> None:
    dashboard = {
        "uid": "x",
        "title": "x",
        "panels": [
            {
                "id": 1,
                "title": "p",
                "datasource": {"type": "prometheus", "uid": "prometheus"},
                "targets": [
                    {"refId": "A", "expr": "rate(not_a_real_metric_total[$__rate_interval])"}
                ],
            }
        ],
    }
    path = tmp_path / "x.json"
    path.write_text(json.dumps(dashboard))
    ((_, expr),) = dashboard_expressions([path])
    assert analyse(expr).metrics - set(contract().series) == {"not_a_real_metric_total"}


def test_dashboard_metric_names_leaves_out_prometheus_own_series() -> None:
    names = dashboard_metric_names()
    assert "up" not in names
    assert {"db_client_operation_duration_seconds_bucket", "reports_cache_requests_total"} <= names
