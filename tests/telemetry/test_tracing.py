"""Traces, metrics and stats of the running service (telemetry/README.md)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import psycopg
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, StatusCode
from sqlalchemy import text

from service.config import Settings
from telemetry.setup import configure
from tests.conftest import Api, RunningApi, app_settings
from tests.factories import (
    add_booking,
    add_professional,
    add_salon,
    add_service,
    add_user,
)

PREFIX = "/api/v1/optimized-reports"
DASHBOARD_ROUTE = f"GET {PREFIX}/dashboard"


def by_id(spans: tuple[ReadableSpan, ...]) -> dict[int, ReadableSpan]:
    return {span.context.span_id: span for span in spans}


def children(spans: tuple[ReadableSpan, ...], parent: ReadableSpan) -> list[ReadableSpan]:
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


def only(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    matching = [span for span in spans if span.name == name]
    assert len(matching) == 1, [span.name for span in spans]
    return matching[0]


def server_span(spans: tuple[ReadableSpan, ...]) -> ReadableSpan:
    [server] = [span for span in spans if span.kind is SpanKind.SERVER]
    return server


def request_trace(api: Api) -> tuple[ReadableSpan, ...]:
    """The spans of the one request traced; background tasks trace on their own."""
    spans = api.spans.get_finished_spans()
    server = server_span(spans)
    return tuple(s for s in spans if s.context.trace_id == server.context.trace_id)


async def test_cold_request_span_tree(api: Api, data: dict[str, int]) -> None:
    response = await api.report("dashboard", salon_id=data["lisbon"])
    assert response.headers["x-cache"] == "MISS"
    spans = request_trace(api)
    server = server_span(spans)
    assert server.name == DASHBOARD_ROUTE
    assert response.headers["x-trace-id"] == format(server.context.trace_id, "032x")
    assert server.attributes is not None
    assert server.attributes["http.route"] == f"{PREFIX}/dashboard"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["report.name"] == "dashboard"
    assert server.attributes["salon.id"] == data["lisbon"]
    assert server.attributes["cache.result"] == "miss"
    assert server.attributes["cache.hit"] is False

    top = children(spans, server)
    only(top, "salon.lookup")  # the salon's time zone, then the cache
    lookup = only(top, "cache.get")
    assert lookup.attributes is not None
    assert lookup.attributes["cache.result"] == "miss"
    assert lookup.attributes["cache.hit"] is False
    under_lookup = children(spans, lookup)
    compute = only(under_lookup, "report.compute")
    store = only(under_lookup, "cache.set")
    sql = only(children(spans, compute), "report.dashboard")
    assert sql.kind is SpanKind.CLIENT
    assert sql.attributes is not None
    assert sql.attributes["db.response.returned_rows"] == 1
    assert sql.attributes["db.query.summary"] == "report.dashboard"
    assert "%(" in str(sql.attributes["db.query.text"])
    assert compute.end_time is not None
    assert store.start_time is not None
    assert compute.end_time <= store.start_time
    # Redis commands are spans of their own, without arguments
    redis_spans = [
        s for s in spans if s.attributes and s.attributes.get("db.system.name") == "redis"
    ]
    assert redis_spans
    for span in redis_spans:
        statement = str(span.attributes.get("db.query.text", "")) if span.attributes else ""
        for command in statement.splitlines():
            # command words (GET, SCRIPT LOAD, …) and "?" for every argument
            assert all(word == "?" or word.isupper() for word in command.split()), statement


async def test_warm_request_has_a_hit_and_no_sql(api: Api, data: dict[str, int]) -> None:
    await api.report("dashboard", salon_id=data["lisbon"])
    api.spans.clear()
    response = await api.report("dashboard", salon_id=data["lisbon"])
    assert response.headers["x-cache"] == "HIT"
    spans = request_trace(api)
    server = server_span(spans)
    assert server.attributes is not None
    assert server.attributes["cache.result"] == "hit"
    assert server.attributes["cache.hit"] is True
    lookup = only(children(spans, server), "cache.get")
    assert lookup.attributes is not None
    assert lookup.attributes["cache.result"] == "hit"
    assert not [s for s in spans if s.name.startswith(("report.", "salon."))]


async def test_incoming_traceparent_is_continued(api: Api, data: dict[str, int]) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent = "00f067aa0ba902b7"
    response = await api.get(
        f"{PREFIX}/dashboard",
        api.token(),
        params={"salon_id": data["lisbon"]},
        headers={"traceparent": f"00-{trace_id}-{parent}-01"},
    )
    assert response.headers["x-trace-id"] == trace_id
    server = server_span(api.spans.get_finished_spans())
    assert format(server.context.trace_id, "032x") == trace_id
    assert server.parent is not None
    assert format(server.parent.span_id, "016x") == parent


async def test_an_unexpected_error_is_recorded_and_answered_as_json(
    api: Api, data: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.reports import queries

    async def broken(*_: Any, **__: Any) -> dict[str, Any]:
        raise RuntimeError("boom")

    monkeypatch.setattr(queries, "dashboard_metrics", broken)
    response = await api.report("dashboard", salon_id=data["lisbon"])
    assert response.status_code == 500
    assert response.json() == {
        "error": {"code": "internal_error", "message": "internal server error"}
    }
    spans = request_trace(api)
    server = server_span(spans)
    assert server.status.status_code is StatusCode.ERROR
    assert server.attributes is not None
    assert server.attributes["http.response.status_code"] == 500
    assert any(event.name == "exception" for event in server.events)


async def _workload_with_known_counts(api: Api, salon: int) -> None:
    """40 dashboard requests over 7 distinct periods: 7 misses, 33 hits."""
    periods = [(f"2026-0{month}-01", f"2026-0{month}-10") for month in range(1, 8)]
    for index in range(40):
        start, end = periods[index % 7]
        response = await api.report("dashboard", salon_id=salon, start=start, end=end)
        assert response.status_code == 200


async def _stats(api: Api) -> dict[str, Any]:
    response = await api.get(f"{PREFIX}/performance/stats", api.token("ops"))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_stats_count_every_request_even_when_nothing_is_sampled(
    base_settings: Settings, database_url: str, data: dict[str, int], redis_url: str
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = configure(
        version="test", environment="test", slow_query_ms=500, tracer_provider=provider
    )
    settings = app_settings(base_settings, database_url, redis_url)
    async with RunningApi(settings, telemetry) as api:
        await _workload_with_known_counts(api, data["lisbon"])
        stats = await _stats(api)
    assert exporter.get_finished_spans() == ()
    for window in ("since_start", "last_5m"):
        endpoint = stats[window]["endpoints"][DASHBOARD_ROUTE]
        assert endpoint["count"] == 40
        assert endpoint["errors"] == 0
        cache = stats[window]["cache"]
        assert (cache["hits"], cache["misses"], cache["stale"]) == (33, 7, 0)
        assert cache["hit_rate"] == pytest.approx(33 / 40)
        assert cache["by_report"]["dashboard"]["misses"] == 7
        assert stats[window]["queries"]["report.dashboard"]["calls"] == 7
        assert stats[window]["queries"]["salon.lookup"]["calls"] == 1
    assert stats["workers"] == 1
    assert stats["partial"] is False
    names = {alert["name"] for alert in stats["alerts"]}
    assert names == {
        "query_p95",
        "cache_hit_rate",
        "pool_exhaustion",
        "memory",
        "freshness",
        "tenant_throttling",
        "error_budget_burn",
    }
    assert stats["memory"]["rss_bytes"] > 0
    assert stats["pool"]["size"] >= 1


async def test_stats_add_up_across_workers(
    base_settings: Settings, database_url: str, data: dict[str, int], redis_url: str
) -> None:
    settings = app_settings(base_settings, database_url, redis_url)
    async with RunningApi(settings) as one, RunningApi(settings) as two:
        for _ in range(5):
            await one.get("/healthz")
        for _ in range(8):
            await two.get("/healthz")
        publisher = two.resources.publisher
        assert publisher is not None
        await publisher.publish()
        stats = await _stats(one)
        assert stats["workers"] == 2
        assert stats["since_start"]["endpoints"]["GET /healthz"]["count"] == 13


async def test_stats_without_redis_say_they_are_partial(
    base_settings: Settings, database_url: str, data: dict[str, int]
) -> None:
    async with RunningApi(app_settings(base_settings, database_url, "")) as api:
        await api.report("dashboard", salon_id=data["lisbon"])
        stats = await _stats(api)
    assert stats["partial"] is True
    assert stats["workers"] == 1
    assert stats["since_start"]["cache"]["bypass"] == 1


async def test_stats_are_for_admins_and_ops_only(api: Api, data: dict[str, int]) -> None:
    owner = api.token("owner", [data["lisbon"]])
    assert (await api.get(f"{PREFIX}/performance/stats", owner)).status_code == 403
    assert (await api.get(f"{PREFIX}/performance/stats")).status_code == 401
    assert (await api.get(f"{PREFIX}/performance/stats", api.token("admin"))).status_code == 200


METRIC_SERIES = (
    "http_server_request_duration_seconds_bucket",
    "db_client_operation_duration_seconds_bucket",
    "db_client_response_returned_rows_bucket",
    "db_client_connection_count",
    "db_client_connection_max",
    "db_client_connection_pending_requests",
    "db_client_connection_timeouts_total",
    "reports_cache_requests_total",
    "process_memory_usage_bytes",
    "reports_memory_limit_bytes",
)


async def test_metrics_lists_every_metric_after_a_small_workload(
    api: Api, data: dict[str, int]
) -> None:
    for _ in range(2):
        for report in ("dashboard", "bookings", "professionals", "realtime"):
            await api.report(report, salon_id=data["lisbon"])
    response = await api.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    exposition = response.text
    for series in METRIC_SERIES:
        assert f"\n{series}{{" in exposition, series
    assert 'cache_result="hit"' in exposition
    assert 'cache_result="miss"' in exposition
    assert 'db_query_summary="report.dashboard"' in exposition
    assert f'http_route="{PREFIX}/dashboard"' in exposition
    assert 'db_client_connection_state="used"' in exposition


async def test_slow_queries_are_logged_with_their_trace_and_marked_on_the_span(
    base_settings: Settings,
    database_url: str,
    data: dict[str, int],
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = app_settings(base_settings, database_url, redis_url, slow_query_ms=0.001)
    caplog.set_level(logging.WARNING, logger="salon_reports.slow_query")
    async with RunningApi(settings) as api:
        response = await api.report("dashboard", salon_id=data["lisbon"])
        trace_id = response.headers["x-trace-id"]
        stats = await _stats(api)
        spans = api.spans.get_finished_spans()
    lines = [
        json.loads(r.getMessage()) for r in caplog.records if r.name == "salon_reports.slow_query"
    ]
    dashboard = [line for line in lines if line["query"] == "report.dashboard"]
    assert len(dashboard) == 1
    assert dashboard[0]["trace_id"] == trace_id
    assert len(dashboard[0]["span_id"]) == 16
    assert dashboard[0]["route"] == f"{PREFIX}/dashboard"
    sql = only(list(spans), "report.dashboard")
    assert [event.name for event in sql.events] == ["slow_query"]
    recent = [q for q in stats["recent_slow_queries"] if q["name"] == "report.dashboard"]
    assert recent[0]["trace_id"] == trace_id


async def test_five_identical_statements_in_one_request_are_an_n_plus_one(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    engine = api.resources.read_engine

    async def chatty() -> dict[str, str]:
        async with engine.connect() as connection:
            for booking_id in range(6):
                await connection.execute(text("SELECT 1 WHERE :id > 0"), {"id": booking_id + 1})
        return {"ok": "yes"}

    api.app.add_api_route("/chatty", chatty)
    caplog.set_level(logging.WARNING, logger="salon_reports.n_plus_one")
    response = await api.get("/chatty")
    assert response.status_code == 200
    stats = await _stats(api)
    assert stats["n_plus_one"]["total"] == 1
    [found] = stats["n_plus_one"]["recent"]
    assert found["route"] == "GET /chatty"
    assert found["count"] == 6
    assert found["trace_id"] == response.headers["x-trace-id"]
    assert any("n_plus_one" in record.getMessage() for record in caplog.records)


async def test_sdk_disabled_means_no_spans_but_full_stats(
    base_settings: Settings,
    database_url: str,
    data: dict[str, int],
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    telemetry = configure(version="test", environment="test", slow_query_ms=500)
    async with RunningApi(app_settings(base_settings, database_url, redis_url), telemetry) as api:
        response = await api.report("dashboard", salon_id=data["lisbon"])
        assert response.status_code == 200
        assert "x-trace-id" not in response.headers
        stats = await _stats(api)
    assert stats["since_start"]["endpoints"][DASHBOARD_ROUTE]["count"] == 1


# -- the wire: a real OTLP/HTTP exporter and a receiver ----------------------------------


class _Receiver(BaseHTTPRequestHandler):
    received: list[tuple[str, bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def otlp_receiver() -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    received: list[tuple[str, bytes]] = []
    handler = type("Handler", (_Receiver,), {"received": received})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", received
    server.shutdown()
    server.server_close()


async def test_spans_and_metrics_reach_an_otlp_receiver(
    base_settings: Settings,
    database_url: str,
    data: dict[str, int],
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    otlp_receiver: tuple[str, list[tuple[str, bytes]]],
) -> None:
    endpoint, received = otlp_receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "salon-reports-wire-test")
    telemetry = configure(version="9.9.9", environment="test", slow_query_ms=500)
    async with RunningApi(app_settings(base_settings, database_url, redis_url), telemetry) as api:
        await api.report("dashboard", salon_id=data["lisbon"])
        await api.report("dashboard", salon_id=data["lisbon"])
    await asyncio.sleep(0)  # shutdown() flushed both exporters synchronously

    traces = [body for path, body in received if path == "/v1/traces"]
    metrics = [body for path, body in received if path == "/v1/metrics"]
    assert traces
    assert metrics
    spans = []
    resource_attributes = {}
    for body in traces:
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            resource_attributes.update({a.key: a.value for a in resource_spans.resource.attributes})
            for scope_spans in resource_spans.scope_spans:
                spans.extend(scope_spans.spans)
    assert resource_attributes["service.name"].string_value == "salon-reports-wire-test"
    assert resource_attributes["service.version"].string_value == "9.9.9"
    assert resource_attributes["deployment.environment.name"].string_value == "test"
    assert resource_attributes["service.instance.id"].string_value
    attributes = {span.name: {a.key: a.value for a in span.attributes} for span in spans}
    assert attributes["report.dashboard"]["db.response.returned_rows"].int_value == 1
    servers = [span for span in spans if span.name == DASHBOARD_ROUTE]
    results = sorted(
        {a.key: a.value for a in span.attributes}["cache.result"].string_value for span in servers
    )
    assert results == ["hit", "miss"]
    metric_names = set()
    for body in metrics:
        request_metrics = ExportMetricsServiceRequest.FromString(body)
        for resource_metrics in request_metrics.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                metric_names.update(metric.name for metric in scope_metrics.metrics)
    assert {
        "http.server.request.duration",
        "db.client.operation.duration",
        "reports.cache.requests",
        "db.client.connection.count",
    } <= metric_names


# -- hygiene: nothing personal or secret in telemetry ------------------------------------

PLANTED_EMAIL = "planted.person@example.test"
PLANTED_SALON = "Planted Secret Salon Name"


async def test_no_email_token_or_name_in_spans_metrics_or_logs(
    api: Api, db: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    from datetime import UTC, datetime, timedelta

    caplog.set_level(logging.DEBUG)
    salon = add_salon(db, PLANTED_SALON, "Europe/Lisbon")
    client = add_user(db, PLANTED_EMAIL)
    pro = add_professional(db, salon, "Planted Professional Name")
    service = add_service(db, salon, "Planted Service Name")
    for days in range(3):
        add_booking(
            db,
            salon_id=salon,
            client_id=client,
            professional_id=pro,
            service_id=service,
            scheduled_at=datetime.now(UTC) - timedelta(days=days),
        )
    token = api.token("owner", [salon])
    for report in ("dashboard", "bookings", "professionals", "realtime"):
        for _ in range(2):
            assert (await api.report(report, token, salon_id=salon)).status_code == 200
    await api.report("dashboard", token, salon_id=salon + 1)  # 403
    await api.report("dashboard", "garbage-token", salon_id=salon)  # 401
    await api.report("bookings", token, salon_id=salon, start="not-a-date")  # 422
    await asyncio.sleep(0.3)  # the invalidation listener's log lines, if any

    texts = []
    for span in api.spans.get_finished_spans():
        texts.append(span.name)
        texts.extend(f"{k}={v}" for k, v in (span.attributes or {}).items())
        for event in span.events:
            texts.append(event.name)
            texts.extend(f"{k}={v}" for k, v in (event.attributes or {}).items())
        texts.extend(f"{k}={v}" for k, v in span.resource.attributes.items())
    texts.append((await api.get("/metrics")).text)
    texts.extend(record.getMessage() for record in caplog.records)
    texts.append(json.dumps(await _stats(api)))
    haystack = "\n".join(texts)
    for secret in (
        PLANTED_EMAIL,
        PLANTED_SALON,
        "Planted Professional Name",
        "Planted Service Name",
        token,
        token.split(".")[2],
        "garbage-token",
        api.settings.jwt_secret,
    ):
        assert secret not in haystack, secret


async def test_a_statement_cut_by_its_timeout_is_still_measured(
    base_settings: Settings, database_url: str, data: dict[str, int], redis_url: str
) -> None:
    settings = app_settings(
        base_settings, database_url, redis_url, statement_timeout_ms=100, slow_query_ms=50
    )
    async with RunningApi(settings) as api:
        engine = api.resources.read_engine

        async def sleepy() -> dict[str, str]:
            async with engine.connect() as connection:
                await connection.execute(
                    text("SELECT pg_sleep(1)").execution_options(query_name="test.sleep")
                )
            return {}

        api.app.add_api_route("/sleepy", sleepy)
        response = await api.get("/sleepy")
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "database_unavailable"
        stats = await _stats(api)
        exposition = (await api.get("/metrics")).text
    query = stats["since_start"]["queries"]["test.sleep"]
    assert query["calls"] == 1
    assert query["slow_calls"] == 1
    assert query["max_ms"] >= 90
    assert 'db_query_summary="test.sleep"' in exposition


async def test_metrics_of_every_worker_are_served_by_any_worker(
    base_settings: Settings, database_url: str, data: dict[str, int], redis_url: str
) -> None:
    settings = app_settings(base_settings, database_url, redis_url)
    async with RunningApi(settings) as one, RunningApi(settings) as two:
        for _ in range(3):
            await two.get("/healthz")
        publisher = two.resources.publisher
        assert publisher is not None
        await publisher.publish()
        exposition = (await one.get("/metrics")).text
    from prometheus_client.parser import text_string_to_metric_families

    counts = {}
    for family in text_string_to_metric_families(exposition):
        if family.name == "http_server_request_duration_seconds":
            for sample in family.samples:
                if sample.name.endswith("_count") and sample.labels["http_route"] == "/healthz":
                    counts[sample.labels["worker"]] = sample.value
    assert counts == {two.resources.telemetry.instance_id: 3.0}, exposition[:3000]
    assert exposition.count("# TYPE http_server_request_duration_seconds histogram") == 1
