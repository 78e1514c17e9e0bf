"""The change-stream consumer and each worker's view of the stream.

``ChangeConsumer`` runs in every ``salon-reports serve`` worker (and in ``salon-reports
follow``); exactly one of them folds the stream at a time. It is elected through a session
advisory lock on its own connection: the holder folds batches (``stream.Folder``) every
as they stream in; the others try again every ``election_interval``. When the holder dies, its
connection closes, PostgreSQL releases the lock, and another worker takes over within a second
or two (server-side TCP keepalives bound how long a vanished host keeps it).

``StreamMonitor`` runs in every worker: it reads the position and the slot every second into a
``StreamStatus`` (which report requests check, and the metrics and stats read). While the
stream is not ``current`` the reports answer 503 ``derived_data_unavailable``: their figures
could be behind by any amount, and nothing would invalidate the cache. When it becomes current
again (after ``rollups rebuild``), every cached report is dropped before answers resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from service.changes.batch import Batch
from service.changes.position import ELECTION_LOCK, State, read_position
from service.changes.rebuild import emit_marker, rebuild_on
from service.changes.stream import Folder
from service.errors import APIError
from telemetry.background import finish, start_untraced, untraced
from telemetry.metrics import StreamGauges

logger = logging.getLogger("service.changes")

RETRY_AFTER_SECONDS = 5
# Server-side keepalives: a consumer whose host vanished loses the election lock within ~25 s.
_SESSION_OPTIONS = (
    "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3"
    " -c lock_timeout=2000 -c statement_timeout=0 -c work_mem=64MB"
)


class StreamStatus:
    """This worker's view of the change stream (updated by the monitor and the consumer)."""

    def __init__(self, gauges: StreamGauges | None = None) -> None:
        self.state = State.UNINITIALISED
        self.reason: str | None = "the change stream has not been read yet"
        self.gauges = gauges if gauges is not None else StreamGauges()
        self.known = asyncio.Event()  # set once the state was read at least once

    @property
    def current(self) -> bool:
        return self.state is State.CURRENT

    def require_current(self) -> None:
        """503 while the derived data may be behind by more than the freshness contract."""
        if self.state is not State.CURRENT:
            raise APIError(
                503,
                "derived_data_unavailable",
                f"report figures are not current: the change stream is {self.state}"
                f" ({self.reason}); an operator runs `salon-reports rollups rebuild`",
                {"Retry-After": str(RETRY_AFTER_SECONDS)},
            )


_MONITOR = """
    SELECT p.state, p.reason, s.slot_name IS NOT NULL, s.wal_status,
           coalesce(pg_current_wal_lsn() - s.confirmed_flush_lsn, 0)::bigint,
           coalesce(pg_current_wal_lsn() - s.restart_lsn, 0)::bigint
    FROM change_stream_position p
    LEFT JOIN pg_replication_slots s
        ON s.slot_name = p.slot_name AND s.database = current_database()
"""


class StreamMonitor:
    """Reads the stream's state every ``interval`` seconds into a ``StreamStatus``."""

    def __init__(
        self,
        dsn: str,
        status: StreamStatus,
        *,
        on_current: Callable[[], Awaitable[Any]] | None = None,
        interval: float = 1.0,
    ) -> None:
        self.dsn = dsn
        self.status = status
        self.on_current = on_current
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._connection: psycopg.AsyncConnection[Any] | None = None

    def start(self) -> None:
        self._task = start_untraced(self._run(), name="change-stream-monitor")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._connection is not None:
            await self._connection.close()

    async def poll(self) -> None:
        """Read the state once (also called directly at start and by tests). Untraced, like
        the loop: clearing the cache when the stream comes back is background work."""
        with untraced():
            await self._poll()

    async def _poll(self) -> None:
        if self._connection is None or self._connection.closed:
            self._connection = await psycopg.AsyncConnection.connect(
                self.dsn,
                autocommit=True,
                connect_timeout=5,
                application_name="salon-reports-stream-monitor",
            )
        row = await (await self._connection.execute(_MONITOR)).fetchone()
        if row is None:
            raise RuntimeError("change_stream_position is empty: run `salon-reports migrate`")
        state, reason, slot_exists, wal_status, backlog, retained = row
        state = State(state)
        if state is State.CURRENT and (not slot_exists or wal_status == "lost"):
            state, reason = State.LOST, "the change stream's replication slot is gone"
        await self.apply(state, reason, backlog, retained)

    async def apply(self, state: State, reason: str | None, backlog: int, retained: int) -> None:
        status = self.status
        gauges = status.gauges
        gauges.backlog_bytes, gauges.retained_wal_bytes = int(backlog), int(retained)
        gauges.lost = state is State.LOST
        if state is State.CURRENT and status.state is not State.CURRENT and status.known.is_set():
            # Cached answers may predate the outage; nothing invalidated them meanwhile.
            if self.on_current is not None:
                await self.on_current()
            logger.warning("change stream current again; cached reports dropped")
        if state is not status.state and state is not State.CURRENT:
            logger.error("change stream %s: %s", state, reason)
        status.state, status.reason = state, reason if state is not State.CURRENT else None
        gauges.state, gauges.reason = str(state), status.reason
        status.known.set()

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                logger.warning("change stream monitor: %s", type(error).__name__)
                if self._connection is not None:
                    with contextlib.suppress(Exception):
                        await self._connection.close()
                    self._connection = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.interval)


