"""Report queries through PgBouncer in transaction pooling mode.

``make test`` starts a PgBouncer (``PGBOUNCER=1 scripts/services.sh start``: ``pool_mode =
transaction``, 8 server connections per database and user) and writes its URL into ``.env`` as
``PGBOUNCER_DATABASE_URL``. With ``REPORTS_DB_TRANSACTION_POOLING=true`` the app's pools
rely on no session state: their settings are ``SET LOCAL`` in each transaction and psycopg
prepares no statements; the listener and the change stream connect to
``REPORTS_DIRECT_DATABASE_URL``. The whole differential report suite runs through it with
``SR_TEST_PGBOUNCER=1 pytest tests/reports``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from dotenv import dotenv_values
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from benchmarks.naive import naive_bookings, naive_dashboard, naive_professionals, naive_realtime
from service.config import Settings
from service.db import async_engine, libpq_url, with_database
from service.reports import queries
from tests.conftest import Api, RunningApi, app_settings
from tests.factories import small_dataset
from tests.reports.harness import Reports
from tests.reports.test_queries import EXAMPLE_CASES, FILTER_EXAMPLES, GRANULARITIES


def pgbouncer_url(database_url: str) -> str | None:
    """``database_url``'s database through the local PgBouncer, if one runs."""
    server = os.environ.get("PGBOUNCER_DATABASE_URL") or dotenv_values(".env").get(
        "PGBOUNCER_DATABASE_URL"
    )
    if not server:
        return None
    return with_database(
        server, str(psycopg.conninfo.conninfo_to_dict(libpq_url(database_url))["dbname"])
    )


@pytest.fixture
def bouncer_url(database_url: str) -> str:
    url = pgbouncer_url(database_url)
    if url is None:
        pytest.skip("no PgBouncer: start one with `make services PGBOUNCER=1`")
    return url


def _bouncer_clients() -> list[str]:
    """Application names of PgBouncer's client connections (its admin console)."""
    server = os.environ.get("PGBOUNCER_DATABASE_URL") or dotenv_values(".env").get(
        "PGBOUNCER_DATABASE_URL"
    )
    assert server is not None
    admin = libpq_url(with_database(server, "pgbouncer"))
    info = psycopg.conninfo.conninfo_to_dict(admin)
    info["user"] = "postgres"
    info.pop("password", None)
    with psycopg.connect(**info, autocommit=True) as connection:  # type: ignore[arg-type]
        cursor = connection.execute("SHOW CLIENTS")
        names = [column.name for column in cursor.description or ()]
        rows = cursor.fetchall()
    index = names.index("application_name")
    return [row[index] for row in rows]


@pytest.fixture
async def bouncer_api(
    base_settings: Settings, database_url: str, redis_url: str, bouncer_url: str
) -> AsyncIterator[Api]:
    settings = app_settings(
        base_settings,
        bouncer_url,
        redis_url,
        direct_database_url=database_url,
        transaction_pooling=True,
    )
    async with RunningApi(settings) as api:
        yield api


@pytest.fixture
def bouncer_reports(database_url: str, dsn: str, bouncer_url: str) -> Iterator[Reports]:
    runner = asyncio.Runner(loop_factory=asyncio.new_event_loop)
    engine = create_engine(database_url)
    sql_engine = async_engine(bouncer_url, pool_size=3, transaction_pooling=True)
    try:
        with psycopg.connect(dsn, autocommit=True) as connection:
            yield Reports(connection, engine, runner, sql_engine, dsn)
    finally:
        runner.run(sql_engine.dispose())
        runner.close()
        engine.dispose()


def test_every_report_matches_the_naive_one_through_pgbouncer(
    bouncer_reports: Reports,
) -> None:
    """The explicit cases of the differential suite (DST, period edges, platform scope, ties,
    empty), each report on three pooled connections sharing PgBouncer's server sessions: the
    same statements run far more often than psycopg's prepare threshold (5)."""
    reports = bouncer_reports
    for index, case in enumerate(EXAMPLE_CASES):
        reports.load(case.dataset)
        assert reports.sql(queries.dashboard_metrics, case.scope, case.period) == reports.naive(
            naive_dashboard, case.scope, case.period
        )
        filters = FILTER_EXAMPLES[index % len(FILTER_EXAMPLES)]
        for granularity in GRANULARITIES:
            expected = reports.naive(naive_bookings, case.scope, case.period, granularity, filters)
            actual = reports.sql(
                queries.booking_metrics, case.scope, case.period, granularity, filters
            )
            assert actual == expected, (index, granularity)
        assert reports.sql_professionals(case.scope, case.period, 2) == reports.naive(
            naive_professionals, case.scope, case.period
        )
        assert reports.sql(queries.realtime_metrics, case.scope, case.period.end) == reports.naive(
            naive_realtime, case.scope, case.period.end
        )


