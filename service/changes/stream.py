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
   apply lock: copied into the temporary table ``stream_changes``, folded into the derived
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
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson
import psycopg

from service.changes import derived
from service.changes.replication import ReplicationError, ReplicationStream, format_lsn

logger = logging.getLogger("service.changes")

# Advisory lock keys (two-int form): ('S','R','C','E') elects the one consumer,
# ('S','R','C','A') is held while a batch is applied or the tables are rebuilt.
ELECTION_LOCK = (0x53524345, 0)
APPLY_LOCK = (0x53524341, 0)

PLUGIN = "wal2json"
INVALIDATION_CHANNEL = "bookings_changed"
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


class State(StrEnum):
    UNINITIALISED = "uninitialised"
    CURRENT = "current"
    LOST = "lost"


@dataclass(frozen=True, slots=True)
class Position:
    state: State
    reason: str | None
    slot_name: str | None
    applied_lsn: str | None
    rebuild_snapshot: str | None
    slot_exists: bool
    confirmed_lsn: str | None
    wal_status: str | None
    # WAL positions as byte offsets, for comparisons
    applied: int | None
    confirmed: int | None

    def loss(self) -> str | None:
        """Why the changes since the position can no longer be read, or None."""
        if self.state is not State.CURRENT:
            return None
        if not self.slot_exists:
            return f"replication slot {self.slot_name} no longer exists"
        if self.wal_status == "lost":
            return (
                f"replication slot {self.slot_name} was invalidated (max_slot_wal_keep_size):"
                " the WAL it needed was removed"
            )
        if (
            self.confirmed is not None
            and self.applied is not None
            and self.confirmed > self.applied
        ):
            return (
                f"replication slot {self.slot_name} is ahead of the recorded position"
                f" ({self.confirmed_lsn} > {self.applied_lsn}): the position was restored from"
                " an older backup, or another reader consumed the slot"
            )
        return None


@dataclass(slots=True)
class Batch:
    """Changes gathered up to a transaction boundary, then what folding them did."""

    rows: list[tuple[Any, ...]] = field(default_factory=list)  # for ``stream_changes``
    end: int | None = None  # end of the last complete transaction's commit record
    transactions: int = 0  # transactions with a relevant change
    started: float = 0.0  # monotonic time of the first row
    lags: list[float] = field(default_factory=list)  # commit -> applied, per transaction
    salons: str | None = None  # the NOTIFY payload sent, if any
    truncated: bool = False


def lsn_bytes(lsn: str | None) -> int | None:
    if lsn is None:
        return None
    high, _, low = lsn.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


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


CREATE_BATCH = f"""
    CREATE TEMP TABLE IF NOT EXISTS {derived.BATCH} (
        ordinal bigint NOT NULL,
        xid xid NOT NULL,
        relation text,
        action text NOT NULL,
        sign smallint,
        committed_at timestamptz,
        id bigint,
        salon_id bigint,
        client_id bigint,
        professional_id bigint,
        service_id bigint,
        scheduled_at timestamptz,
        status text,
        price_cents integer
    ) ON COMMIT DELETE ROWS
"""

# Booking transactions of the batch that a fresh snapshot does not see yet. A commit record
# reaches the WAL (and so the stream) an instant before the transaction leaves the proc array;
# the first-booking recomputation must wait for that instant, or it could miss the change.
_NOT_YET_VISIBLE = f"""
    SELECT count(*) FROM (SELECT DISTINCT xid FROM {derived.BATCH}
                          WHERE relation = 'bookings' AND xid::text <> '0') AS t
    WHERE NOT pg_visible_in_snapshot({xid8("t.xid", "pg_current_snapshot()")},
                                     pg_current_snapshot())
"""

READ_POSITION = """
    SELECT p.state, p.reason, p.slot_name, p.applied_lsn::text, p.rebuild_snapshot::text,
           s.slot_name IS NOT NULL, s.confirmed_flush_lsn::text, s.wal_status
    FROM change_stream_position p
    LEFT JOIN pg_replication_slots s
        ON s.slot_name = p.slot_name AND s.database = current_database()
"""


