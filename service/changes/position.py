"""Where the change stream stands: its state, its recorded position, the slot behind it.

``change_stream_position`` holds the state (``uninitialised``, ``current``, ``lost``), the slot
and ``applied_lsn``: the derived tables reflect exactly the transactions whose commit record
starts before it. A slot that is missing, invalidated or ahead of that position means changes
were lost (``Position.loss``). The apply lock serialises folding a batch and rebuilding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import psycopg

logger = logging.getLogger("service.changes")

# Advisory lock keys (two-int form): ('S','R','C','E') elects the one consumer,
# ('S','R','C','A') is held while a batch is applied or the tables are rebuilt.
ELECTION_LOCK = (0x53524345, 0)
APPLY_LOCK = (0x53524341, 0)

INVALIDATION_CHANNEL = "bookings_changed"


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


def lsn_bytes(lsn: str | None) -> int | None:
    if lsn is None:
        return None
    high, _, low = lsn.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


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


def lost_error(message: str) -> bool:
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


class ApplyLock:
    """The session advisory lock under which a batch is folded or the tables rebuilt."""

    def __init__(self, connection: psycopg.AsyncConnection[Any]) -> None:
        self.connection = connection

    async def __aenter__(self) -> None:
        await self.connection.execute("SELECT pg_advisory_lock(%s, %s)", APPLY_LOCK)

    async def __aexit__(self, *exc: object) -> None:
        if not self.connection.closed and not self.connection.broken:
            await self.connection.execute("SELECT pg_advisory_unlock(%s, %s)", APPLY_LOCK)
