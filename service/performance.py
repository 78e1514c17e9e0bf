"""Operational endpoints: ``/metrics`` (Prometheus) and ``/performance/stats`` (the aggregator),
each answering for every worker (see ``service.workers``)."""

from __future__ import annotations

import asyncio
import contextlib

import orjson
from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_CONTENT_TYPE
from starlette.requests import Request
from starlette.responses import Response

from service.deps import OperatorDep, ResourcesDep
from service.error_budget import budget_section
from service.paths import STATS_PATH
from service.statements import top_statements
from service.workers import (
    EXPOSITION_FIELD,
    METRICS_KEY,
    Combined,
    exposition,
    local_snapshot,
    merge_openmetrics,
    other_workers,
)
from telemetry.fairness import merge_fairness
from telemetry.stats import StatsAggregator, merge_snapshots, render
from telemetry.stats.slo import budget_alert

router = APIRouter(tags=["operations"])
OPENMETRICS = "application/openmetrics-text"


@router.get(STATS_PATH)
async def performance_stats(_: OperatorDep, resources: ResourcesDep) -> Response:
    """Requests, queries, cache, pool, memory, slow queries, N+1, breached thresholds, the
    tenants' fair share, the database's top statements (pg_stat_statements) and the SLOs'
    error budgets."""
    telemetry = resources.telemetry
    snapshots = [local_snapshot(telemetry)]
    partial = False
    redis = resources.cache.redis
    if redis is None:
        partial = True
    else:
        try:
            published = await asyncio.wait_for(
                other_workers(redis, telemetry.instance_id), timeout=1.0
            )
            snapshots += [snapshot for _, snapshot in published]
        except Exception:
            partial = True
    stats: StatsAggregator = telemetry.stats
    body = render(merge_snapshots(snapshots, partial=partial), stats.thresholds)
    body["statements"] = await top_statements(resources.engine)
    # The fair share between tenants (service/fairness.py): which salons wait or were
    # throttled, by id — this endpoint is for admins and ops only.
    body["fairness"] = merge_fairness([snapshot.get("fairness") for snapshot in snapshots])
    body["alerts"].append(body["fairness"]["alert"])
    # The error budgets of the two SLOs (docs/slo.md), from every worker's counts in Redis.
    body["slo"] = await budget_section(redis, telemetry.slo)
    body["alerts"].append(budget_alert(body["slo"]))
    return Response(
        orjson.dumps(body), media_type="application/json", headers={"Cache-Control": "no-store"}
    )


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, resources: ResourcesDep) -> Response:
    """Prometheus exposition of every worker's metrics, each series labelled ``worker``.

    With several workers one port is served by any of them; each scrape must see them all, or
    counters would seem to jump back and forth. Other workers' expositions come from Redis
    (published every 2 s); without Redis, this worker's alone.

    Asked with ``Accept: application/openmetrics-text`` (as Prometheus asks), the answer is
    OpenMetrics, with exemplars (trace and span ids of sampled requests and statements) on
    the latency histograms' buckets; otherwise text format 0.0.4, which has no place for them.
    """
    telemetry = resources.telemetry
    _, asked = choose_encoder(request.headers.get("accept", ""))
    # Every worker's exposition in OpenMetrics (what they publish), answered as asked.
    expositions = [(telemetry.instance_id, exposition(telemetry))]
    redis = resources.cache.redis
    if redis is not None:
        with contextlib.suppress(Exception):
            expositions += await asyncio.wait_for(
                other_workers(redis, telemetry.instance_id, METRICS_KEY, EXPOSITION_FIELD),
                timeout=1.0,
            )
    if asked.startswith(OPENMETRICS):
        # OpenMetrics 1.0.0 with the default (underscores) escaping is what workers render.
        return Response(merge_openmetrics(expositions), media_type=OPENMETRICS_CONTENT_TYPE)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Combined(expositions))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
