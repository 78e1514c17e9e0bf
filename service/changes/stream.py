"""Reading the change stream and folding it into the derived tables, exactly once.

The stream is a logical replication slot decoded by wal2json (format 2) and streamed over the
replication protocol (``replication.py``). ``Folder.run`` is one streaming session:

1. Under the apply lock (a session advisory lock that ``rollups rebuild`` takes too), read
   ``change_stream_position`` and the slot. Between batches the derived tables reflect exactly
   the transactions whose commit record starts before ``position.applied_lsn``, and the slot's
   ``confirmed_flush_lsn`` is at most that. A slot that is missing, invalidated
   (``max_slot_wal_keep_size``) or ahead of the position (someone else consumed it, or the
   position was restored from an old backup) means changes were lost: the state becomes
   ``lost`` and stays so until ``rollups rebuild``.
2. ``START_REPLICATION`` from ``applied_lsn``: the server skips every commit that starts before
   it and sends the others in commit order, each transaction whole (B, its changes, C).
3. Changes are gathered up to a transaction boundary (a batch closes when no message arrived
   for ``quiet`` seconds, when its first change waited ``max_delay`` seconds, or when it holds
   ``max_rows`` rows), then, in one transaction under the
   apply lock: copied into the temporary tables of ``batch.py``, folded into the derived
   tables (``derived.py``), the salons they touched notified (NOTIFY is delivered at commit, so
   a cache refilled after the notification reads derived data that already reflects the
   change), ``applied_lsn`` set to the end of the batch's last commit; commit.
4. Only then is that LSN reported to the server as flushed.

A crash anywhere leaves either nothing committed (the batch comes again from the old position)
or the position committed (the stream resumes after it): never a batch folded twice or
skipped. After a rebuild, the transactions already visible in the rebuild's snapshot are
skipped until the position passes the LSN taken with that snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
import psycopg

from service.changes import derived
from service.changes.batch import CREATE_BATCH, DELTA_COLUMNS, FIRST_COLUMNS, Batch
from service.changes.position import (
    INVALIDATION_CHANNEL,
    ApplyLock,
    Position,
    RebuildSkip,
    State,
    lost_error,
    lsn_bytes,
    mark_lost,
    read_position,
)
from service.changes.replication import ReplicationError, ReplicationStream, format_lsn

logger = logging.getLogger("service.changes")

PLUGIN = "wal2json"
# Non-transactional logical messages with this prefix make the consumer record its position
# even when nothing else changed; ``wait_applied`` uses one as a marker.
MARKER_PREFIX = "salon_reports.marker"
# Tables whose changes the stream carries: bookings feed the derived tables; all four
# invalidate the cached reports of the salons they belong to.
STREAMED_TABLES = ("bookings", "services", "professionals", "salons")
NOTIFY_PAYLOAD_LIMIT = 7000  # NOTIFY payloads stop at 8000 bytes: more salons mean "all"

# When nothing relevant changed, the position is still recorded after this much WAL or time,
# so the slot releases WAL; not after every empty transaction, or recording the position
# (itself a transaction in the stream) would keep the stream busy.
IDLE_ADVANCE_BYTES = 64 * 1024
IDLE_ADVANCE_SECONDS = 5.0


OPTIONS = {
    "format-version": "2",
    "include-xids": "1",
    "include-timestamp": "1",
    "include-lsn": "1",
    "include-types": "0",
    "add-tables": ",".join(f"*.{table}" for table in STREAMED_TABLES),
    "add-msg-prefixes": MARKER_PREFIX,
}


def xid8(xid: str, snapshot: str) -> str:
    """SQL: the 64-bit form of the 32-bit ``xid`` (wal2json and the peek give those), taken
    in the epoch of ``snapshot``'s xmax (xids in use are within 2^31 of each other)."""
    horizon = f"pg_snapshot_xmax({snapshot})::text::bigint"
    full = f"((({horizon}) >> 32) << 32 | {xid}::text::bigint)"
    return (
        f"(CASE WHEN {full} - {horizon} > 2147483648 THEN {full} - 4294967296"
        f" WHEN {horizon} - {full} > 2147483648 THEN {full} + 4294967296"
        f" ELSE {full} END)::text::xid8"
    )


# Booking transactions of the batch that a fresh snapshot does not see yet. A commit record
# reaches the WAL (and so the stream) an instant before the transaction leaves the proc array;
# the first-booking recomputation must wait for that instant, or it could miss the change.
_NOT_YET_VISIBLE = f"""
    SELECT count(*) FROM unnest(%s::text[]) AS t(xid)
    WHERE NOT pg_visible_in_snapshot({xid8("t.xid", "pg_current_snapshot()")},
                                     pg_current_snapshot())
"""


