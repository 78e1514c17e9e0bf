"""The app's resources: everything its lifespan creates (engines, Redis, the cache, the
listener, the change-stream consumer, the stats publisher) and tears down after."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from opentelemetry.instrumentation.redis import RedisInstrumentor
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool

from service.auth import TokenVerifier
from service.cache import CircuitBreaker, LocalTier, ReportCache
from service.cache.durability import ReplicaWait
from service.cache.listener import InvalidationListener
from service.changes.batch import Batch
from service.changes.consumer import ChangeConsumer, StreamMonitor, StreamStatus
from service.config import Settings
from service.db import async_engine, libpq_url
from service.errors import DatabaseUnavailable
from service.fairness import FairScheduler, TenantLeases
from service.reports.names import CACHED_REPORTS
from service.reports.service import ReportService
from service.schema_version import expected_revisions
from service.workers import StatsPublisher
from telemetry.metrics import Instruments, PoolGauges
from telemetry.redis_spans import complete_redis_span, trace_connections
from telemetry.setup import Telemetry
from telemetry.sql import SqlTelemetry

logger = logging.getLogger("service")


@dataclass
class Resources:
    """Everything the app creates in its lifespan and tears down after."""

    settings: Settings
    engine: AsyncEngine
    read_engine: AsyncEngine
    cache: ReportCache
    reports: ReportService
    listener: InvalidationListener | None
    telemetry: Telemetry
    tokens: TokenVerifier
    publisher: StatsPublisher | None = None
    sql_hooks: list[SqlTelemetry] = field(default_factory=list)
    schema_heads: frozenset[str] = field(default_factory=expected_revisions)  # read at start
    stream: StreamStatus = field(default_factory=lambda: StreamStatus())
    stream_monitor: StreamMonitor | None = None
    consumer: ChangeConsumer | None = None


def _redis(settings: Settings) -> Redis | None:
    if not settings.redis_url:
        return None
    if settings.redis_cluster:
        # The cluster client speaks the same commands; every multi-key command and script of
        # the cache stays within one scope's hash tag, hence one slot (service/cache/keys.py).
        # No retries in the client (as the single client's retry_on_timeout=False): a failed
        # call reaches the circuit breaker at once; a dead master's or paused cluster's calls
        # otherwise took about 1 s each (retried, the topology reloaded from a node that does
        # not answer) and held requests that long. The next call reloads the topology.
        cluster = RedisCluster.from_url(
            settings.redis_url,
            retry=Retry(NoBackoff(), 0),
            socket_timeout=settings.redis_timeout,
            socket_connect_timeout=settings.redis_timeout,
            health_check_interval=0,
            max_connections=200,
        )
        return cast(Redis, cluster)
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


def _pool_gauges(
    name: str, engine: AsyncEngine, max_overflow: int, instruments: Instruments
) -> PoolGauges:
    pool = engine.sync_engine.pool
    assert isinstance(pool, QueuePool)

    def status() -> tuple[int, int, int]:
        return pool.checkedin(), pool.checkedout(), pool.size() + max_overflow

    return PoolGauges(name=name, status=status, instruments=instruments)


async def start_resources(
    settings: Settings,
    telemetry: Telemetry,
    *,
    listener_type: type[InvalidationListener] = InvalidationListener,
) -> Resources:
    """Create engines, the Redis client, the cache and the invalidation listener (of
    ``listener_type``: tests hand in one with their own hooks)."""
    engine = _engine(settings, settings.database_url)
    read_engine = engine
    if settings.read_database_url and settings.read_database_url != settings.database_url:
        read_engine = _engine(settings, settings.read_database_url)
    engines = (
        {"primary": engine} if read_engine is engine else {"primary": engine, "read": read_engine}
    )
    telemetry.instruments.pools[:] = [
        _pool_gauges(name, each, settings.pool_max_overflow, telemetry.instruments)
        for name, each in engines.items()
    ]
    sql_hooks = [
        SqlTelemetry(
            each.sync_engine,
            tracer_provider=telemetry.tracer_provider,
            instruments=telemetry.instruments,
            stats=telemetry.stats,
            slow_query_ms=settings.slow_query_ms,
            pool=gauges,
        )
        for each, gauges in zip(engines.values(), telemetry.instruments.pools, strict=True)
    ]
    redis = _redis(settings)
    if redis is not None and telemetry.enabled:
        RedisInstrumentor.instrument_client(
            redis, tracer_provider=telemetry.tracer_provider, response_hook=complete_redis_span
        )
        trace_connections(redis, telemetry.tracer)
    breaker = CircuitBreaker(
        threshold=settings.redis_breaker_threshold, cooldown=settings.redis_breaker_cooldown
    )
    cache = ReportCache(
        redis,
        reports=CACHED_REPORTS,
        unavailable=(DatabaseUnavailable,),
        stale_grace=settings.cache_stale_grace,
        lock_lease=settings.cache_lock_lease,
        breaker=breaker,
        tracer=telemetry.tracer,
        local=LocalTier(settings.cache_local_entries, settings.cache_local_max_age),
        refresh_recent=settings.cache_refresh_recent,
        durability=ReplicaWait(
            settings.redis_wait_replicas,
            settings.redis_wait_timeout_ms,
            counts=telemetry.instruments.replica_waits,
        ),
    )
    # The fair share between tenants, its limit shared through the same Redis (and its
    # circuit breaker: one Redis, one opinion of its health).
    fairness = FairScheduler(
        capacity=settings.pool_size + settings.pool_max_overflow,
        per_tenant=settings.tenant_limit,
        queue=settings.tenant_queue_length,
        queue_timeout=settings.tenant_queue_timeout,
        admin_limit=settings.admin_limit,
        repeat_delay=settings.tenant_repeat_refusal_delay,
        leases=None
        if redis is None
        else TenantLeases(redis, breaker, settings.tenant_lease_seconds),
        counts=telemetry.instruments.fairness,
    )
    listener = None
    publisher = None
    if redis is not None:
        listener = listener_type(libpq_url(settings.session_database_url), cache)
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
            fairness=fairness,
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