async def read_position(connection: psycopg.AsyncConnection[Any]) -> Position:
    row = await (await connection.execute(READ_POSITION)).fetchone()
    if row is None:
        raise RuntimeError("change_stream_position is empty: run `salon-reports migrate`")
    state, reason, slot, applied, snapshot, exists, confirmed, wal_status = row
    return Position(
        State(state),
        reason,
        slot,
        applied,
        snapshot,
        bool(exists),
        confirmed,
        wal_status,
        lsn_bytes(applied),
        lsn_bytes(confirmed),
    )


async def mark_lost(connection: psycopg.AsyncConnection[Any], reason: str) -> None:
    """Stop presenting derived figures as current until ``rollups rebuild``."""
    logger.error("change stream lost: %s; run `salon-reports rollups rebuild`", reason)
    async with connection.transaction():
        await connection.execute(
            "UPDATE change_stream_position SET state = 'lost', reason = %s, changed_at = now()"
            " WHERE state = 'current'",
            (reason,),
        )
        await connection.execute("SELECT pg_notify(%s, '*')", (INVALIDATION_CHANNEL,))


def _lost_error(message: str) -> bool:
    """The server's words for a slot that cannot give the changes since the position."""
    return any(
        words in message
        for words in ("does not exist", "has already been removed", "can no longer get changes")
    )


class RebuildSkip:
    """The transactions a rebuild's snapshot already saw (``xmin:xmax:xip,...``)."""

    def __init__(self, snapshot: str) -> None:
        xmin, xmax, xip = snapshot.split(":")
        self.xmin, self.xmax = int(xmin), int(xmax)
        self.in_progress = {int(x) for x in xip.split(",") if x}

    def saw(self, xid: int) -> bool:
        """Whether the committed transaction ``xid`` (32-bit) was visible in the snapshot."""
        full = (self.xmax >> 32 << 32) | xid
        if full - self.xmax > 2**31:
            full -= 2**32
        elif self.xmax - full > 2**31:
            full += 2**32
        return full < self.xmin or (full < self.xmax and full not in self.in_progress)


_COLUMNS = (
    "id",
    "salon_id",
    "client_id",
    "professional_id",
    "service_id",
    "scheduled_at",
    "status",
    "price_cents",
)