class Restart(Exception):
    """The position moved under the consumer (a rebuild): stream again from the new one."""


class Folder:
    """One streaming session on ``dsn``, folding on ``connection`` (autocommit; temporary tables
    live on it)."""

    def __init__(
        self,
        connection: psycopg.AsyncConnection[Any],
        dsn: str,
        *,
        quiet: float = 0.02,
        max_delay: float = 0.1,
        max_rows: int = 50_000,
        idle_poll: float = 0.5,
    ) -> None:
        self.connection = connection
        self.dsn = dsn
        self.quiet = quiet
        self.max_delay = max_delay
        self.max_rows = max_rows
        self.idle_poll = idle_poll
        self.applied = 0
        self._recorded_at = 0.0
        self._prepared = False

    async def _prepare(self) -> None:
        if not self._prepared:
            await self.connection.execute(CREATE_BATCH)
            self._prepared = True

    async def check(self) -> Position:
        """Read the position; mark the stream lost if the slot cannot serve it."""
        async with ApplyLock(self.connection):
            position = await read_position(self.connection)
            reason = position.loss()
            if reason is not None:
                await mark_lost(self.connection, reason)
                position = await read_position(self.connection)
        return position

    async def run(
        self, stopping: asyncio.Event, on_batch: Callable[[Batch], None] | None = None
    ) -> Position:
        """Stream and fold until ``stopping`` is set or the stream cannot go on; the position
        (uninitialised or lost) when it cannot."""
        await self._prepare()
        position = await self.check()
        if position.state is not State.CURRENT:
            return position
        assert position.slot_name is not None
        self.applied = position.applied or 0
        skip = RebuildSkip(position.rebuild_snapshot) if position.rebuild_snapshot else None
        try:
            async with ReplicationStream(
                self.dsn,
                position.slot_name,
                self.applied,
                OPTIONS,
                application_name="salon-reports-stream",
                connect_timeout=5,
            ) as stream:
                await self._stream(stream, stopping, skip, on_batch)
        except ReplicationError as error:
            if lost_error(str(error)):
                async with ApplyLock(self.connection):
                    await mark_lost(self.connection, f"reading the slot failed: {error}")
            else:
                raise
        except Restart:
            pass
        return await read_position(self.connection)

    async def _stream(
        self,
        stream: ReplicationStream,
        stopping: asyncio.Event,
        skip: RebuildSkip | None,
        on_batch: Callable[[Batch], None] | None,
    ) -> None:
        batch = Batch()
        # The open transaction: its xid, commit time, whether the rebuild saw it, and whether
        # it changed anything. A batch closes only between transactions, so the open
        # transaction's changes go straight into the batch.
        xid, committed_at, skipping, relevant, bookings = "0", "", False, False, False
        firsts: dict[tuple[Any, ...], int] = {}  # the open transaction's first-booking versions
        in_transaction = False  # between a B and its C
        while not stopping.is_set():
            waiting = not batch.empty or in_transaction
            message = await stream.read(self.quiet if waiting else self.idle_poll)
            if message is None:
                if not in_transaction:
                    await self._close(stream, batch, on_batch)
                    batch = Batch()
                continue
            change = orjson.loads(message[1])
            action = change["action"]
            if action == "B":
                xid, committed_at = str(change["xid"]), change.get("timestamp") or ""
                skipping = skip is not None and skip.saw(int(xid))
                relevant = bookings = False
                firsts = {}
                in_transaction = True
                continue
            if action == "C":
                in_transaction = False
                if relevant:
                    if batch.empty:
                        batch.started = time.monotonic()
                    batch.transactions += 1
                    if committed_at:
                        batch.commits.append(committed_at)
                    if bookings:
                        batch.booking_xids.append(xid)
                    for version, n in firsts.items():
                        if n > 0:
                            batch.added.add(version)
                        elif n < 0:
                            batch.removed.add(version)
                batch.end = lsn_bytes(change["nextlsn"])
                if not batch.empty and (
                    batch.versions >= self.max_rows
                    or time.monotonic() - batch.started >= self.max_delay
                ):
                    await self._close(stream, batch, on_batch)
                    batch = Batch()
                continue
            if action == "M":
                # a marker: the position is recorded even if nothing else changed
                if batch.empty:
                    batch.started = time.monotonic()
                batch.markers += 1
                continue
            if skipping:
                continue
            relevant = True
            relation = change["table"]
            if action == "T":
                batch.truncate = True
                if relation == "bookings":
                    # everything before the truncate is gone with it
                    batch.truncated = True
                    batch.delta.clear()
                    batch.added.clear()
                    batch.removed.clear()
                    firsts.clear()
                continue
            batch.add(firsts, relation, change)
            bookings = bookings or relation == "bookings"

    async def _close(
        self,
        stream: ReplicationStream,
        batch: Batch,
        on_batch: Callable[[Batch], None] | None,
    ) -> None:
        """Fold the batch (if there is one) or record an idle position (if it is due).

        Called only between transactions, with every message received so far handled: when
        the batch is empty, no relevant commit before the server's decoded position
        (``stream.wal_end``) is left, so the position may move there. Without this an idle
        database on a busy cluster would never confirm the WAL other databases write, and its
        slot would hold it (PostgreSQL's own subscriber does the same).
        """
        end = batch.end
        if batch.empty:
            end = max(end or 0, stream.wal_end)
        if end is None or end <= self.applied:
            return
        if batch.empty:
            idle = time.monotonic() - self._recorded_at
            if end - self.applied < IDLE_ADVANCE_BYTES and idle < IDLE_ADVANCE_SECONDS:
                return
        await self._apply(batch, end)
        self.applied = end
        self._recorded_at = time.monotonic()
        await stream.send_status(end)
        if on_batch is not None and not batch.empty:
            on_batch(batch)

    async def _apply(self, batch: Batch, end: int) -> None:
        connection = self.connection
        async with ApplyLock(connection):
            position = await read_position(connection)
            if position.state is not State.CURRENT or position.applied != self.applied:
                raise Restart
            async with connection.transaction():
                if not batch.empty:
                    await self._fold(batch)
                lsn = format_lsn(end)
                await connection.execute(
                    """
                    UPDATE change_stream_position SET
                        applied_lsn = %(lsn)s::pg_lsn,
                        rebuild_snapshot = CASE WHEN %(lsn)s::pg_lsn >= rebuild_lsn THEN NULL
                                                ELSE rebuild_snapshot END,
                        rebuild_lsn = CASE WHEN %(lsn)s::pg_lsn >= rebuild_lsn THEN NULL
                                           ELSE rebuild_lsn END,
                        changed_at = now()
                    """,
                    {"lsn": lsn},
                )

    async def _fold(self, batch: Batch) -> None:
        connection = self.connection
        versions = [(*version, n) for version, n in batch.delta.items() if n]
        firsts = bool(batch.added or batch.removed)
        async with connection.cursor() as cursor:
            if versions:
                async with cursor.copy(
                    f"COPY {derived.BATCH} ({', '.join(DELTA_COLUMNS)}, n) FROM STDIN"
                ) as copy:
                    for version in versions:
                        await copy.write_row(version)
            if firsts:
                async with cursor.copy(
                    f"COPY {derived.FIRSTS_BATCH} ({', '.join(FIRST_COLUMNS)}, n) FROM STDIN"
                ) as copy:
                    for first in batch.added:
                        await copy.write_row((*first, 1))
                    for first in batch.removed:
                        await copy.write_row((*first, -1))
        if firsts:
            await self._wait_visible(batch.booking_xids)
        script = derived.fold_script(
            truncated=batch.truncated, versions=bool(versions), firsts=firsts
        )
        if script:
            # one round trip; statements without parameters, never prepared
            await connection.execute(script, prepare=False)
        salons: str | None = None
        if batch.truncate:
            salons = "*"
        elif batch.touched:
            salons = ",".join(sorted(batch.touched, key=int))
            if len(salons) > NOTIFY_PAYLOAD_LIMIT:
                salons = "*"
        if salons is not None:
            batch.salons = salons
        # The notification (delivered at commit) and each transaction's commit -> applied lag,
        # on the database's clock, in one round trip.
        row = await (
            await connection.execute(
                "SELECT CASE WHEN %(salons)s::text IS NOT NULL"
                " THEN pg_notify(%(channel)s, %(salons)s) END,"
                " ARRAY(SELECT extract(epoch FROM clock_timestamp() - t)::float8"
                " FROM unnest(%(commits)s::timestamptz[]) AS t)",
                {"salons": salons, "channel": INVALIDATION_CHANNEL, "commits": batch.commits},
            )
        ).fetchone()
        assert row is not None
        batch.lags = [max(0.0, lag) for lag in row[1]]

    async def _wait_visible(self, xids: list[str], timeout: float = 10.0) -> None:
        if not xids:
            return
        deadline = time.monotonic() + timeout
        while True:
            row = await (await self.connection.execute(_NOT_YET_VISIBLE, (xids,))).fetchone()
            if row is None or row[0] == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("committed transactions stayed invisible for 10 s")
            await asyncio.sleep(0.001)