async def test_settings_hold_per_transaction_and_leak_into_no_session(bouncer_url: str) -> None:
    engine = async_engine(
        bouncer_url, pool_size=2, statement_timeout_ms=300, transaction_pooling=True
    )
    try:
        for _ in range(12):  # past the prepare threshold, on both pooled connections
            async with engine.connect() as first, engine.connect() as second:
                for connection in (first, second):
                    row = (
                        await connection.execute(
                            text(
                                "SELECT current_setting('statement_timeout'),"
                                " current_setting('jit'), current_setting('work_mem')"
                            )
                        )
                    ).one()
                    assert tuple(row) == ("300ms", "off", "64MB")
        # A statement run past psycopg's prepare threshold, then again while the server session
        # it ran on (the most recently used: PgBouncer hands them out last in, first out) is
        # taken by another client: nothing may have been prepared in a server session. (The
        # app's own transactions end in a rollback, which makes psycopg forget its counts, so
        # committed ones are used here.)
        query = text("SELECT count(*) FROM salons WHERE id > :id")
        for _ in range(16):  # on both pooled connections
            async with engine.begin() as connection:  # committed: psycopg keeps its counts
                await connection.execute(query, {"id": 0})
        with psycopg.connect(libpq_url(bouncer_url), prepare_threshold=None) as other:
            other.execute("SELECT 1")  # in a transaction: holds that server session
            async with engine.connect() as connection:
                assert (await connection.execute(query, {"id": 0})).scalar_one() >= 0
        async with engine.connect() as connection:
            with pytest.raises(OperationalError, match="statement timeout"):
                await connection.execute(text("SELECT pg_sleep(2)"))
    finally:
        await engine.dispose()
    # A plain client of the same PgBouncer, on the same server sessions, sees the defaults.
    with psycopg.connect(libpq_url(bouncer_url), autocommit=True, prepare_threshold=None) as plain:
        for _ in range(10):
            row = plain.execute(
                "SELECT current_setting('statement_timeout'), current_setting('work_mem')"
            ).fetchone()
            assert row is not None
            assert row[0] == "0"
            assert row[1] != "64MB"


async def test_the_app_through_pgbouncer_answers_like_the_app_without_it(
    bouncer_api: Api,
    db: psycopg.Connection,
    base_settings: Settings,
    database_url: str,
    redis_url: str,
) -> None:
    """Forty concurrent misses (more client connections than PgBouncer's eight server
    connections; the same report statements over and over), compared with a direct app."""
    api = bouncer_api
    data = small_dataset(db)
    listener = api.resources.listener
    assert listener is not None
    await listener.settle()
    salons = [data["lisbon"], data["newyork"], None]
    requests: list[tuple[str, dict[str, Any]]] = []
    today = datetime.now(UTC).date()
    for day in range(1, 15):
        for salon in salons:
            start = today - timedelta(days=day)
            params: dict[str, Any] = {"start": start.isoformat(), "end": today.isoformat()}
            if salon is not None:
                params["salon_id"] = salon
            requests.append((("dashboard", "bookings", "professionals")[day % 3], params))
    answers = await asyncio.gather(*(api.report(name, **params) for name, params in requests))
    assert [response.status_code for response in answers] == [200] * len(requests)

    # The listener and the change stream keep direct sessions; the report pools use PgBouncer.
    clients = _bouncer_clients()
    assert "salon-reports" in clients
    assert not {"salon-reports-listener", "salon-reports-stream"} & set(clients)

    # Without a cache: every answer computed again, on direct connections.
    async with RunningApi(app_settings(base_settings, database_url, "")) as direct:
        for (name, params), through in zip(requests, answers, strict=True):
            expected = await direct.report(name, **params)
            assert expected.status_code == 200
            assert through.json() == expected.json(), (name, params)
