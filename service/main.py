"""The FastAPI application: ``create_app()`` builds it; its lifespan starts and stops the
resources (``service.resources``)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import fastapi.routing
from fastapi import FastAPI, Request
from starlette.responses import Response

from service import __version__
from service.config import Settings, get_settings
from service.errors import error_response, error_responses, install_error_handlers
from service.fairness import TenantThrottled
from service.health import AnswerLiveness
from service.health import router as health_router
from service.page import router as page_router
from service.performance import router as performance_router
from service.reports.endpoints import router as reports_router
from service.reports.hits import CachedReportHits
from service.resources import start_resources, stop_resources
from service.schema_version import log_schema_state
from telemetry.middleware import TelemetryMiddleware
from telemetry.setup import Telemetry, configure

logger = logging.getLogger("service")


async def _on_throttled(request: Request, error: Exception) -> Response:
    """A 429 of the fair share: the APIError answer, after the repeat refusal's delay."""
    assert isinstance(error, TenantThrottled)
    await request.app.state.resources.reports.fairness.hold(error)
    return error_response(error.status_code, error.code, error.message, error.headers)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    telemetry: Telemetry = app.state.telemetry
    app.state.resources = await start_resources(app.state.settings, telemetry)
    await log_schema_state(app.state.resources.engine, app.state.resources.schema_heads)
    try:
        yield
    finally:
        await stop_resources(app.state.resources)
        telemetry.shutdown()  # flushes spans and metrics still queued for export


def create_app(settings: Settings | None = None, telemetry: Telemetry | None = None) -> FastAPI:
    settings = settings or get_settings()
    telemetry = telemetry or configure(
        version=__version__,
        environment=settings.environment,
        slow_query_ms=settings.slow_query_ms,
    )
    app = FastAPI(
        title="salon-reports",
        version=__version__,
        description=(
            "Reports of a salon-booking platform: dashboard, bookings, professional "
            "performance. Bearer tokens come from `salon-reports token`."
        ),
        lifespan=_lifespan,
        # FastAPI's own OpenTelemetry support stays off: TelemetryMiddleware makes the server
        # span and the metrics (one span per request, not one per dependency), and the check
        # whether global providers are set would otherwise run on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.telemetry = telemetry
    install_error_handlers(app)
    app.add_exception_handler(TenantThrottled, _on_throttled)
    app.include_router(health_router, responses=error_responses(503))
    app.include_router(reports_router)
    app.include_router(performance_router, responses=error_responses(401, 403))
    app.include_router(page_router)
    # Added first, so they run inside TelemetryMiddleware: the cache hits and probes they
    # answer are traced, counted and carry X-Trace-Id like every other request.
    app.add_middleware(CachedReportHits)
    app.add_middleware(AnswerLiveness)
    app.add_middleware(
        TelemetryMiddleware,
        tracer=telemetry.tracer,
        instruments=telemetry.instruments,
        stats=telemetry.stats,
        slo=telemetry.slo,
    )
    prepare_routes(app.router.routes)
    return app


def prepare_routes(routes: Iterable[Any]) -> int:
    """Have FastAPI prepare its routes now rather than in the first request.

    FastAPI (0.16x) builds an included router's routes (their dependencies, parameter and
    response models) the first time a request is matched against them: 12-14 ms for the
    reports router, the largest part of what no span of the first request explained (see
    "First-use work" in telemetry/README.md). ``effective_candidates`` and
    ``effective_low_priority_routes`` are the calls its matching makes; a FastAPI without
    them has nothing to prepare. A route added later is prepared at its first match, as
    usual. Returns how many included routers were prepared.

    It also has FastAPI read each endpoint's source position (file and line, kept for its
    error messages), which FastAPI does at an endpoint's first request with
    ``inspect.getsourcelines``: that tokenizes the module (and, the first time in a process,
    compiles the tokenizer's expressions), 5-25 ms in the first request of each endpoint.
    """
    extract_context = getattr(fastapi.routing, "_extract_endpoint_context", None)
    prepared = 0
    for route in routes:
        endpoint = getattr(getattr(route, "dependant", None), "call", None)
        if callable(extract_context) and endpoint is not None:
            extract_context(endpoint)
        candidates = getattr(route, "effective_candidates", None)
        if callable(candidates):
            prepared += 1 + prepare_routes(candidates())
        low_priority = getattr(route, "effective_low_priority_routes", None)
        if callable(low_priority):
            low_priority()
    return prepared
