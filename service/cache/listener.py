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

One invalidator for the fleet. Every worker gets every notification, but the Redis side of a
change is done once: by the listener holding the session advisory lock ``INVALIDATOR_LOCK`` on
its listening connection (lost with that connection). The others (followers) drop their local
tier at once, as before, and stop serving the scopes' Redis entries until the invalidator says
it has invalidated them, through markers on the same channel, which every listener sees in
the same order as the changes:

1. The invalidator sends ``round:start:<its id>:<round>`` and waits until it receives it: every
   change notified before that marker has reached it too.
2. It invalidates in Redis everything announced to it so far, then sends ``round:done:…``.
3. A follower records, when ``round:start`` arrives, how many changes it had been told of;
   when the matching ``round:done`` arrives, those are invalidated in Redis: it settles them.

The interleaving this guards against: a change C2 committed while the invalidator's round is
already under way. C2 reaches a follower before the round's end marker, but the round did not
cover it; it does precede no start marker of that round, so the follower keeps it pending.
A follower can only rely on rounds of an invalidator that was listening when the follower's
changes were sent: each listener announces itself (``listener:<id>``) once it listens, and a
follower settles through an invalidator's round only what it was told after that invalidator's
hello. Whatever is still pending ``FOLLOW_WAIT`` seconds after it arrived (no invalidator, or one
that failed or joined late) the follower invalidates itself, after trying to take the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from typing import Any

import psycopg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.cache.keys import scope_tag
from service.cache.store import ReportCache
from telemetry.background import finish, start_untraced

logger = logging.getLogger("service.cache.listener")

CHANNEL = "bookings_changed"
CLEARED_CHANNEL = "report_cache_cleared"  # admin clears, for the other workers' local tiers

