"""A real Prometheus stores the service's exemplars: from a latency bucket to the request's trace.

The service runs in this test's event loop behind a real HTTP server (uvicorn on a free
loopback port), every trace sampled (a parent-based ratio sampler at 1); Prometheus (the
Debian package, through tests/ops/promstack.py) runs with ``--enable-feature=exemplar-storage``
and scrapes it every second, asking for OpenMetrics as it does by default. Each request is
followed until its exemplar is readable through ``/api/v1/query_exemplars`` before the next one
is made (the service keeps the newest exemplar per bucket, so two requests landing in one
bucket between two scrapes would leave only the second: the test orders them instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind

from service.config import Settings
from telemetry.setup import configure
from tests.conftest import Api, RunningApi, app_settings
from tests.ops.promstack import PromStack, WebhookReceiver, free_port
from tests.ops.tools import require_tool

PREFIX = "/api/v1/optimized-reports"
REQUESTS = 'http_server_request_duration_seconds_bucket{job="salon-reports"}'
STATEMENTS = 'db_client_operation_duration_seconds_bucket{job="salon-reports"}'
EXEMPLAR_STORAGE = "--enable-feature=exemplar-storage"


def stored(stack: PromStack, expr: str, since: float) -> list[dict[str, Any]]:
    """(series labels, exemplar labels) of every exemplar Prometheus returns for ``expr``."""
    return [
        {"series": series["seriesLabels"], **exemplar["labels"], "value": exemplar["value"]}
        for series in stack.exemplars(expr, since)
        for exemplar in series["exemplars"]
    ]


async def wait_for_exemplar(
    stack: PromStack, expr: str, since: float, trace_id: str, timeout: float = 30
) -> list[dict[str, Any]]:
    """The stored exemplars of ``trace_id`` once there is one (an empty list on timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        found = await asyncio.to_thread(stored, stack, expr, since)
        mine = [exemplar for exemplar in found if exemplar["trace_id"] == trace_id]
        if mine or time.monotonic() > deadline:
            return mine
        await asyncio.sleep(0.25)


@pytest.fixture
async def served(
    base_settings: Settings,
    database_url: str,
    clean_db: str,
    redis_url: str,
    data: dict[str, int],
) -> AsyncIterator[tuple[Api, InMemorySpanExporter, str]]:
    """The service with every trace sampled, behind uvicorn on a free loopback port."""
    settings = app_settings(base_settings, database_url, redis_url)
    spans = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(1.0)))
    provider.add_span_processor(SimpleSpanProcessor(spans))
    telemetry = configure(
        version="test",
        environment="test",
        slow_query_ms=settings.slow_query_ms,
        tracer_provider=provider,
    )
    async with RunningApi(settings, telemetry) as api:
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(
                api.app, host="127.0.0.1", port=port, lifespan="off", log_level="warning"
            )
        )
        serving = asyncio.create_task(server.serve())
        try:
            while not server.started:
                if serving.done():
                    serving.result()  # raises what stopped it
                await asyncio.sleep(0.05)
            yield api, spans, f"127.0.0.1:{port}"
        finally:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(serving, 10)


async def test_prometheus_stores_the_exemplars_of_sampled_requests(
    served: tuple[Api, InMemorySpanExporter, str], data: dict[str, int]
) -> None:
    require_tool("prometheus")
    api, spans, target = served
    since = time.time() - 1
    with WebhookReceiver() as webhook:
        stack = PromStack(target, webhook.url, rule_files=[], prometheus_flags=[EXEMPLAR_STORAGE])
        await asyncio.to_thread(stack.start)
        try:
            async with httpx.AsyncClient(base_url=f"http://{target}", timeout=10) as client:
                token = api.token()
                for report, salon in (
                    ("dashboard", "lisbon"),
                    ("dashboard", "newyork"),
                    ("bookings", "lisbon"),
                ):
                    response = await client.get(
                        f"{PREFIX}/{report}",
                        params={"salon_id": data[salon]},
                        headers={"Authorization": f"Bearer {token}"},
                    )
                    assert response.status_code == 200, response.text
                    assert response.headers["x-cache"] == "MISS"
                    trace_id = response.headers["x-trace-id"]
                    trace = [
                        span
                        for span in spans.get_finished_spans()
                        if format(span.context.trace_id, "032x") == trace_id
                    ]
                    await check_request(stack, since, trace, report, trace_id)
        finally:
            await asyncio.to_thread(stack.stop)


async def check_request(
    stack: PromStack, since: float, trace: list[ReadableSpan], report: str, trace_id: str
) -> None:
    [server] = [span for span in trace if span.kind is SpanKind.SERVER]
    [statement] = [span for span in trace if span.name == f"report.{report}"]

    found = await wait_for_exemplar(stack, REQUESTS, since, trace_id)
    assert found, f"no exemplar of {trace_id} in Prometheus\n{stack.logs()}"
    for exemplar in found:
        assert exemplar["span_id"] == format(server.context.span_id, "016x")
        assert set(exemplar) == {"series", "trace_id", "span_id", "value"}
        assert exemplar["series"]["http_route"] == f"{PREFIX}/{report}"
        assert float(exemplar["value"]) <= float(exemplar["series"]["le"])  # its own bucket

    found = await wait_for_exemplar(stack, STATEMENTS, since, trace_id)
    assert found, f"no statement exemplar of {trace_id} in Prometheus\n{stack.logs()}"
    by_span = {exemplar["span_id"]: exemplar for exemplar in found}
    assert format(statement.context.span_id, "016x") in by_span
    statement_exemplar = by_span[format(statement.context.span_id, "016x")]
    assert statement_exemplar["series"]["db_query_summary"] == f"report.{report}"