class ChangeConsumer:
    """Folds the change stream while it holds the election lock (see the module docstring)."""

    def __init__(
        self,
        dsn: str,
        *,
        status: StreamStatus | None = None,
        on_batch: Callable[[Batch], None] | None = None,
        election_interval: float = 1.0,
    ) -> None:
        self.dsn = dsn
        self.status = status if status is not None else StreamStatus()
        self.on_batch = on_batch
        self.election_interval = election_interval
        self.leading = asyncio.Event()
        self.batches = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    def start(self) -> None:
        self._task = start_untraced(self.run(), name="change-stream-consumer")

    def request_stop(self) -> None:
        """Ask ``run`` to return (from a signal handler or another thread's loop call)."""
        self._stopping.set()

    async def stop(self) -> None:
        """Stop folding. Cancelling mid-batch is safe: a batch whose transaction did not
        commit comes again from the recorded position."""
        self._stopping.set()
        await finish(self._task, grace=0.2)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def run(self) -> None:
        """Until ``stop()``: win the election, then fold; on any failure, start over."""
        while not self._stopping.is_set():
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.dsn,
                    autocommit=True,
                    connect_timeout=5,
                    application_name="salon-reports-consumer",
                    options=_SESSION_OPTIONS,
                ) as connection:
                    if await self._elect(connection):
                        await self._lead(connection)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                logger.warning("change stream consumer: %s: %s", type(error).__name__, error)
            self.leading.clear()
            self.status.gauges.consumer = False
            if not self._stopping.is_set():
                await self._pause(self.election_interval)

    async def _elect(self, connection: psycopg.AsyncConnection[Any]) -> bool:
        while not self._stopping.is_set():
            row = await (
                await connection.execute("SELECT pg_try_advisory_lock(%s, %s)", ELECTION_LOCK)
            ).fetchone()
            if row is not None and row[0]:
                logger.info("this worker folds the change stream")
                return True
            await self._pause(self.election_interval)
        return False

    async def _lead(self, connection: psycopg.AsyncConnection[Any]) -> None:
        self.leading.set()
        self.status.gauges.consumer = True
        folder = Folder(connection, self.dsn)
        while not self._stopping.is_set():
            position = await folder.run(self._stopping, self._record)
            if position.state is State.UNINITIALISED and not self._stopping.is_set():
                rebuilt = await rebuild_on(connection)
                logger.warning(
                    "change stream initialised: slot %s, derived tables rebuilt in %.1f s",
                    rebuilt.slot_name,
                    rebuilt.seconds,
                )
            elif position.state is State.LOST:
                await self._pause(self.election_interval)  # until `rollups rebuild`

    def _record(self, batch: Batch) -> None:
        self.batches += 1
        if self.on_batch is not None:
            self.on_batch(batch)


async def wait_applied(dsn: str, timeout: float = 30.0) -> None:
    """Return once the derived tables reflect every write committed before the call.

    With a consumer running elsewhere, waits for it; with none (a script, a test), folds the
    stream on this connection, electing itself the way ``ChangeConsumer`` does.
    """
    deadline = time.monotonic() + timeout
    async with await psycopg.AsyncConnection.connect(
        dsn, autocommit=True, application_name="salon-reports-wait"
    ) as connection:
        marker = await emit_marker(connection)
        # Folds the stream here unless a consumer already does (the election decides).
        consumer = ChangeConsumer(dsn, election_interval=0.2)
        consumer.start()
        pause = 0.002
        try:
            while True:
                position = await read_position(connection)
                if position.state is State.LOST:
                    raise RuntimeError(f"the change stream is lost: {position.reason}")
                if position.state is State.CURRENT and (position.applied or 0) >= marker:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"the change stream did not apply its backlog within {timeout:g} s"
                    )
                # polls often at first (a test waits for one write), less while a backlog drains
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.05)
        finally:
            await consumer.stop()
