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


ALIVE_HEADERS = [(b"content-length", b"%d" % len(ALIVE)), (b"content-type", b"application/json")]


class Alive(BaseModel):
    status: Literal["ok"]


class AnswerLiveness:
    """``GET /healthz`` answered before FastAPI's routing, with the route's own bytes and
    headers: a pure ASGI layer inside the telemetry middleware (so the probe is still traced,
    counted and given ``X-Trace-Id``). It answers only once FastAPI has answered one probe and
    left its route in the scope (telemetry names requests by it); other methods are FastAPI's.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.route: Any = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/healthz" or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        if self.route is not None:
            scope["route"] = self.route
            await send({"type": "http.response.start", "status": 200, "headers": ALIVE_HEADERS})
            await send({"type": "http.response.body", "body": ALIVE})
            return
        await self.app(scope, receive, send)
        route = scope.get("route")
        if getattr(route, "path", None) == "/healthz":
            self.route = route


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
