"""An idle server exports no parentless background traces.

Measured before the fix: a 2-worker server with no traffic exported 64 root traces in 20 s
over OTLP (EVALSHA, HSET EXPIRE HSET EXPIRE, HDEL: the periodic stats publishing and the
cache's scripts, each a bare Redis command without a parent), burying the requests in
Jaeger's search. Here two workers run their whole lifespan (stats publishing, invalidation
listener, change-stream monitor and consumer) with a real OTLP exporter sending to a receiver
in the test, until each has published its stats several times; then one request is made.
Every root span exported must be that request's.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest
import redis
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from service.config import Settings
from service.workers import STATS_KEY
from telemetry.setup import configure
from tests.conftest import RunningApi, app_settings
from tests.telemetry.test_tracing import DASHBOARD_ROUTE, otlp_receiver  # noqa: F401

PUBLISHES = 3


def _published_at(client: redis.Redis, worker: str) -> float:
    raw = client.hget(STATS_KEY, worker)
    return float(orjson.loads(raw)["at"]) if raw else 0.0


async def _wait_for_publishes(redis_url: str, workers: list[str], count: int) -> None:
    """Until each worker has published its stats ``count`` more times (the background work
    runs; no duration is asserted)."""
    client = redis.Redis.from_url(redis_url)
    try:
        seen = {worker: [_published_at(client, worker)] for worker in workers}
        deadline = time.monotonic() + 60
        while any(len(set(stamps)) <= count for stamps in seen.values()):
            assert time.monotonic() < deadline, seen
            await asyncio.sleep(0.2)
            for worker in workers:
                seen[worker].append(_published_at(client, worker))
    finally:
        client.close()


def _spans(received: list[tuple[str, bytes]]) -> list[Any]:
    spans = []
    for path, body in received:
        if path != "/v1/traces":
            continue
        for resource_spans in ExportTraceServiceRequest.FromString(body).resource_spans:
            for scope_spans in resource_spans.scope_spans:
                spans.extend(scope_spans.spans)
    return spans


async def test_an_idle_two_worker_server_exports_no_parentless_background_traces(
    base_settings: Settings,
    database_url: str,
    clean_db: str,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    otlp_receiver: tuple[str, list[tuple[str, bytes]]],  # noqa: F811
) -> None:
    endpoint, received = otlp_receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    settings = app_settings(base_settings, database_url, redis_url)
    workers = [configure(version="t", environment="test", slow_query_ms=500) for _ in range(2)]
    async with RunningApi(settings, workers[0]) as one, RunningApi(settings, workers[1]):
        await _wait_for_publishes(redis_url, [w.instance_id for w in workers], PUBLISHES)
        response = await one.get(f"{DASHBOARD_ROUTE.split(' ', 1)[1]}", one.token())
        assert response.status_code == 200
    # Leaving the lifespans shut the providers down, which flushed the exporters.

    spans = _spans(received)
    roots = sorted(span.name for span in spans if not span.parent_span_id)
    assert roots == [DASHBOARD_ROUTE], roots
