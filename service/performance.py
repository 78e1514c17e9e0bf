"""Operational endpoints: ``/metrics`` (Prometheus) and ``/performance/stats`` (the aggregator).

With several workers each one publishes its stats snapshot to Redis every few seconds
(``sr:stats:workers``, one field per worker); ``/performance/stats`` merges the fresh ones
with its own live snapshot. Without Redis it answers for itself alone and says so
(``partial: true``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import orjson
from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio import Redis
from starlette.responses import Response

from service.deps import OperatorDep, ResourcesDep
from telemetry.metrics import memory_limit_bytes, rss_bytes
from telemetry.setup import Telemetry
from telemetry.stats import StatsAggregator, merge_snapshots, render

logger = logging.getLogger("service.performance")

STATS_KEY = "sr:stats:workers"
PUBLISH_INTERVAL_SECONDS = 2.0
FRESH_FOR_SECONDS = 15.0

router = APIRouter(tags=["operations"])


def local_snapshot(telemetry: Telemetry) -> dict[str, Any]:
    pool = {"size": 0, "in_use": 0, "waiting": 0, "timeouts": 0}
    for gauges in telemetry.instruments.pools:
        status = gauges.read()
        pool["size"] += status.max
        pool["in_use"] += status.in_use
        pool["waiting"] += status.waiting
        pool["timeouts"] += status.timeouts
    memory = {"rss_bytes": rss_bytes(), "limit_bytes": memory_limit_bytes()}
    return telemetry.stats.snapshot(pool=pool, memory=memory)


class StatsPublisher:
    """Shares this worker's snapshot through Redis for the other workers' stats endpoint."""

    def __init__(self, redis: Redis, telemetry: Telemetry) -> None:
        self.redis = redis
        self.telemetry = telemetry
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="stats-publisher")

    async def stop(self) -> None:
        # A flag, not cancel(): a cancellation landing inside a redis-py call can be swallowed,
        # and the task would then never end.
        self._stopping.set()
        if self._task is not None:
            await self._task
        with contextlib.suppress(Exception):
            await self.redis.hdel(STATS_KEY, self.telemetry.instance_id)

    async def _run(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(Exception):
                await self.publish()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), PUBLISH_INTERVAL_SECONDS)

    async def publish(self) -> None:
        payload = orjson.dumps({"at": time.time(), "snapshot": local_snapshot(self.telemetry)})
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(STATS_KEY, self.telemetry.instance_id, payload)
            pipe.expire(STATS_KEY, int(FRESH_FOR_SECONDS * 4))
            await pipe.execute()


async def other_workers(redis: Redis, instance_id: str) -> list[dict[str, Any]]:
    entries = await redis.hgetall(STATS_KEY)
    now = time.time()
    snapshots = []
    stale = []
    for field, raw in entries.items():
        name = field.decode() if isinstance(field, bytes) else str(field)
        if name == instance_id:
            continue
        try:
            published = orjson.loads(raw)
        except orjson.JSONDecodeError:
            stale.append(name)
            continue
        if now - float(published.get("at", 0)) > FRESH_FOR_SECONDS:
            stale.append(name)  # a worker that stopped without saying goodbye
            continue
        snapshots.append(published["snapshot"])
    if stale:
        await redis.hdel(STATS_KEY, *stale)
    return snapshots


@router.get("/api/v1/optimized-reports/performance/stats")
async def performance_stats(_: OperatorDep, resources: ResourcesDep) -> Response:
    """Requests, queries, cache, pool, memory, slow queries, N+1 and breached thresholds."""
    telemetry = resources.telemetry
    snapshots = [local_snapshot(telemetry)]
    partial = False
    redis = resources.cache.redis
    if redis is None:
        partial = True
    else:
        try:
            snapshots += await asyncio.wait_for(
                other_workers(redis, telemetry.instance_id), timeout=1.0
            )
        except Exception:
            partial = True
    stats: StatsAggregator = telemetry.stats
    body = render(merge_snapshots(snapshots, partial=partial), stats.thresholds)
    return Response(
        orjson.dumps(body), media_type="application/json", headers={"Cache-Control": "no-store"}
    )


@router.get("/metrics", include_in_schema=False)
async def metrics(resources: ResourcesDep) -> Response:
    """Prometheus exposition of this worker's OpenTelemetry metrics."""
    return Response(generate_latest(resources.telemetry.registry), media_type=CONTENT_TYPE_LATEST)
