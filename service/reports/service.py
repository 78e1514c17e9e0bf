"""Report service: scope resolution, cache-aside and single flight; one function per report.

Endpoints hand in an authorised principal and parsed parameters; this module normalises them
into a cache key, asks the cache, and on a miss runs the report's one SQL statement
(``queries``) on the read engine and serialises the typed response once, with orjson. The
bytes stored in the cache are the bytes served.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.auth import Principal
from service.cache import CacheEntry, CacheKey, CacheResult, Outcome, ReportCache, build_key
from service.cache.listener import broadcast_clear
from service.changes.consumer import StreamStatus
from service.config import Settings
from service.errors import APIError, database_error
from service.fairness import LOOKUP_LANE, FairScheduler, Tenant
from service.reports import queries, replica
from service.reports.names import ReportName
from service.reports.params import (
    PLATFORM_TIMEZONE,
    BookingFilters,
    Granularity,
    Period,
    Scope,
    local_today,
)
from service.reports.schemas import (
    BookingsReport,
    DashboardReport,
    ProfessionalsReport,
    RealtimeReport,
    ReportMeta,
)
from telemetry.metrics import PoolGauges
from telemetry.stats import StatsAggregator

SALON_TIMEZONE_TTL = 60.0

T = TypeVar("T")
logger = logging.getLogger("service.reports")


def encode_cursor(after_id: int) -> str:
    return base64.urlsafe_b64encode(orjson.dumps({"after": after_id})).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The professional id a cursor continues after; a 400 for anything we did not issue."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        value = orjson.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        after = value["after"]
        if isinstance(after, int) and not isinstance(after, bool) and 0 < after < 2**63:
            return after
    except (ValueError, KeyError, TypeError, UnicodeError, binascii.Error, orjson.JSONDecodeError):
        pass
    raise APIError(400, "invalid_cursor", "the cursor is malformed; start again without one")


def cache_key(
    report: ReportName, principal: Principal, scope: Scope, params: dict[str, Any]
) -> CacheKey:
    """The key of a report request, from its normalised parameters (``*_params``)."""
    # The time zone is in the key: a request that resolved the salon's zone just before the
    # zone changed must not store its answer where requests after the change look.
    params = {**params, "timezone": scope.timezone}
    return build_key(report, scope.salon_id, principal.scope_key, params)


def dashboard_params(period: Period) -> dict[str, Any]:
    return {"start": period.start.isoformat(), "end": period.end.isoformat()}


def bookings_params(
    period: Period, granularity: Granularity, filters: BookingFilters
) -> dict[str, Any]:
    return {
        "start": period.start.isoformat(),
        "end": period.end.isoformat(),
        "granularity": granularity,
        "professional_id": filters.professional_id,
        "service_id": filters.service_id,
        "status": filters.status,
    }


def professionals_params(period: Period, limit: int, after_id: int | None) -> dict[str, Any]:
    return {
        "start": period.start.isoformat(),
        "end": period.end.isoformat(),
        "limit": limit,
        "after": after_id,
    }


def _serialise(model: BaseModel) -> bytes:
    return orjson.dumps(model.model_dump())


class ReportService:
    def __init__(
        self,
        engine: AsyncEngine,
        cache: ReportCache,
        settings: Settings,
        *,
        pool: PoolGauges | None = None,
        stats: StatsAggregator | None = None,
        stream: StreamStatus | None = None,
        primary: AsyncEngine | None = None,
        fairness: FairScheduler | None = None,
    ) -> None:
        self.engine = engine
        # With a replica (``engine``), the primary: its stream position gates replica reads,
        # and it answers when the replica is behind or gives way to its replay (``replica``).
        self.primary = primary
        self.replica_reads = replica.ReplicaReads()
        self.cache = cache
        self.settings = settings
        self.pool = pool or PoolGauges("read", lambda: (0, 0, 0))
        self.stats = stats
        self.stream = stream if stream is not None else StreamStatus()
        # Salon time zones, looked up once a minute at most, and forgotten as soon as a change
        # to the salon is announced (a lookup that began before it does not store its answer).
        self._timezones: dict[int, tuple[str, float]] = {}
        self._timezone_changes: dict[int | None, int] = {}  # salon (None: all) -> changes seen
        cache.on_announce(self._forget_timezones)
        # Requests queue for a connection here rather than in the pool, whose waiters are woken
        # in no particular order (under a burst of misses the pool let some requests wait past
        # the timeout while later ones went through): round-robin between tenants, first come
        # first served within one, each tenant within its share (service/fairness.py).
        self.fairness = fairness or FairScheduler(
            capacity=settings.pool_size + settings.pool_max_overflow,
            per_tenant=settings.tenant_limit,
            queue=settings.tenant_queue_length,
            queue_timeout=settings.tenant_queue_timeout,
            admin_limit=settings.admin_limit,
        )

    @asynccontextmanager
    async def _connection(
        self, engine: AsyncEngine | None = None, lane: str = LOOKUP_LANE
    ) -> AsyncIterator[AsyncConnection]:
        """A read connection (from ``engine``, by default the read engine) at ``lane``'s turn
        (``service.fairness``); database failures become a 503 the client can retry."""
        pool = self.pool
        pool.waiting += 1
        waiting = True
        asked = time.perf_counter()
        try:
            async with (
                self.fairness.turn(lane, self.settings.pool_timeout),
                (engine or self.engine).connect() as connection,
            ):
                pool.waiting -= 1
                waiting = False
                got = time.perf_counter()
                pool.record_wait(got - asked)
                try:
                    yield connection
                finally:
                    pool.record_use(time.perf_counter() - got)
        except PoolTimeoutError as error:
            pool.timeouts += 1
            if self.stats is not None:
                self.stats.record_pool_timeout()
            raise database_error(error) from error
        except (OperationalError, InterfaceError) as error:
            raise database_error(error) from error
        finally:
            if waiting:
                pool.waiting -= 1

    async def _read(
        self, run: Callable[[AsyncConnection], Awaitable[T]], tenant: Tenant | None = None
    ) -> T:
        """Run ``run`` where its answer may be cached: on the replica only when it has replayed
        every fold committed before the read began, else on the primary (see ``replica``).
        A report computation names its ``tenant``: it runs within the tenant's fair share (429
        when the tenant is over it)."""
        if tenant is None:
            return await self._read_at(run, LOOKUP_LANE)
        async with self.fairness.computation(tenant):
            return await self._read_at(run, tenant.key)

    async def _read_at(self, run: Callable[[AsyncConnection], Awaitable[T]], lane: str) -> T:
        if self.primary is None:
            async with self._connection(lane=lane) as connection:
                return await run(connection)
        async with self._connection(self.primary, lane) as connection:
            mark = await replica.watermark(connection)
        try:
            async with self._connection(lane=lane) as connection:
                await connection.execution_options(isolation_level="REPEATABLE READ")
                if await replica.caught_up(connection, mark):
                    result = await run(connection)
                    self.replica_reads.replica += 1
                    return result
            self.replica_reads.primary_behind += 1
        except APIError as error:
            if replica.recovery_conflict(error):
                logger.warning(
                    "a report query gave way to the replica's replay; asking the primary"
                )
                self.replica_reads.primary_conflict += 1
            elif replica.connection_lost(error):
                logger.warning("a report query lost its replica connection; asking the primary")
                self.replica_reads.primary_lost += 1
            else:
                raise
        async with self._connection(self.primary, lane) as connection:
            return await run(connection)

    async def resolve_scope(self, salon_id: int | None) -> Scope:
        """The scope of a request; 404 for a salon that does not exist."""
        if salon_id is None:
            return Scope(None, PLATFORM_TIMEZONE)
        known = self._timezones.get(salon_id)
        now = time.monotonic()
        if known is not None and known[1] > now:
            return Scope(salon_id, known[0])
        changes = self._changes_of(salon_id)
        timezone = await self._read(lambda connection: queries.salon_timezone(connection, salon_id))
        if timezone is None:
            raise APIError(404, "salon_not_found", f"there is no salon {salon_id}")
        if changes == self._changes_of(salon_id):
            self._timezones[salon_id] = (timezone, now + SALON_TIMEZONE_TTL)
        return Scope(salon_id, timezone)

    def known_scope(self, salon_id: int | None) -> Scope | None:
        """The scope ``resolve_scope`` would answer without a query, if it would."""
        if salon_id is None:
            return Scope(None, PLATFORM_TIMEZONE)
        known = self._timezones.get(salon_id)
        if known is not None and known[1] > time.monotonic():
            return Scope(salon_id, known[0])
        return None

    def _changes_of(self, salon_id: int) -> tuple[int, int]:
        return self._timezone_changes.get(None, 0), self._timezone_changes.get(salon_id, 0)

    def _forget_timezones(self, salon_ids: set[int] | None) -> None:
        if salon_ids is None:
            self._timezone_changes[None] = self._timezone_changes.get(None, 0) + 1
            self._timezones.clear()
            return
        for salon_id in salon_ids:
            self._timezone_changes[salon_id] = self._timezone_changes.get(salon_id, 0) + 1
            self._timezones.pop(salon_id, None)

    async def clear_cache(self, report: ReportName | None, salon_id: int | None) -> int:
        """The admin clear: one salon's cached reports (of one report or all), else every
        salon's, in this worker and Redis; the other workers drop their local copies when the
        broadcast reaches them. Returns how many entries went."""
        deleted = await self.cache.clear(report, salon_id)
        await broadcast_clear(self.primary or self.engine, report, salon_id)
        return deleted

    def today(self, scope: Scope) -> date:
        return local_today(scope.timezone)

    async def _cached(
        self,
        report: ReportName,
        principal: Principal,
        scope: Scope,
        params: dict[str, Any],
        compute: Callable[[], Awaitable[bytes]],
    ) -> Outcome:
        # Neither computed nor cached figures are current while the stream is not.
        self.stream.require_current()
        key = cache_key(report, principal, scope, params)
        tenant = Tenant.of(principal, scope.salon_id)

        async def current() -> bytes:
            # Checked again when it runs: the cache may run it later (a recomputation after
            # an invalidation, a refresh), when the stream may no longer be current.
            self.stream.require_current()
            return await compute()

        return await self.cache.fetch(
            key,
            self.settings.cache_ttl(report),
            current,
            before_fill=lambda: self.fairness.refuse_if_full(tenant),
        )

    @staticmethod
    def _meta(scope: Scope, period: Period) -> ReportMeta:
        return ReportMeta(
            salon_id=scope.salon_id, timezone=scope.timezone, start=period.start, end=period.end
        )

    async def dashboard(self, principal: Principal, scope: Scope, period: Period) -> Outcome:
        tenant = Tenant.of(principal, scope.salon_id)

        async def compute() -> bytes:
            data = await self._read(
                lambda connection: queries.dashboard_metrics(connection, scope, period), tenant
            )
            return _serialise(DashboardReport(meta=self._meta(scope, period), **data))

        params = dashboard_params(period)
        return await self._cached(ReportName.DASHBOARD, principal, scope, params, compute)

    async def bookings(
        self,
        principal: Principal,
        scope: Scope,
        period: Period,
        granularity: Granularity,
        filters: BookingFilters,
    ) -> Outcome:
        tenant = Tenant.of(principal, scope.salon_id)

        async def compute() -> bytes:
            data = await self._read(
                lambda connection: queries.booking_metrics(
                    connection, scope, period, granularity, filters
                ),
                tenant,
            )
            return _serialise(BookingsReport(meta=self._meta(scope, period), **data))

        params = bookings_params(period, granularity, filters)
        return await self._cached(ReportName.BOOKINGS, principal, scope, params, compute)

    async def professionals(
        self,
        principal: Principal,
        scope: Scope,
        period: Period,
        limit: int,
        after_id: int | None,
    ) -> Outcome:
        tenant = Tenant.of(principal, scope.salon_id)

        async def compute() -> bytes:
            page = await self._read(
                lambda connection: queries.professional_performance(
                    connection, scope, period, limit=limit, after_id=after_id
                ),
                tenant,
            )
            next_after = page["next_after_id"]
            report = ProfessionalsReport(
                meta=self._meta(scope, period),
                items=page["items"],
                next_cursor=None if next_after is None else encode_cursor(next_after),
            )
            return _serialise(report)

        params = professionals_params(period, limit, after_id)
        return await self._cached(ReportName.PROFESSIONALS, principal, scope, params, compute)

    async def realtime(self, principal: Principal, scope: Scope) -> Outcome:
        """Never cached: today's figures straight from the database."""
        started = time.perf_counter()
        today = self.today(scope)
        tenant = Tenant.of(principal, scope.salon_id)
        async with (
            self.fairness.computation(tenant),
            self._connection(lane=tenant.key) as connection,
        ):
            data = await queries.realtime_metrics(connection, scope, today)
        body = _serialise(
            RealtimeReport(
                salon_id=scope.salon_id,
                timezone=scope.timezone,
                date=today,
                as_of=datetime.now(UTC).replace(microsecond=0),
                **data,
            )
        )
        compute_ms = (time.perf_counter() - started) * 1000
        return Outcome(
            CacheEntry.of(body, 0, time.time()), CacheResult.BYPASS, compute_ms=compute_ms
        )
