"""What the alert rules and the dashboards read is really in the service's ``/metrics``.

A small workload runs on the real app (its lifespan, the test PostgreSQL, a private Redis):
every report, a cache miss then a hit of each cached one, the uncached realtime report, a few
4xx (no token, a forbidden scope, an unknown salon, a malformed date). Then the exposition at
``GET /metrics`` must carry:

- every metric name that a rule or a dashboard reads (``dashboard_metric_names()``);
- every series of the contract table in ``telemetry/README.md``, with exactly its labels
  (plus the ``otel_scope_*`` labels the OpenTelemetry exporter adds to every series);
- every label that a rule or a dashboard aggregates or matches on, and every label value it
  matches exactly (``le="0.5"``, ``db_client_connection_state="used"``);
- for a label whose values the contract enumerates, no value outside that list.

The paging test (tests/ops/test_paging.py) proves the same names reach a real Prometheus
over HTTP.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.config import Settings
from tests.conftest import Api, RunningApi, app_settings
from tests.factories import small_dataset
from tests.ops.promql import (
    PROMETHEUS_LABELS,
    analyse,
    contract,
    dashboard_expressions,
    dashboard_metric_names,
    rule_expressions,
)
from tests.support import redis_process

PREFIX = "/api/v1/optimized-reports"
CACHED_REPORTS = ("dashboard", "bookings", "professionals")
# Labels the OpenTelemetry Prometheus exporter puts on every series (instrumentation scope).
EXPORTER_LABELS = frozenset(
    {"otel_scope_name", "otel_scope_version", "otel_scope_schema_url", "worker"}
)


@dataclass
class Exposition:
    """The samples of one ``/metrics`` answer: series name -> the label sets seen."""

    series: dict[str, list[dict[str, str]]] = field(default_factory=lambda: defaultdict(list))

    @classmethod
    def parse(cls, text: str) -> Exposition:
        exposition = cls()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                exposition.series[sample.name].append(dict(sample.labels))
        return exposition

    @property
    def names(self) -> set[str]:
        return set(self.series)

    def labels(self, name: str) -> set[str]:
        return set().union(*(set(labels) for labels in self.series[name]))

    def values(self, label: str) -> set[str]:
        return {
            labels[label] for every in self.series.values() for labels in every if label in labels
        }


@pytest.fixture
async def exposition(
    base_settings: Settings, database_url: str, db: psycopg.Connection
) -> AsyncIterator[Exposition]:
    """``/metrics`` after a small workload over every report.

    The data is written before the app starts: a booking written while it runs invalidates
    its salon's cache entries (asynchronously), which would turn an expected hit into a
    miss. The Redis is a private one: no other test run can flush it under this one.
    """
    ids = small_dataset(db)
    with redis_process() as redis:
        settings = app_settings(base_settings, database_url, redis.url)
        async with RunningApi(settings) as api:
            yield await _workload(api, ids)


async def _workload(api: Api, ids: dict[str, int]) -> Exposition:
    admin = api.token("admin")
    owner = api.token("owner", salons=[ids["lisbon"]])
    for report in CACHED_REPORTS:
        for expected in ("MISS", "HIT"):
            response = await api.report(report, admin, salon_id=ids["lisbon"])
            assert response.status_code == 200, response.text
            assert response.headers["X-Cache"] == expected, (report, response.headers)
        platform = await api.report(report, admin)  # platform-wide: another key, a miss
        assert platform.status_code == 200, platform.text
        assert platform.headers["X-Cache"] == "MISS"
    realtime = await api.report("realtime", owner, salon_id=ids["lisbon"])
    assert realtime.status_code == 200, realtime.text
    assert realtime.headers["X-Cache"] == "BYPASS"

    client_errors = [
        (await api.get(f"{PREFIX}/dashboard"), 401),  # no token
        (await api.report("dashboard", owner, salon_id=ids["newyork"]), 403),  # not its salon
        (await api.report("bookings", admin, salon_id=999_999), 404),  # no such salon
        (await api.report("professionals", admin, start="2024-02-30"), 422),  # no such day
    ]
    for response, status in client_errors:
        assert response.status_code == status, response.text

    # Twice: a request is recorded when it ends, so the first scrape is in the second one.
    assert (await api.get("/metrics")).status_code == 200
    response = await api.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return Exposition.parse(response.text)


async def test_every_metric_the_rules_and_dashboards_read_is_exposed(
    exposition: Exposition,
) -> None:
    wanted = dashboard_metric_names()
    assert len(wanted) >= 10, f"the PromQL extraction found too little: {sorted(wanted)}"
    missing = sorted(wanted - exposition.names)
    assert not missing, (
        f"read by the rules or dashboards but not in /metrics: {missing}\n"
        f"exposed: {sorted(exposition.names)}"
    )


async def test_every_contract_series_is_exposed_with_its_labels(exposition: Exposition) -> None:
    terms = contract()
    missing = sorted(set(terms.series) - exposition.names)
    assert not missing, f"listed in telemetry/README.md but not in /metrics: {missing}"
    for name, labels in terms.series.items():
        live = exposition.labels(name) - EXPORTER_LABELS - {"le"}
        assert live == set(labels), (
            f"{name}: /metrics has labels {sorted(live)}, telemetry/README.md lists "
            f"{sorted(labels)}"
        )


async def test_the_workload_shows_in_the_samples(exposition: Exposition) -> None:
    """Not just the names: the labels carry the values the panels group by."""
    statuses = exposition.values("http_response_status_code")
    assert {"200", "401", "403", "404", "422"} <= statuses, statuses
    routes = exposition.values("http_route")
    assert {f"{PREFIX}/{report}" for report in (*CACHED_REPORTS, "realtime")} <= routes, routes
    assert "/metrics" in routes
    queries = exposition.values("db_query_summary")
    assert {f"report.{report}" for report in (*CACHED_REPORTS, "realtime")} <= queries, queries
    results = {
        (labels["report_name"], labels["cache_result"])
        for labels in exposition.series["reports_cache_requests_total"]
    }
    for report in CACHED_REPORTS:
        assert {(report, "miss"), (report, "hit")} <= results, results
    assert exposition.values("db_client_connection_pool_name") == {"primary"}
    assert exposition.values("db_system_name") == {"postgresql"}


async def test_every_label_and_exact_value_the_promql_uses_is_exposed(
    exposition: Exposition,
) -> None:
    every_label = set().union(*(exposition.labels(name) for name in exposition.names))
    for where, expr in rule_expressions() + dashboard_expressions():
        analysis = analyse(expr)
        missing = analysis.labels - every_label - (PROMETHEUS_LABELS - {"le"})
        assert not missing, f"{where}: labels {sorted(missing)} are on no series of /metrics"
        for label, op, value in analysis.matchers:
            # Exact matches only: `!=` may exclude a value this workload does not produce
            # (cache_result="bypass" needs Redis down); the contract test checks those.
            if label in PROMETHEUS_LABELS - {"le"} or op != "=":
                continue
            assert value in exposition.values(label), (
                f"{where}: matches {label}{op}{value!r}, a value /metrics never has "
                f"(it has {sorted(exposition.values(label))})"
            )


async def test_label_values_are_those_the_contract_lists(exposition: Exposition) -> None:
    """Where telemetry/README.md enumerates a label's values, /metrics has no other (the
    realtime report, never cached, is no cache lookup: no report_name="realtime")."""
    for label, allowed in contract().values.items():
        unknown = exposition.values(label) - allowed
        assert not unknown, f"{label}: /metrics has {sorted(unknown)}, not in telemetry/README.md"
