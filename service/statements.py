"""The statements that cost the database the most, from ``pg_stat_statements``.

``/performance/stats`` (``statements``) and the performance page list the top statements of
this service's database by total execution time, with their calls, mean time, rows and shared
blocks hit and read, since the statistics were last reset. Every report statement ends with a
static comment naming its query (``/*db.query.summary='report.dashboard'*/``,
``service.reports.queries.named_statement``); it is read back here as ``summary``, the name
the statement's spans and metrics carry.

The extension needs ``shared_preload_libraries = 'pg_stat_statements'`` on the server and the
extension in the database (migration 0006). Without either, or when the database does not
answer within a second, the stats say so (``available: false`` and the reason) instead of
failing.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

TOP_STATEMENTS = 10
TIMEOUT_SECONDS = 1.0
QUERY_TEXT_CHARS = 400

_SUMMARY = re.compile(r"/\*db\.query\.summary='([^']+)'\*/")

# The statistics are the whole cluster's: only this database's statements are listed.
TOP_STATEMENTS_SQL = text(
    """
    SELECT query, calls, total_exec_time, mean_exec_time, rows,
           shared_blks_hit, shared_blks_read
    FROM pg_stat_statements
    WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
    ORDER BY total_exec_time DESC
    LIMIT :limit
    /*db.query.summary='stats.top_statements'*/
    """
).execution_options(query_name="stats.top_statements")

STATS_SINCE_SQL = text(
    "SELECT stats_reset FROM pg_stat_statements_info /*db.query.summary='stats.since'*/"
).execution_options(query_name="stats.since")


def summary_of(query: str) -> str | None:
    """The query name of a statement's sqlcommenter comment, if it has one."""
    match = _SUMMARY.search(query)
    return match.group(1) if match else None


async def _read(engine: AsyncEngine, limit: int) -> dict[str, Any]:
    async with engine.connect() as conn:
        rows = (await conn.execute(TOP_STATEMENTS_SQL, {"limit": limit})).all()
        since = (await conn.execute(STATS_SINCE_SQL)).scalar_one_or_none()
    return {
        "available": True,
        "reason": None,
        "since": since.isoformat() if since is not None else None,
        "top_by_total_time": [
            {
                "summary": summary_of(row.query),
                "query": " ".join(row.query.split())[:QUERY_TEXT_CHARS],
                "calls": int(row.calls),
                "total_ms": round(float(row.total_exec_time), 3),
                "mean_ms": round(float(row.mean_exec_time), 3),
                "rows": int(row.rows),
                "shared_blocks_hit": int(row.shared_blks_hit),
                "shared_blocks_read": int(row.shared_blks_read),
            }
            for row in rows
        ],
    }


async def top_statements(engine: AsyncEngine, limit: int = TOP_STATEMENTS) -> dict[str, Any]:
    """This database's ``limit`` statements with the most total execution time."""
    try:
        return await asyncio.wait_for(_read(engine, limit), TIMEOUT_SECONDS)
    except TimeoutError:
        reason = f"the database did not answer within {TIMEOUT_SECONDS:g} s"
    except Exception as error:  # no extension, library not loaded, database down
        reason = " ".join(str(getattr(error, "orig", None) or error).split())[:300]
    return {"available": False, "reason": reason, "since": None, "top_by_total_time": []}
