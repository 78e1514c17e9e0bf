"""``salon-reports rollups verify``: every derived table against a recomputation.

It waits until the stream has applied everything committed before it started, then compares
each table with its recomputation from ``bookings`` in one snapshot. On a busy database writes
keep landing between the two, so a difference counts only if it is seen in every one of
``rounds`` comparisons; on a quiet one the first comparison is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from service.changes import derived
from service.changes.consumer import wait_applied


@dataclass(frozen=True, slots=True)
class Difference:
    table: str
    kind: str  # "extra": held but not recomputed; "missing": recomputed but not held
    row: tuple[Any, ...]

    def __str__(self) -> str:
        sign = "+" if self.kind == "extra" else "-"
        return f"{self.table}: {sign} {self.row}"


async def _differences(connection: psycopg.AsyncConnection[Any]) -> set[Difference]:
    found: set[Difference] = set()
    saved = connection.isolation_level
    await connection.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
    try:
        async with connection.transaction():
            for table in derived.TABLES:
                stored, expected = derived.stored_sql(table), derived.recompute_sql(table)
                for kind, first, second in (
                    ("extra", stored, expected),
                    ("missing", expected, stored),
                ):
                    # as JSON text: dates such as '-infinity' have no Python value
                    cursor = await connection.execute(
                        f"SELECT to_jsonb(d)::text FROM (({first}) EXCEPT ({second})) AS d"
                    )
                    found.update(Difference(table, kind, (r[0],)) for r in await cursor.fetchall())
    finally:
        await connection.set_isolation_level(saved)
    return found


async def verify(dsn: str, *, rounds: int = 3, timeout: float = 60.0) -> list[Difference]:
    """The differences between the derived tables and a recomputation (see the docstring)."""
    persistent: set[Difference] | None = None
    async with await psycopg.AsyncConnection.connect(
        dsn, autocommit=True, application_name="salon-reports-verify"
    ) as connection:
        for _ in range(rounds):
            await wait_applied(dsn, timeout)
            found = await _differences(connection)
            persistent = found if persistent is None else persistent & found
            if not persistent:
                return []
    assert persistent is not None
    return sorted(persistent, key=lambda d: (d.table, d.kind, str(d.row)))
