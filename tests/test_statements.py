"""pg_stat_statements and the comments that name our statements.

- every report statement the service sends ends with the static sqlcommenter comment naming
  its query, the same name as its spans' and metrics' ``db.query.summary``;
- the comment leaves statement preparation alone: psycopg still prepares the statement once
  per connection (the text is the same from call to call);
- ``/performance/stats`` lists this database's top statements by total time from
  pg_stat_statements, named by their comments, and never another database's;
- without the extension, or without a database, it says why instead of failing.
"""

from __future__ import annotations

from datetime import date
from typing import Any

import psycopg
import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import create_async_engine

from service.config import Settings
from service.reports.params import Scope
from service.reports.queries import QUERY_NAMES, query_comment, realtime_metrics
from service.statements import summary_of, top_statements
from tests.conftest import Api

REPORTS = ("dashboard", "bookings", "professionals", "realtime")
STATS = "/api/v1/optimized-reports/performance/stats"


async def test_every_report_statement_carries_the_comment_naming_its_query(
    api: Api, data: dict[str, int]
) -> None:
    sent: list[tuple[str | None, str]] = []

    def record(_conn: Any, _cursor: Any, statement: str, _p: Any, context: Any, _m: Any) -> None:
        sent.append((context.execution_options.get("query_name"), statement))

    engine = api.resources.engine.sync_engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        for salon in (data["lisbon"], None):  # a salon's reports and the platform's
            for report in REPORTS:
                params = {} if salon is None else {"salon_id": salon}
                assert (await api.report(report, **params)).status_code == 200
    finally:
        event.remove(engine, "before_cursor_execute", record)

    named = [(name, statement) for name, statement in sent if name in QUERY_NAMES.values()]
    assert {name for name, _ in named} >= {f"report.{report}" for report in REPORTS}
    for name, statement in named:
        assert statement.rstrip().endswith(f"/*db.query.summary='{name}'*/"), statement
        assert summary_of(statement) == name


def test_the_comment_is_static_and_names_the_query() -> None:
    for key, name in QUERY_NAMES.items():
        assert query_comment(key) == f"/*db.query.summary='{name}'*/"
        assert "'" not in name  # cannot end the value early
        assert "*/" not in name  # nor the comment


async def test_statement_preparation_still_works_with_the_comment(
    base_settings: Settings, database_url: str, data: dict[str, int]
) -> None:
    """psycopg prepares a statement after 5 executions with the same text: the realtime report,
    comment included, is prepared once on the connection and reused from then on."""
    engine = create_async_engine(database_url, pool_size=1, max_overflow=0)
    scope = Scope(salon_id=data["lisbon"], timezone="Europe/Lisbon")
    try:
        async with engine.connect() as conn:
            for _ in range(8):
                await realtime_metrics(conn, scope, date(2024, 3, 1))
            prepared = (
                (
                    await conn.execute(
                        text(
                            "SELECT statement FROM pg_prepared_statements WHERE statement LIKE :p"
                        ),
                        {"p": f"%{query_comment('realtime')}%"},
                    )
                )
                .scalars()
                .all()
            )
    finally:
        await engine.dispose()
    assert len(prepared) == 1, prepared
    assert prepared[0].rstrip().endswith(query_comment("realtime"))


async def _reset_this_databases_statements(api: Api) -> None:
    async with api.resources.engine.connect() as conn:
        await conn.execute(
            text(
                "SELECT pg_stat_statements_reset(0, (SELECT oid FROM pg_database"
                " WHERE datname = current_database()), 0)"
            )
        )


async def test_stats_list_the_top_statements_of_this_database_by_their_names(
    api: Api, data: dict[str, int], admin_dsn: str
) -> None:
    # Only what the app does from here on: this database's entries are reset (the fixtures'
    # TRUNCATE and COPY would otherwise fill the top 10), then every report misses the cache
    # over five windows.
    await _reset_this_databases_statements(api)
    for month in range(1, 6):
        for report in REPORTS:
            window = {"start": f"2024-{month:02d}-01", "end": f"2024-{month:02d}-28"}
            if report == "realtime":
                window = {}
            response = await api.report(report, salon_id=data["newyork"], **window)
            assert response.status_code == 200, response.text
    # Another database of the cluster spends far more time: it must not be listed.
    with psycopg.connect(admin_dsn, autocommit=True) as other:
        for _ in range(3):
            other.execute("SELECT pg_sleep(0.2) /*db.query.summary='other.database'*/")

    response = await api.get(STATS, api.token("ops"))
    assert response.status_code == 200
    statements = response.json()["statements"]
    assert statements["available"] is True, statements
    assert statements["reason"] is None
    top = statements["top_by_total_time"]
    assert 1 <= len(top) <= 10
    totals = [entry["total_ms"] for entry in top]
    assert totals == sorted(totals, reverse=True)
    summaries = {entry["summary"] for entry in top}
    assert "other.database" not in summaries
    assert all("pg_sleep" not in entry["query"] for entry in top)
    # The summary is read from the comment in the text pg_stat_statements kept.
    reports = [entry for entry in top if entry["summary"] in {f"report.{r}" for r in REPORTS}]
    assert reports, top
    for entry in reports:
        assert entry["calls"] >= 1
        # both rounded to the microsecond
        assert entry["total_ms"] == pytest.approx(
            entry["mean_ms"] * entry["calls"], abs=0.001 * (entry["calls"] + 1)
        )
        assert entry["rows"] >= entry["calls"]  # every report statement returns a row at least
        assert entry["shared_blocks_hit"] + entry["shared_blocks_read"] > 0


async def test_without_the_extension_the_stats_say_why(admin_dsn: str) -> None:
    """The cluster's `postgres` database has the library loaded but not the extension."""
    url = "postgresql+psycopg://" + admin_dsn.split("://", 1)[1]
    engine = create_async_engine(url)
    try:
        statements = await top_statements(engine)
    finally:
        await engine.dispose()
    assert statements["available"] is False
    assert "pg_stat_statements" in statements["reason"]
    assert statements["top_by_total_time"] == []


async def test_without_a_database_the_stats_say_why() -> None:
    engine = create_async_engine(
        "postgresql+psycopg://nobody:nothing@127.0.0.1:9/none", connect_args={"connect_timeout": 1}
    )
    try:
        statements = await top_statements(engine)
    finally:
        await engine.dispose()
    assert statements["available"] is False
    assert statements["reason"]
