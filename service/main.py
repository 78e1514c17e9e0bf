"""The FastAPI application: ``create_app()`` builds it; its lifespan owns every resource."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from opentelemetry.instrumentation.redis import RedisInstrumentor
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool

from service import __version__
from service.auth import TokenVerifier
from service.cache import CircuitBreaker, LocalTier, ReportCache
from service.cache.listener import InvalidationListener
from service.changes.consumer import ChangeConsumer, StreamMonitor, StreamStatus
from service.changes.stream import Batch
from service.config import Settings, get_settings
from service.db import async_engine, libpq_url
from service.deps import Resources
from service.errors import DatabaseUnavailable, install_error_handlers
from service.health import router as health_router
from service.page import router as page_router
from service.performance import StatsPublisher
from service.performance import router as performance_router
from service.reports.endpoints import router as reports_router
from service.reports.names import CACHED_REPORTS
from service.reports.schemas import error_responses
from service.reports.service import ReportService
from service.schema_version import log_schema_state
from telemetry.metrics import PoolGauges
from telemetry.middleware import TelemetryMiddleware
from telemetry.setup import Telemetry, configure
from telemetry.sql import SqlTelemetry

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


def _engine(settings: Settings, url: str) -> AsyncEngine:
    return async_engine(
        url,
        pool_size=settings.pool_size,
        max_overflow=settings.pool_max_overflow,
        pool_timeout=settings.pool_timeout,
        statement_timeout_ms=settings.statement_timeout_ms,
        transaction_pooling=settings.transaction_pooling,
    )


def _pool_gauges(name: str, engine: AsyncEngine, max_overflow: int) -> PoolGauges:
    pool = engine.sync_engine.pool
    assert isinstance(pool, QueuePool)

    def status() -> tuple[int, int, int]:
        return pool.checkedin(), pool.checkedout(), pool.size() + max_overflow

    return PoolGauges(name=name, status=status)


async def start_resources(settings: Settings, telemetry: Telemetry) -> Resources:
    """Create engines, the Redis client, the cache and the invalidation listener."""
    engine = _engine(settings, settings.database_url)
    read_engine = engine
    if settings.read_database_url and settings.read_database_url != settings.database_url:
        read_engine = _engine(settings, settings.read_database_url)
    engines = (
        {"primary": engine} if read_engine is engine else {"primary": engine, "read": read_engine}
    )
    sql_hooks = [
        SqlTelemetry(
            each.sync_engine,
            tracer_provider=telemetry.tracer_provider,
            instruments=telemetry.instruments,
            stats=telemetry.stats,
            slow_query_ms=settings.slow_query_ms,
        )
        for each in engines.values()
    ]
    telemetry.instruments.pools[:] = [
        _pool_gauges(name, each, settings.pool_max_overflow) for name, each in engines.items()
    ]
    redis = _redis(settings)
    if redis is not None and telemetry.enabled:
        RedisInstrumentor.instrument_client(redis, tracer_provider=telemetry.tracer_provider)
    cache = ReportCache(
        redis,
        reports=CACHED_REPORTS,
        unavailable=(DatabaseUnavailable,),
        stale_grace=settings.cache_stale_grace,
        lock_lease=settings.cache_lock_lease,
        breaker=CircuitBreaker(
            threshold=settings.redis_breaker_threshold,
            cooldown=settings.redis_breaker_cooldown,
        ),
        tracer=telemetry.tracer,
        local=LocalTier(settings.cache_local_entries, settings.cache_local_max_age),
    )
    listener = None
    publisher = None
    if redis is not None:
        listener = InvalidationListener(libpq_url(settings.session_database_url), cache)
        cache.listener_healthy = False  # until the listener has connected
        listener.start()
        publisher = StatsPublisher(redis, telemetry)
        publisher.start()
    primary_dsn = libpq_url(settings.session_database_url)
    stream = StreamStatus()
    telemetry.instruments.stream = stream.gauges
    monitor = StreamMonitor(primary_dsn, stream, on_current=cache.clear_all)
    try:
        await monitor.poll()
    except Exception as error:  # not migrated, or the database is down: reported by /readyz
        logger.error("cannot read the change stream's state: %s", error)
    monitor.start()
    consumer = ChangeConsumer(primary_dsn, status=stream, on_batch=_freshness_recorder(telemetry))
    consumer.start()
    read_pool = telemetry.instruments.pools[-1]
    return Resources(
        settings=settings,
        engine=engine,
        read_engine=read_engine,
        cache=cache,
        reports=ReportService(
            read_engine,
            cache,
            settings,
            pool=read_pool,
            stats=telemetry.stats,
            stream=stream,
            primary=None if read_engine is engine else engine,
        ),
        listener=listener,
        telemetry=telemetry,
        tokens=TokenVerifier(
            settings.jwt_secret,
            leeway=settings.jwt_leeway,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
        ),
        publisher=publisher,
        sql_hooks=sql_hooks,
        stream=stream,
        stream_monitor=monitor,
        consumer=consumer,
    )


def _freshness_recorder(telemetry: Telemetry) -> Callable[[Batch], None]:
    """Record each applied transaction's commit -> applied lag (metrics and stats)."""
    histogram = telemetry.instruments.freshness_lag
    stats = telemetry.stats

    def record(batch: Batch) -> None:
        for lag in batch.lags:
            histogram.record(lag)
            stats.record_freshness(lag)

    return record


async def stop_resources(resources: Resources) -> None:
    if resources.consumer is not None:
        await resources.consumer.stop()
    if resources.stream_monitor is not None:
        await resources.stream_monitor.stop()
    if resources.publisher is not None:
        await resources.publisher.stop()
    if resources.listener is not None:
        await resources.listener.stop()
    await resources.cache.close()
    if resources.cache.redis is not None:
        await resources.cache.redis.aclose()
    for hooks in resources.sql_hooks:
        hooks.detach()
    if resources.read_engine is not resources.engine:
        await resources.read_engine.dispose()
    await resources.engine.dispose()


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
    app.include_router(health_router, responses=error_responses(503))
    app.include_router(reports_router)
    app.include_router(performance_router, responses=error_responses(401, 403))
    app.include_router(page_router)
    app.add_middleware(
        TelemetryMiddleware,
        tracer=telemetry.tracer,
        instruments=telemetry.instruments,
        stats=telemetry.stats,
    )
    return app
