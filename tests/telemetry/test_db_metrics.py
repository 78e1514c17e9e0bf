"""The contract of ``db.client.operation.duration``: every attribute the database semantic
conventions require or conditionally require, on every data point.

Required: ``db.system.name``; conditionally required and available here: ``db.namespace``,
``db.operation.name``, ``db.query.summary``, ``server.address`` and ``server.port`` (the primary
and a replica differ there), and ``error.type`` exactly on the statements that failed (a
statement cut by its timeout is SQLSTATE ``57014``). A data point missing one fails.
"""

from __future__ import annotations

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
