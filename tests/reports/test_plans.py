"""Query plans on a seeded database: per-salon reports never scan all of ``bookings``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import date, timedelta
from typing import Any

import psycopg
import pytest
from sqlalchemy import text

from service.config import Settings
from service.db import async_engine, libpq_url, migrate, with_database
from service.reports import queries
from service.reports.params import BookingFilters, Period, Scope
from service.tools.seed import seed_database
from tests.conftest import create_database

BOOKINGS = 100_000


@pytest.fixture(scope="module")
def seeded_url(base_settings: Settings, admin_dsn: str) -> Iterator[str]:
    name = "salon_reports_plans_test"
    create_database(admin_dsn, name)
    url = with_database(base_settings.database_url, name)
    migrate(url)
    seed_database(url, bookings=BOOKINGS, salons=20, days=400, seed=7)
    yield url
    with psycopg.connect(admin_dsn, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def _explain(url: str, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    async def run() -> list[dict[str, Any]]:
        engine = async_engine(url)
        try:
            async with engine.connect() as connection:
                result = await connection.execute(text("EXPLAIN (FORMAT JSON) " + sql), params)
                document = result.scalar_one()
        finally:
            await engine.dispose()
        plan = document if isinstance(document, list) else json.loads(document)
        return list(_nodes(plan[0]["Plan"]))

    return asyncio.run(run())


def _salon(url: str) -> Scope:
    with psycopg.connect(libpq_url(url)) as connection:
        row = connection.execute("SELECT id, timezone FROM salons ORDER BY id LIMIT 1").fetchone()
        count = connection.execute("SELECT count(*) FROM bookings").fetchone()
    assert row is not None
    assert count is not None
    assert count[0] >= BOOKINGS
    return Scope(int(row[0]), str(row[1]))


@pytest.mark.parametrize("days", [30, 365])
def test_per_salon_reports_use_the_covering_index(seeded_url: str, days: int) -> None:
    scope = _salon(seeded_url)
    today = date.today()
    period = Period(today - timedelta(days=days - 1), today)
    statements = {
        "dashboard": (queries.dashboard_sql(scope), queries._bind(scope, period)),
        "bookings": (
            queries.bookings_sql(scope, BookingFilters()),
            queries._bind(
                scope, period, unit="week", professional_id=None, service_id=None, status=None
            ),
        ),
        "professionals": (
            queries.professionals_sql(scope),
            queries._bind(scope, period, after_id=None, page_rows=51),
        ),
    }
    for report, (sql, params) in statements.items():
        nodes = _explain(seeded_url, sql, params)
        scans = [
            (n["Node Type"], n.get("Index Name"))
            for n in nodes
            if n.get("Relation Name") == "bookings"
        ]
        assert scans, report
        assert not [s for s in scans if s[0] == "Seq Scan"], (report, scans)
        assert ("Index Only Scan", "idx_bookings_salon_scheduled_covering") in scans, (
            report,
            scans,
        )


def test_platform_reports_read_the_rollups_not_the_bookings(seeded_url: str) -> None:
    """Platform-wide, a year: no scan of ``bookings`` except the page of professionals' own
    rows, read index-only through ``idx_bookings_professional_scheduled_covering``."""
    scope = Scope(None)
    today = date.today()
    period = Period(today - timedelta(days=364), today)
    statements = {
        "dashboard": (queries.dashboard_sql(scope), queries._bind(scope, period)),
        "bookings": (
            queries.bookings_sql(scope, BookingFilters(status="completed")),
            queries._bind(
                scope,
                period,
                unit="month",
                professional_id=None,
                service_id=None,
                status="completed",
            ),
        ),
        "professionals": (
            queries.professionals_sql(scope),
            queries._bind(scope, period, after_id=None, page_rows=51),
        ),
    }
    for report, (sql, params) in statements.items():
        nodes = _explain(seeded_url, sql, params)
        relations = {n["Relation Name"] for n in nodes if "Relation Name" in n}
        assert relations & {"platform_day_rollups", "professional_month_rollups"}, report
        scans = [
            (n["Node Type"], n.get("Index Name"))
            for n in nodes
            if n.get("Relation Name") == "bookings"
        ]
        if report == "professionals":
            assert scans == [("Index Only Scan", "idx_bookings_professional_scheduled_covering")], (
                scans
            )
        else:
            assert scans == [], (report, scans)
