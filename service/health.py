"""Probes: ``/healthz`` (alive), ``/readyz`` (PostgreSQL reachable and its schema at the
Alembic head; Redis reported)."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel
from starlette.responses import Response

from service.deps import ResourcesDep
from service.errors import error_response
from service.schema_version import database_revisions, schema_problem

router = APIRouter(tags=["health"])

PROBE_TIMEOUT_SECONDS = 2.0
# The body FastAPI would render for {"status": "ok"}, rendered once: a liveness probe called
# every few seconds by every orchestrator and balancer should cost next to nothing.
ALIVE = b'{"status":"ok"}'


class Alive(BaseModel):
    status: Literal["ok"]


@router.get("/healthz", response_model=Alive)
async def healthz() -> Response:
    """The process is alive."""
    return Response(ALIVE, media_type="application/json")


@router.get("/readyz", response_model=None)
async def readyz(resources: ResourcesDep) -> dict[str, Any] | Response:
    """Ready when PostgreSQL answers with the schema this code needs (503 with the reason
    otherwise); Redis and the invalidation listener are reported."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
            async with resources.engine.connect() as connection:
                revisions = await database_revisions(connection)
    except Exception:
        return error_response(
            503, "database_unavailable", "PostgreSQL is not reachable", {"Retry-After": "2"}
        )
    problem = schema_problem(revisions, resources.schema_heads)
    if problem is not None:
        return error_response(503, "schema_not_at_head", problem)
    stream = resources.stream
    if not stream.current:
        # Reports would answer 503 derived_data_unavailable: not ready for them.
        return error_response(
            503,
            "derived_data_unavailable",
            f"the change stream is {stream.state}: {stream.reason}",
            {"Retry-After": "5"},
        )
    cache = resources.cache
    redis_state = "disabled"
    if cache.redis is not None:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
                await cache.redis.ping()
            redis_state = "ok"
        except Exception:
            redis_state = "down"
    return {
        "status": "ready",
        "database": "ok",
        "redis": redis_state,
        "cache_circuit": "open" if cache.breaker.is_open else "closed",
        "invalidation_listener": "connected" if cache.listener_healthy else "disconnected",
        "change_stream": str(stream.state),
        "change_stream_consumer": stream.gauges.consumer,
    }
