"""The contract of ``db.client.operation.duration``: every attribute the database semantic
conventions require or conditionally require, on every data point.

Required: ``db.system.name``; conditionally required and available here: ``db.namespace``,
``db.operation.name``, ``db.query.summary``, ``server.address`` and ``server.port`` (the primary
and a replica differ there), and ``error.type`` exactly on the statements that failed (a
statement cut by its timeout is SQLSTATE ``57014``). A data point missing one fails.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from sqlalchemy import text
from sqlalchemy.engine import make_url

from service.config import Settings
from telemetry.setup import configure
from tests.conftest import RunningApi, app_settings

REQUIRED = {
    "db.system.name",
    "db.namespace",
    "db.operation.name",
    "db.query.summary",
    "server.address",
    "server.port",
}


def _points(reader: InMemoryMetricReader, name: str) -> list[Any]:
    data = reader.get_metrics_data()
    assert data is not None
    return [
        point
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == name
        for point in metric.data.data_points
    ]


async def test_every_db_operation_point_has_the_required_attributes(
    base_settings: Settings, database_url: str, data: dict[str, int], redis_url: str
) -> None:
    reader = InMemoryMetricReader()
    telemetry = configure(
        version="t",
        environment="test",
        slow_query_ms=500,
        tracer_provider=TracerProvider(),
        metric_readers=[reader],
    )
    settings = app_settings(base_settings, database_url, redis_url, statement_timeout_ms=100)
    async with RunningApi(settings, telemetry) as api:
        for report in ("dashboard", "bookings", "professionals", "realtime"):
            assert (await api.report(report, salon_id=data["lisbon"])).status_code == 200

        async def sleepy() -> dict[str, str]:
            async with api.resources.read_engine.connect() as connection:
                await connection.execute(
                    text("SELECT pg_sleep(1)").execution_options(query_name="test.sleep")
                )
            return {}

        api.app.add_api_route("/sleepy", sleepy)
        assert (await api.get("/sleepy")).status_code == 503
        points = _points(reader, "db.client.operation.duration")

    url = make_url(database_url)
    assert points
    summaries = set()
    for point in points:
        attributes = dict(point.attributes)
        missing = REQUIRED - set(attributes)
        assert not missing, f"{attributes} lacks {missing}"
        assert attributes["db.system.name"] == "postgresql"
        assert attributes["db.namespace"] == url.database
        assert attributes["server.address"] == url.host
        assert attributes["server.port"] == url.port
        summaries.add(attributes["db.query.summary"])
        if attributes["db.query.summary"] == "test.sleep":
            assert attributes["error.type"] == "57014", attributes  # query_canceled
        else:
            assert "error.type" not in attributes, attributes
        if attributes["db.query.summary"].startswith("report."):
            assert attributes["db.operation.name"] == "SELECT"
    assert {"report.dashboard", "report.realtime", "test.sleep"} <= summaries


def _histogram(reader: InMemoryMetricReader, name: str) -> tuple[int, float]:
    """(count, sum) of a histogram, over every pool."""
    points = _points(reader, name)
    return sum(p.count for p in points), sum(p.sum for p in points)


async def test_pool_histograms_show_the_queue_for_a_connection(
    base_settings: Settings, database_url: str, data: dict[str, int], redis_url: str
) -> None:
    """One connection in the pool, held; a report request queues for it. The request's wait
    (in db.client.connection.wait_time) is at least the time it was seen waiting before the
    connection came back, and the holder's use_time at least as long; create_time counts the
    connections opened."""
    reader = InMemoryMetricReader()
    telemetry = configure(
        version="t",
        environment="test",
        slow_query_ms=500,
        tracer_provider=TracerProvider(),
        metric_readers=[reader],
    )
    settings = app_settings(
        base_settings, database_url, redis_url, pool_size=1, pool_max_overflow=0
    )
    async with RunningApi(settings, telemetry) as api:
        await api.resources.read_engine.dispose()  # the next connection is a new one
        service = api.resources.reports
        pool = service.pool
        async with service._connection():
            request = asyncio.create_task(api.report("realtime", salon_id=data["lisbon"]))
            while pool.waiting == 0:
                await asyncio.sleep(0.01)
            seen_waiting = time.perf_counter()
            await asyncio.sleep(0.3)
            released = time.perf_counter()
        response = await request
        assert response.status_code == 200
        waits, waited = _histogram(reader, "db.client.connection.wait_time")
        uses, used = _histogram(reader, "db.client.connection.use_time")
        creates, _ = _histogram(reader, "db.client.connection.create_time")
    queued = released - seen_waiting
    assert waits >= 2  # ours and the request's
    assert uses == waits  # every connection obtained was given back, and timed
    assert waited >= queued
    assert used >= queued
    assert creates >= 1
    for name in ("wait_time", "use_time", "create_time"):
        for point in _points(reader, f"db.client.connection.{name}"):
            assert dict(point.attributes) == {"db.client.connection.pool.name": "primary"}
