"""Reading reports from a streaming replica without caching what a lagging replica computed.

A report computed on the primary reflects every fold of the change stream committed before its
snapshot; the cache's invalidation protocol (epochs, announcements) is built on that. A replica
replays the primary's WAL some time later, so a report computed there right after a change can
miss it: cached, it would stay wrong for the TTL, although the change's invalidation has already
run. The read is therefore gated on the stream's position, which the replica replays like any
other row:

1. On the primary, read ``change_stream_position.applied_lsn`` (the *watermark*): every fold
   committed so far, and so every change notified so far, is at or before it.
2. On the replica, in one REPEATABLE READ transaction (one snapshot), read the replica's own
   ``applied_lsn``; only if it has reached the watermark run the report query in the same
   snapshot. That snapshot then holds every fold committed before step 1: the answer is the one
   the primary would have given at step 1, which is later than the cache's epoch read that
   precedes the computation, so storing it is exactly as safe as storing a primary read.
3. Otherwise (the replica is behind, e.g. replay paused or slow) the report is read on the
   primary: correct, and cacheable.

The interleaving this prevents: a write commits; the stream folds it and notifies; a worker
invalidates the scope; a request misses, reads the replica, which has not replayed the fold,
and caches the old figures under the new epoch. With the gate, that request finds the
replica's ``applied_lsn`` below the watermark (the fold committed before step 1) and reads the
primary instead. The watermark is global, not per scope: any later fold makes the replica
"behind" until it replays it, which on a healthy replica is a few milliseconds.

Recovery conflicts (the replica cancelling a query, or ending an idle-in-transaction
session, whose snapshot blocks the replay of a change) are retried once on the primary. So is a
replica connection lost in the middle of a read: a session the replica ends for a conflict
while a statement is under way often reaches the client only as "server closed the connection
unexpectedly", the conflict's words lost (measured under load: ``benchmarks/replica_conflicts``,
docs/performance.md); a replica that cannot be reached at all is not retried (a 503, as before).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

WATERMARK = text("SELECT applied_lsn::text FROM change_stream_position").execution_options(
    query_name="replica.watermark"
)
CAUGHT_UP = text(
    "SELECT applied_lsn >= CAST(:watermark AS pg_lsn) FROM change_stream_position"
).execution_options(query_name="replica.caught_up")

# SQLSTATEs PostgreSQL gives a standby query cancelled for the replay (snapshot, lock, buffer
# pin conflicts: serialization_failure; deadlock with the startup process:
# deadlock_detected) and the words of a session it ends for the same reason.
CONFLICT_SQLSTATES = ("40001", "40P01")
CONFLICT_WORDS = "conflict with recovery"


@dataclass(slots=True)
class ReplicaReads:
    """Where report reads went, since the process started."""

    replica: int = 0  # answered by the replica, which had caught up
    primary_behind: int = 0  # the replica had not replayed the watermark: the primary answered
    primary_conflict: int = 0  # a recovery conflict on the replica: retried on the primary
    primary_lost: int = 0  # the replica connection was lost mid-read: retried on the primary


async def watermark(connection: AsyncConnection) -> str | None:
    """The stream's applied position on the primary (None before the first migration)."""
    return (await connection.execute(WATERMARK)).scalar_one_or_none()


async def caught_up(connection: AsyncConnection, mark: str | None) -> bool:
    """Whether this connection's snapshot (the replica's) holds every fold up to ``mark``.

    The first statement of a REPEATABLE READ transaction: the report that follows on the same
    connection sees the same snapshot.
    """
    if mark is None:
        return True
    result = await connection.execute(CAUGHT_UP, {"watermark": mark})
    return bool(result.scalar_one_or_none())


def recovery_conflict(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is the replica giving way to its replay."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, DBAPIError):
            orig = seen.orig
            sqlstate = getattr(orig, "sqlstate", None)
            if CONFLICT_WORDS in str(orig) or sqlstate in CONFLICT_SQLSTATES:
                return True
        seen = seen.__cause__
    return False


def connection_lost(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a connection that broke under a statement
    (SQLAlchemy's disconnect detection; a failed connect is not one)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, DBAPIError) and seen.connection_invalidated:
            return True
        seen = seen.__cause__
    return False
