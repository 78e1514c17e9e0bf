"""Rebuilding the derived tables from ``bookings``, exactly, while writes go on.

``rebuild`` (``salon-reports rollups rebuild``, and the first start of a new database):

1. take the apply lock, so no batch is folded meanwhile;
2. drop the stream's slot and create a new one (its backlog, or a lost slot, is discarded);
3. in one REPEATABLE READ transaction: recompute every derived table from ``bookings`` and
   record the snapshot and the WAL position taken with it. Everything committed before the new
   slot existed is in that snapshot; of what the slot delivers later, the transactions the
   snapshot already saw are skipped (``stream.PEEK``) until the position passes that WAL
   position. So each write is counted once, whatever commits during the rebuild, and writers
   are never blocked;
4. mark the stream ``current`` and notify every worker to drop its cached reports.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from service.changes import derived
from service.changes.position import INVALIDATION_CHANNEL, ApplyLock, lsn_bytes, read_position
from service.changes.stream import MARKER_PREFIX, PLUGIN


def slot_name_for(database: str) -> str:
    """The stream's slot name for a database (slot names: [a-z0-9_], 63 bytes at most)."""
    return ("salon_reports_" + re.sub(r"[^a-z0-9_]", "_", database.lower()))[:63]


@dataclass(frozen=True, slots=True)
class Rebuilt:
    slot_name: str
    rows: dict[str, int]
    seconds: float


async def drop_slot(connection: psycopg.AsyncConnection[Any], name: str) -> None:
    await connection.execute(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
        (name,),
    )


async def rebuild_on(
    connection: psycopg.AsyncConnection[Any],
    *,
    slot_created: Callable[[], Awaitable[None]] | None = None,
) -> Rebuilt:
    """Rebuild on an autocommit connection (see the module docstring).

    ``slot_created`` runs between the slot's creation and the snapshot: the window in which a
    commit reaches both the snapshot and the new slot (tests use it to put one there).
    """
    started = time.perf_counter()
    async with ApplyLock(connection):
        row = await (await connection.execute("SELECT current_database()")).fetchone()
        assert row is not None
        slot = slot_name_for(row[0])
        previous = (await read_position(connection)).slot_name
        for name in {slot, previous} - {None}:
            assert name is not None
            await drop_slot(connection, name)
        # Creating a logical slot waits until every transaction running in the cluster (any
        # database) has ended: as long as that takes, not the session's lock_timeout.
        await connection.execute("SET lock_timeout = 0")
        try:
            row = await (
                await connection.execute(
                    "SELECT lsn::text FROM pg_create_logical_replication_slot(%s, %s)",
                    (slot, PLUGIN),
                )
            ).fetchone()
        finally:
            await connection.execute("RESET lock_timeout")
        assert row is not None
        slot_lsn = row[0]
        if slot_created is not None:
            await slot_created()
        rows: dict[str, int] = {}
        saved = connection.isolation_level
        await connection.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
        try:
            async with connection.transaction():
                row = await (
                    await connection.execute(
                        "SELECT pg_current_snapshot()::text, pg_current_wal_lsn()::text"
                    )
                ).fetchone()
                assert row is not None
                snapshot, snapshot_lsn = row
                for table in derived.TABLES:
                    await connection.execute(f"DELETE FROM {table}")
                    cursor = await connection.execute(
                        f"INSERT INTO {table} ({derived.columns_of(table)})"
                        f" {derived.recompute_sql(table)}"
                    )
                    rows[table] = cursor.rowcount
                await connection.execute(
                    """
                    UPDATE change_stream_position SET state = 'current', reason = NULL,
                        slot_name = %s, applied_lsn = %s::pg_lsn,
                        rebuild_snapshot = %s::pg_snapshot, rebuild_lsn = %s::pg_lsn,
                        changed_at = now()
                    """,
                    (slot, slot_lsn, snapshot, snapshot_lsn),
                )
                await connection.execute("SELECT pg_notify(%s, '*')", (INVALIDATION_CHANNEL,))
        finally:
            await connection.set_isolation_level(saved)
    return Rebuilt(slot, rows, time.perf_counter() - started)


async def rebuild(dsn: str) -> Rebuilt:
    async with await psycopg.AsyncConnection.connect(
        dsn, autocommit=True, application_name="salon-reports-rebuild"
    ) as connection:
        return await rebuild_on(connection)


async def emit_marker(connection: psycopg.AsyncConnection[Any]) -> int:
    """Commit a marker into the stream and flush it; an LSN before its commit record. Every
    transaction committed before this call has its commit record before that LSN."""
    await connection.execute("SET synchronous_commit = on")  # the commit flushes the WAL
    row = await (
        await connection.execute(
            "SELECT pg_logical_emit_message(true, %s, '')::text", (MARKER_PREFIX,)
        )
    ).fetchone()
    assert row is not None
    marker = lsn_bytes(row[0])
    assert marker is not None
    return marker
