"""Does the sqlcommenter comment on every report statement cost anything?

The same report statement with and without its comment (``/*db.query.summary='...'*/``), on
one connection each, interleaved in rounds: per-execution time (psycopg prepares both after 5
executions) and whether each was prepared. Needs the dataset of ``make bench`` or any seeded
database: ``python -m benchmarks.sql_comment [--rounds 5] [--executions 200]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from datetime import date

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from service.config import Settings
from service.reports.params import PLATFORM_TIMEZONE, Period, Scope
from service.reports.queries import _bind, dashboard_sql, query_comment


async def _time(conn: AsyncConnection, statement: str, params: dict[str, object], n: int) -> float:
    query = text(statement)
    started = time.perf_counter()
    for _ in range(n):
        (await conn.execute(query, params)).all()
    return (time.perf_counter() - started) / n * 1000


async def _prepared(conn: AsyncConnection, marker: str) -> int:
    result = await conn.execute(
        text("SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE :p"),
        {"p": f"%{marker}%"},
    )
    return int(result.scalar_one())


async def main(rounds: int, executions: int) -> None:
    settings = Settings()
    engine = create_async_engine(settings.database_url, pool_size=2, max_overflow=0)
    salon_id = 1
    scope = Scope(salon_id=salon_id, timezone=PLATFORM_TIMEZONE)
    period = Period(start=date(2024, 1, 1), end=date(2024, 1, 31))
    params = _bind(scope, period)
    bare = dashboard_sql(scope)
    commented = f"{bare}\n{query_comment('dashboard')}"
    with_ms: list[float] = []
    without_ms: list[float] = []
    async with engine.connect() as plain, engine.connect() as named:
        for round_ in range(rounds):  # alternate which goes first
            if round_ % 2:
                with_ms.append(await _time(named, commented, params, executions))
            without_ms.append(await _time(plain, bare, params, executions))
            if not round_ % 2:
                with_ms.append(await _time(named, commented, params, executions))
        prepared = await _prepared(named, query_comment("dashboard"))
    await engine.dispose()
    print(f"dashboard statement, salon {salon_id}, January 2024; {rounds} rounds x {executions}")
    print(f"  without comment: median {statistics.median(without_ms):.3f} ms per execution")
    print(f"  with comment:    median {statistics.median(with_ms):.3f} ms per execution")
    print(f"  rounds without: {[round(x, 3) for x in without_ms]}")
    print(f"  rounds with:    {[round(x, 3) for x in with_ms]}")
    print(f"  prepared statements carrying the comment on its connection: {prepared}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--executions", type=int, default=200)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.rounds, arguments.executions))
