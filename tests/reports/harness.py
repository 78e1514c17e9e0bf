"""Running a report through either implementation, for the differential tests."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import psycopg
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session

from service.changes.consumer import wait_applied
from service.reports import queries
from service.reports.params import Period, Scope
from tests.reports.strategies import Dataset, load


@dataclass
class Reports:
    """Runs a report through either implementation on the test database."""

    connection: psycopg.Connection
    engine: Engine
    runner: asyncio.Runner
    sql_engine: AsyncEngine
    dsn: str

    def load(self, dataset: Dataset) -> None:
        load(self.connection, dataset)
        self.settle()

    def settle(self) -> None:
        """Wait until the change stream has folded every write committed so far."""
        self.runner.run(wait_applied(self.dsn))

    def naive(self, report: Callable[..., Any], *args: Any) -> Any:
        with Session(self.engine) as session:
            return report(session, *args)

    def sql(self, report: Callable[..., Coroutine[Any, Any, Any]], *args: Any, **kw: Any) -> Any:
        async def run() -> Any:
            async with self.sql_engine.connect() as conn:
                return await report(conn, *args, **kw)

        return self.runner.run(run())

    def sql_professionals(self, scope: Scope, period: Period, limit: int) -> list[dict[str, Any]]:
        """Every page of the professionals report, concatenated; checks the keyset paging."""
        items: list[dict[str, Any]] = []
        after_id: int | None = None
        pages = 0
        while True:
            page = self.sql(
                queries.professional_performance, scope, period, limit=limit, after_id=after_id
            )
            pages += 1
            assert len(page["items"]) <= limit
            items.extend(page["items"])
            after_id = page["next_after_id"]
            if after_id is None:
                break
            assert pages <= 100, "the cursor never reaches the last page"
        # The cursor is null on the last page, not one page later.
        assert pages == max(1, math.ceil(len(items) / limit))
        return items
