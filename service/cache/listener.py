"""Data-driven invalidation: LISTEN for booking changes and drop the affected cache entries.

The change-stream consumer (``service.changes``) sends ``NOTIFY bookings_changed, '<salon
ids>'`` (or ``'*'``) in the transaction that folds a batch of changes to bookings, services,
professionals or salons, whoever wrote them: delivered once the derived data reflects them.
Each worker listens on its own connection, read by a callback on its socket: a notification is
announced to the cache (``ReportCache.announce``: local copies dropped, Redis entries of those
salons no longer served here) the moment it arrives, and the Redis invalidations then run in
rounds that merge everything announced meanwhile, so a slow Redis delays nothing but memory.
While the connection is down the cache is bypassed (the notifications it misses would leave
stale entries behind); after reconnecting, everything cached is treated as possibly stale and
cleared before the cache is used again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

import psycopg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.cache.keys import scope_tag
from service.cache.store import ReportCache
from service.changes.consumer import wait_applied

logger = logging.getLogger("service.cache.listener")

CHANNEL = "bookings_changed"
CLEARED_CHANNEL = "report_cache_cleared"  # admin clears, for the other workers' local tiers


async def broadcast_clear(engine: AsyncEngine, report: str | None, salon_id: int | None) -> None:
    """Tell every worker's local tier about an admin clear (through PostgreSQL NOTIFY)."""
    payload = f"{report or '*'}:{'*' if salon_id is None else salon_id}"
    async with engine.connect() as connection:
        await connection.execute(
            text("SELECT pg_notify(:channel, :payload)").execution_options(
                query_name="cache.broadcast_clear"
            ),
            {"channel": CLEARED_CHANNEL, "payload": payload},
        )
        await connection.commit()


def parse_payload(payload: str) -> set[int] | None:
    """Salon ids of a notification; None means "everything"."""
    if payload.strip() == "*":
        return None
    ids = set()
    for part in payload.split(","):
        part = part.strip()
        if part.isdigit():
            ids.add(int(part))
    return ids