# ('S','R','C','I'): held by the one listener that runs the Redis invalidations for the fleet.
INVALIDATOR_LOCK = (0x53524349, 0)
HELLO = "listener:"  # a listener has started listening: listener:<id>
ROUND_START = "round:start:"  # round:start:<invalidator id>:<round id>
ROUND_DONE = "round:done:"  # round:done:<invalidator id>:<round id>
FOLLOW_WAIT = 1.0  # seconds a follower waits for the invalidator before doing it itself
ROUND_WAIT = 5.0  # seconds the invalidator waits for its own start marker
HELLOS_KEPT = 1000


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
        self.id = uuid.uuid4().hex
        self.invalidator = False  # this listener holds INVALIDATOR_LOCK
        self._hellos: dict[str, int] = {}  # listener id -> announcements before its hello
        self._rounds: dict[str, int] = {}  # round id -> announcements before its start marker
        self._own_rounds: dict[str, asyncio.Event] = {}
        self._unsettled: deque[tuple[int, float]] = deque()  # (announcement, when it came)
        self._execute_lock = asyncio.Lock()
        self._reader: Any = None  # (fd, callback) of the socket reader while consuming
        # What this listener did, for tests and the measurements: rounds it ran as the
        # invalidator, rounds of another invalidator it settled by, and its own fallbacks.
        self.rounds_led = 0
        self.rounds_followed = 0
        self.fallbacks = 0
        self.follow_wait = FOLLOW_WAIT

    def start(self) -> None:
        self._task = start_untraced(self._run(), name="invalidation-listener")

    async def stop(self) -> None:
        """Stop listening: wake the loop and let it leave on its own, cancel as a last resort."""
        self._stopping.set()
        self._wake.set()
        await finish(self._task, grace=2)
        self.connected.clear()

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
                    # Notifications psycopg reads while a statement runs on this connection
                    # (``_execute``) come through here; the others through the socket reader.
                    connection.add_notify_handler(
                        lambda notify: self._arrived(notify.channel, notify.payload)
                    )
                    await connection.execute(f"LISTEN {CHANNEL}")
                    await connection.execute(f"LISTEN {CLEARED_CHANNEL}")
                    self.invalidator = await self._try_lock(connection)
                    await connection.execute(
                        "SELECT pg_notify(%s, %s)", (CHANNEL, f"{HELLO}{self.id}")
                    )
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
            self.invalidator = False  # the lock went with the connection
            self._rounds.clear()
            self._unsettled.clear()
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
        self._reader = (fd, on_readable)
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
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._follow_deadline())
                self._wake.clear()
                if self._stopping.is_set():
                    return
                if self._broken:
                    raise ConnectionError("the listening connection was closed")
                await self._apply()
        finally:
            self._reader = None
            loop.remove_reader(fd)

    async def _try_lock(self, connection: psycopg.AsyncConnection[Any]) -> bool:
        row = await (
            await connection.execute("SELECT pg_try_advisory_lock(%s, %s)", INVALIDATOR_LOCK)
        ).fetchone()
        return bool(row and row[0])

    async def _execute(self, query: str, params: tuple[Any, ...]) -> Any:
        """Run a statement on the listening connection.

        psycopg waits for the answer with its own reader on the socket, which would replace
        ours: ours is taken off meanwhile (what arrives is read by psycopg and handed to the
        notify handler, in order), then put back and run once for anything left buffered.
        """
        connection = self._connection
        if connection is None or self._reader is None:
            raise ConnectionError("the listening connection is not open")
        fd, on_readable = self._reader
        loop = asyncio.get_running_loop()
        async with self._execute_lock:
            loop.remove_reader(fd)
            try:
                cursor = await connection.execute(query, params)
                return await cursor.fetchone()
            except psycopg.OperationalError as error:
                self._broken = True
                self._wake.set()
                raise ConnectionError("the listening connection was closed") from error
            finally:
                if self._reader is not None and not self._broken:
                    loop.add_reader(fd, on_readable)
                    on_readable()

    def _follow_deadline(self) -> float | None:
        """Seconds until the oldest change not yet invalidated in Redis is due for a fallback."""
        applied = self.cache.applied
        while self._unsettled and self._unsettled[0][0] <= applied:
            self._unsettled.popleft()
        if not self._unsettled or self.invalidator:
            return None
        return max(0.0, self._unsettled[0][1] + self.follow_wait - time.monotonic())

    def _arrived(self, channel: str, payload: str) -> None:
        """One notification, as it comes off the socket (no awaiting here)."""
        if channel == CLEARED_CHANNEL:
            self._drop_local(payload)
            return
        if payload.startswith((HELLO, ROUND_START, ROUND_DONE)):
            self._protocol(payload)
            return
        salon_ids = parse_payload(payload)
        if salon_ids is not None and not salon_ids:
            return  # names no salon: not a change (the stream always names its salons or '*')
        self.cache.announce(salon_ids)
        self._unsettled.append((self.cache.announced, time.monotonic()))

    def _protocol(self, payload: str) -> None:
        """A marker of the one-invalidator protocol (see the module's docstring)."""
        if payload.startswith(HELLO):
            self._hellos[payload[len(HELLO) :]] = self.cache.announced
            while len(self._hellos) > HELLOS_KEPT:
                del self._hellos[next(iter(self._hellos))]
            return
        start = payload.startswith(ROUND_START)
        sender, _, round_id = payload[len(ROUND_START if start else ROUND_DONE) :].partition(":")
        if start:
            self._rounds[round_id] = self.cache.announced
            own = self._own_rounds.get(round_id)
            if own is not None:
                own.set()
            return
        before_start = self._rounds.pop(round_id, None)
        if before_start is None or sender == self.id:
            return
        # Only what came after the invalidator listened: it never saw what came before.
        if self.cache.applied >= self._hellos.get(sender, 0):
            self.cache.settle_invalidated(before_start)
            self.rounds_followed += 1

    def _drop_local(self, payload: str) -> None:
        """``<report or *>:<salon id or *>`` from an admin clear on some worker."""
        report, _, salon = payload.partition(":")
        report_name = None if report == "*" else report
        tag = None if salon == "*" else scope_tag(int(salon))
        self.cache.forget_local(tag, report_name)

    async def _apply(self) -> None:
        """Invalidate in Redis what was announced (as the invalidator, or as a follower whose
        changes the invalidator has not covered in time)."""
        if self.cache.announced > self.cache.applied:
            try:
                if self.invalidator:
                    await self._lead_round()
                elif self._follow_deadline() == 0.0:
                    if self._connection is not None:
                        self.invalidator = await self._try_lock_here()
                    self.fallbacks += 1
                    await self.cache.apply_announced()
            except ConnectionError:
                return  # the loop ends next: the connection broke
            except Exception:
                # Redis is down: nothing is served from it until it returns, but entries
                # written before this change may still be there when it does. Clear on the
                # next success.
                logger.warning("could not invalidate after a booking change; bypassing the cache")
                self.cache.listener_healthy = False
                await self._clear_when_possible()
                if not (self._stopping.is_set() or self._broken):  # else the loop ends next
                    self.cache.listener_healthy = True

    async def _try_lock_here(self) -> bool:
        row = await self._execute("SELECT pg_try_advisory_lock(%s, %s)", INVALIDATOR_LOCK)
        return bool(row and row[0])

    async def _lead_round(self) -> None:
        """One round as the invalidator: start marker, Redis, end marker."""
        round_id = uuid.uuid4().hex
        started = asyncio.Event()
        self._own_rounds[round_id] = started
        try:
            await self._execute(
                "SELECT pg_notify(%s, %s)", (CHANNEL, f"{ROUND_START}{self.id}:{round_id}")
            )
            await asyncio.wait_for(started.wait(), ROUND_WAIT)
        finally:
            self._own_rounds.pop(round_id, None)
            self._rounds.pop(round_id, None)
        await self.cache.apply_announced()  # at least what came before the start marker
        self.rounds_led += 1
        await self._execute(
            "SELECT pg_notify(%s, %s)", (CHANNEL, f"{ROUND_DONE}{self.id}:{round_id}")
        )

    async def _clear_when_possible(self) -> int:
        """Clear the whole cache, retrying until Redis answers (or the listener stops)."""
        while not self._stopping.is_set():
            try:
                return await self.cache.clear_all()
            except Exception:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.retry_delay)
        return 0