class ApplyLock:
    """The session advisory lock under which a batch is folded or the tables rebuilt."""

    def __init__(self, connection: psycopg.AsyncConnection[Any]) -> None:
        self.connection = connection

    async def __aenter__(self) -> None:
        await self.connection.execute("SELECT pg_advisory_lock(%s, %s)", APPLY_LOCK)

    async def __aexit__(self, *exc: object) -> None:
        if not self.connection.closed and not self.connection.broken:
            await self.connection.execute("SELECT pg_advisory_unlock(%s, %s)", APPLY_LOCK)


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
            if _lost_error(str(error)):
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
        pending: list[tuple[Any, ...]] = []  # the open transaction's rows
        xid, committed_at, skipping = 0, None, False
        in_transaction = False  # between a B and its C
        while not stopping.is_set():
            waiting = batch.rows or in_transaction
            message = await stream.read(self.quiet if waiting else self.idle_poll)
            if message is None:
                if not in_transaction:
                    await self._close(stream, batch, on_batch)
                    batch = Batch()
                continue
            _, payload = message
            change = orjson.loads(payload)
            action = change["action"]
            if action == "B":
                xid, committed_at = int(change["xid"]), change.get("timestamp")
                skipping = skip is not None and skip.saw(xid)
                pending = []
                in_transaction = True
                continue
            if action == "C":
                in_transaction = False
                if pending:
                    if not batch.rows:
                        batch.started = time.monotonic()
                    batch.rows.extend(pending)
                    batch.transactions += 1
                    pending = []
                batch.end = lsn_bytes(change["nextlsn"])
                if len(batch.rows) >= self.max_rows or (
                    batch.rows and time.monotonic() - batch.started >= self.max_delay
                ):
                    await self._close(stream, batch, on_batch)
                    batch = Batch()
                continue
            if action == "M":
                # a marker: the transaction counts as a change, so the position is recorded
                pending.append((len(pending), xid, None, "M", None, None, *(None,) * 8))
                if not change.get("transactional", True):
                    batch.rows.extend(pending)
                    pending = []
                continue
            if skipping:
                continue
            relation = change["table"]
            if action == "T":
                pending.append((len(pending), xid, relation, "T", None, committed_at, *(None,) * 8))
                continue
            for sign, key in ((1, "columns"), (-1, "identity")):
                fields = change.get(key)
                if fields is None:
                    continue
                values = {field["name"]: field.get("value") for field in fields}
                if relation == "salons":
                    values["salon_id"] = values.get("id")
                pending.append(
                    (
                        len(pending),
                        xid,
                        relation,
                        action,
                        sign,
                        committed_at,
                        *(values.get(column) for column in _COLUMNS),
                    )
                )

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
        if not batch.rows:
            end = max(end or 0, stream.wal_end)
        if end is None or end <= self.applied:
            return
        if not batch.rows:
            idle = time.monotonic() - self._recorded_at
            if end - self.applied < IDLE_ADVANCE_BYTES and idle < IDLE_ADVANCE_SECONDS:
                return
        await self._apply(batch, end)
        self.applied = end
        self._recorded_at = time.monotonic()
        await stream.send_status(end)
        if on_batch is not None and batch.rows:
            on_batch(batch)

    async def _apply(self, batch: Batch, end: int) -> None:
        connection = self.connection
        async with ApplyLock(connection):
            position = await read_position(connection)
            if position.state is not State.CURRENT or position.applied != self.applied:
                raise Restart
            async with connection.transaction():
                if batch.rows:
                    async with (
                        connection.cursor() as cursor,
                        cursor.copy(
                            f"COPY {derived.BATCH} (ordinal, xid, relation, action, sign,"
                            f" committed_at, {', '.join(_COLUMNS)}) FROM STDIN"
                        ) as copy,
                    ):
                        for ordinal, row in enumerate(batch.rows):
                            await copy.write_row((ordinal, *row[1:]))
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
        execute = self.connection.execute
        row = await (
            await execute(
                f"SELECT max(ordinal) FILTER (WHERE action = 'T'),"
                f" count(*) FILTER (WHERE sign IS NOT NULL)"
                f" FROM {derived.BATCH} WHERE relation = 'bookings'"
            )
        ).fetchone()
        assert row is not None
        truncated_at, versions = row
        if truncated_at is not None:
            # Everything before the truncate is gone with it.
            batch.truncated = True
            for table in derived.TABLES:
                await execute(f"DELETE FROM {table}")
            await execute(
                f"DELETE FROM {derived.BATCH} WHERE relation = 'bookings' AND ordinal < %s",
                (truncated_at,),
            )
        if versions:
            for table in derived.COUNTERS:
                await execute(derived.fold_counter(table))
            for statement in derived.FOLD_VISITS:
                await execute(statement)
            await self._wait_visible()
            for table in derived.FIRSTS:
                for statement in derived.fold_first(table):
                    await execute(statement)
        row = await (
            await execute(
                f"""
                SELECT bool_or(action = 'T'), string_agg(DISTINCT salon_id::text, ',')
                FROM {derived.BATCH}
                """
            )
        ).fetchone()
        assert row is not None
        truncate, salons = row
        if truncate or (salons is not None and len(salons) > NOTIFY_PAYLOAD_LIMIT):
            salons = "*"
        if salons is not None:
            await execute("SELECT pg_notify(%s, %s)", (INVALIDATION_CHANNEL, salons))
            batch.salons = salons
        # Commit -> applied, per transaction, on the database's clock; the commit follows.
        lags = await (
            await execute(
                f"""
                SELECT extract(epoch FROM clock_timestamp() - committed_at)::float8
                FROM (SELECT DISTINCT xid, committed_at FROM {derived.BATCH}
                      WHERE committed_at IS NOT NULL) AS t
                """
            )
        ).fetchall()
        batch.lags = [max(0.0, lag) for (lag,) in lags]

    async def _wait_visible(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            row = await (await self.connection.execute(_NOT_YET_VISIBLE)).fetchone()
            if row is None or row[0] == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("committed transactions stayed invisible for 10 s")
            await asyncio.sleep(0.001)