class InvalidationListener:
    """Runs as a background task for the app's lifetime."""

    def __init__(self, dsn: str, cache: ReportCache, *, retry_delay: float = 0.5) -> None:
        self.dsn = dsn
        self.cache = cache
        self.retry_delay = retry_delay
        self.connected = asyncio.Event()
        self.reconnects = 0
        self._task: asyncio.Task[None] | None = None
        self._connection: psycopg.AsyncConnection | None = None
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()  # something arrived, or the connection broke, or stop
        self._broken = False
        self._markers: dict[str, asyncio.Event] = {}  # this process's settle markers
        self._seen: list[tuple[int, asyncio.Event]] = []  # markers arrived, by announcement

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="invalidation-listener")

    async def stop(self) -> None:
        """Stop listening: wake the loop and let it leave on its own, cancel as a last resort."""
        self._stopping.set()
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=2)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        self.connected.clear()

    async def drop_connection(self) -> None:
        """Have the server terminate the listening connection (a network cut, for tests)."""
        connection = self._connection
        if connection is None:
            return
        pid = connection.info.backend_pid
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as admin:
            await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))

    async def _run(self) -> None:
        first = True
        while not self._stopping.is_set():
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.dsn,
                    autocommit=True,
                    connect_timeout=5,
                    application_name="salon-reports-listener",
                    keepalives=1,
                    keepalives_idle=5,
                    keepalives_interval=2,
                    keepalives_count=3,
                ) as connection:
                    self._connection = connection
                    await connection.execute(f"LISTEN {CHANNEL}")
                    await connection.execute(f"LISTEN {CLEARED_CHANNEL}")
                    reconnected, first = not first, False
                    await self._consume(connection, reconnected=reconnected)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                logger.warning(
                    "invalidation listener lost its connection: %s", type(error).__name__
                )
            self.cache.listener_healthy = False
            self.connected.clear()
            self._connection = None
            if not self._stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.retry_delay)

    async def _consume(self, connection: psycopg.AsyncConnection, *, reconnected: bool) -> None:
        """Read notifications straight off the socket until the connection breaks.

        psycopg's ``notifies()`` generator holds the connection lock and does not always
        give up on cancellation; a reader callback on the socket can be removed at any time.
        The callback announces each change to the cache at once; this loop then applies the
        announcements to Redis, a round at a time.
        """
        loop = asyncio.get_running_loop()
        pgconn = connection.pgconn
        self._broken = False

        def on_readable() -> None:
            try:
                pgconn.consume_input()
            except psycopg.OperationalError:
                # libpq has closed the socket: its number may be handed to the next connection
                # anyone opens, before this loop gets to run; stop watching it now.
                loop.remove_reader(fd)
                self._broken = True
                self._wake.set()
                return
            while (notification := pgconn.notifies()) is not None:
                self._arrived(notification.relname.decode(), notification.extra.decode())
            self._wake.set()

        fd = pgconn.socket
        loop.add_reader(fd, on_readable)
        try:
            on_readable()  # anything that arrived with the LISTEN's answer
            if reconnected:
                # Notifications sent while we were away are lost: start clean.
                self.reconnects += 1
                deleted = await self._clear_when_possible()
                logger.warning("listener reconnected; cleared %d cache entries", deleted)
            if self._broken:  # cut again while clearing: what it missed, the next clear covers
                raise ConnectionError("the listening connection was closed")
            self.cache.listener_healthy = True
            self.connected.set()
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._stopping.is_set():
                    return
                if self._broken:
                    raise ConnectionError("the listening connection was closed")
                await self._apply()
        finally:
            loop.remove_reader(fd)

    async def settle(self, timeout: float = 5.0) -> None:
        """Wait until every write committed before this call has been folded by the change
        stream and its notification handled here.

        The stream's consumer notifies when it commits a batch; then a marker goes down the
        same channel: notifications arrive in order, so once the marker is seen, everything
        before it was handled. (Tests use it before counting.)
        """
        await wait_applied(self.dsn, timeout=max(timeout, 30.0))
        marker = f"settle:{uuid.uuid4().hex}"
        seen = asyncio.Event()
        self._markers[marker] = seen
        try:
            async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
                await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, marker))
            await asyncio.wait_for(seen.wait(), timeout)
        finally:
            self._markers.pop(marker, None)

    def _arrived(self, channel: str, payload: str) -> None:
        """One notification, as it comes off the socket (no awaiting here)."""
        if channel == CLEARED_CHANNEL:
            self._drop_local(payload)
            return
        marker = self._markers.get(payload)
        if marker is not None:
            # Seen once everything announced before it has been applied to Redis.
            self._seen.append((self.cache.announced, marker))
            return
        if payload.startswith("settle:"):
            return  # another process's marker
        self.cache.announce(parse_payload(payload))

    def _drop_local(self, payload: str) -> None:
        """``<report or *>:<salon id or *>`` from an admin clear on some worker."""
        report, _, salon = payload.partition(":")
        report_name = None if report == "*" else report
        tag = None if salon == "*" else scope_tag(int(salon))
        self.cache.forget_local(tag, report_name)

    async def _apply(self) -> None:
        """Invalidate in Redis what was announced; then release the markers it covers."""
        try:
            await self.cache.apply_announced()
        except Exception:
            # Redis is down: nothing is served from it until it returns, but entries written
            # before this change may still be there when it does. Clear on the next success.
            logger.warning("could not invalidate after a booking change; bypassing the cache")
            self.cache.listener_healthy = False
            await self._clear_when_possible()
            if not (self._stopping.is_set() or self._broken):  # else the loop ends next
                self.cache.listener_healthy = True
        applied = self.cache.applied
        for entry in [entry for entry in self._seen if entry[0] <= applied]:
            self._seen.remove(entry)
            entry[1].set()

    async def _clear_when_possible(self) -> int:
        """Clear the whole cache, retrying until Redis answers (or the listener stops)."""
        while not self._stopping.is_set():
            try:
                return await self.cache.clear_all()
            except Exception:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.retry_delay)
        return 0
