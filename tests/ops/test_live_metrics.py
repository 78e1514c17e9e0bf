"""What the alert rules and the dashboards read is really in the service's ``/metrics``.

A small workload runs on the real app (its lifespan, a PostgreSQL database of this module's
own, a private Redis): every report, a cache miss then a hit of each cached one, the uncached
realtime report, a few 4xx (no token, a forbidden scope, an unknown salon, a malformed date),
then one booking written while the app's own change-stream consumer leads, so that the
freshness lag histogram has a sample. Then the exposition at ``GET /metrics`` must carry:

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

import asyncio
import os
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.changes.consumer import wait_applied
from service.config import Settings
from service.db import libpq_url, migrate, with_database
from tests.conftest import TABLES, Api, RunningApi, app_settings
from tests.factories import add_booking, small_dataset
from tests.ops.promql import (
    PROMETHEUS_LABELS,
    analyse,
    contract,
    dashboard_expressions,
    dashboard_metric_names,
    recorded_labels,
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


def _drop_database(admin_dsn: str, name: str) -> None:
    """Drop a database and its replication slots (a slot keeps its database from being dropped)."""
    with psycopg.connect(admin_dsn, autocommit=True) as connection:
        connection.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
            " WHERE database = %s AND active_pid IS NOT NULL",
            (name,),
        )
        deadline = time.monotonic() + 10
        while True:
            row = connection.execute(
                "SELECT count(*) FROM pg_replication_slots WHERE database = %s AND active",
                (name,),
            ).fetchone()
            if row is None or row[0] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        connection.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
            " WHERE database = %s",
            (name,),
        )
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def live_database_url(base_settings: Settings, admin_dsn: str) -> Iterator[str]:
    """A database of this module's own, migrated to head.

    Only the apps started here consume its change stream, so the app's own consumer is the
    one that folds the booking the workload writes, and its worker records the lag (on the
    shared test database another consumer may hold the election).
    """
    name = f"salon_reports_test_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}_live_metrics"
    _drop_database(admin_dsn, name)
    with psycopg.connect(admin_dsn, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    url = with_database(base_settings.database_url, name)
    migrate(url)
    yield url
    _drop_database(admin_dsn, name)


@pytest.fixture
async def exposition(base_settings: Settings, live_database_url: str) -> AsyncIterator[Exposition]:
    """``/metrics`` after a small workload over every report and one applied booking.

    The dataset is written before the app starts: a booking written while it runs invalidates
    its salon's cache entries (asynchronously), which would turn an expected hit into a
    miss; the one booking written while it runs comes after every cache assertion. The Redis
    is a private one: no other test run can flush it under this one.
    """
    dsn = libpq_url(live_database_url)
    with psycopg.connect(dsn, autocommit=True) as db:
        db.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
        ids = small_dataset(db)
        with redis_process() as redis:
            settings = app_settings(base_settings, live_database_url, redis.url)
            async with RunningApi(settings) as api:
                # A fresh database's stream is initialised by the first consumer; until the
                # dataset is applied and the stream is current, reports answer 503.
                await wait_applied(dsn, timeout=60)
                await _until_current(api)
                yield await _workload(api, ids, db)


async def _until_current(api: Api, timeout: float = 30.0) -> None:
    monitor = api.resources.stream_monitor
    assert monitor is not None
    deadline = time.monotonic() + timeout
    while True:
        await monitor.poll()
        if api.resources.stream.current:
            return
        assert time.monotonic() < deadline, f"the change stream is {api.resources.stream.state}"
        await asyncio.sleep(0.1)


async def _apply_one_booking(api: Api, ids: dict[str, int], db: psycopg.Connection) -> None:
    """Write a booking once this app's consumer leads, and wait until the app's worker has
    recorded its commit -> applied lag (the histogram has no series before its first sample)."""
    consumer = api.resources.consumer
    assert consumer is not None
    await asyncio.wait_for(consumer.leading.wait(), 30)
    add_booking(
        db,
        salon_id=ids["lisbon"],
        client_id=ids["alice"],
        professional_id=ids["pro_lisbon"],
        service_id=ids["cut"],
        scheduled_at=datetime.now(UTC).replace(microsecond=0) - timedelta(days=1),
    )
    deadline = time.monotonic() + 30
    while True:
        response = await api.get("/metrics")
        assert response.status_code == 200
        if "reports_freshness_lag_seconds_count" in Exposition.parse(response.text).names:
            return
        assert time.monotonic() < deadline, "the app's consumer recorded no freshness lag"
        await asyncio.sleep(0.2)


async def _workload(api: Api, ids: dict[str, int], db: psycopg.Connection) -> Exposition:
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

    await _apply_one_booking(api, ids, db)

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
        missing = analysis.labels - every_label - (PROMETHEUS_LABELS - {"le"}) - recorded_labels()
        assert not missing, f"{where}: labels {sorted(missing)} are on no series of /metrics"
        for label, op, value in analysis.matchers:
            # Exact matches only: `!=` may exclude a value this workload does not produce
            # (cache_result="bypass" needs Redis down); the contract test checks those.
            if label in (PROMETHEUS_LABELS - {"le"}) | recorded_labels() or op != "=":
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
