"""The FastAPI application: ``create_app()`` builds it; its lifespan owns every resource."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from redis.asyncio import Redis

from service import __version__
from service.cache import CircuitBreaker, ReportCache
from service.config import Settings, get_settings
from service.db import async_engine, libpq_url
from service.deps import Resources
from service.errors import install_error_handlers
from service.health import router as health_router
from service.invalidation import InvalidationListener
from service.reports.endpoints import router as reports_router
from service.reports.service import ReportService

logger = logging.getLogger("service")


def _redis(settings: Settings) -> Redis | None:
    if not settings.redis_url:
        return None
    return Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout,
        socket_connect_timeout=settings.redis_timeout,
        retry_on_timeout=False,
        health_check_interval=0,
        max_connections=200,
    )


async def start_resources(settings: Settings) -> Resources:
    """Create engines, the Redis client, the cache and the invalidation listener."""
    engine = async_engine(
        settings.database_url,
        pool_size=settings.pool_size,
        max_overflow=settings.pool_max_overflow,
        pool_timeout=settings.pool_timeout,
        statement_timeout_ms=settings.statement_timeout_ms,
    )
    read_engine = engine
    if settings.read_database_url and settings.read_database_url != settings.database_url:
        read_engine = async_engine(
            settings.read_database_url,
            pool_size=settings.pool_size,
            max_overflow=settings.pool_max_overflow,
            pool_timeout=settings.pool_timeout,
            statement_timeout_ms=settings.statement_timeout_ms,
        )
    redis = _redis(settings)
    cache = ReportCache(
        redis,
        stale_grace=settings.cache_stale_grace,
        lock_lease=settings.cache_lock_lease,
        breaker=CircuitBreaker(
            threshold=settings.redis_breaker_threshold,
            cooldown=settings.redis_breaker_cooldown,
        ),
    )
    listener = None
    if redis is not None:
        listener = InvalidationListener(libpq_url(settings.database_url), cache)
        cache.listener_healthy = False  # until the listener has connected
        listener.start()
    return Resources(
        settings=settings,
        engine=engine,
        read_engine=read_engine,
        cache=cache,
        reports=ReportService(read_engine, cache, settings),
        listener=listener,
    )


async def stop_resources(resources: Resources) -> None:
    if resources.listener is not None:
        await resources.listener.stop()
    await resources.cache.close()
    if resources.cache.redis is not None:
        await resources.cache.redis.aclose()
    if resources.read_engine is not resources.engine:
        await resources.read_engine.dispose()
    await resources.engine.dispose()


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.resources = await start_resources(app.state.settings)
    try:
        yield
    finally:
        await stop_resources(app.state.resources)


def create_app(settings: Settings | None = None) -> FastAPI:
    app = FastAPI(
        title="salon-reports",
        version=__version__,
        description=(
            "Reports of a salon-booking platform: dashboard, bookings, professional "
            "performance. Bearer tokens come from `salon-reports token`."
        ),
        lifespan=_lifespan,
    )
    app.state.settings = settings or get_settings()
    install_error_handlers(app)
    app.include_router(health_router)
    app.include_router(reports_router)
    return app
