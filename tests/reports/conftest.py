"""The ``reports`` fixture shared by the report tests."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import create_engine

from service.db import async_engine
from tests.reports.harness import Reports


@pytest.fixture(scope="module")
def reports(database_url: str, dsn: str) -> Iterator[Reports]:
    """The naive reports on a direct connection, the SQL ones on the pool the app uses; with
    ``SR_TEST_PGBOUNCER=1``, through the local PgBouncer in transaction pooling mode."""
    sql_url, pooling = database_url, False
    if os.environ.get("SR_TEST_PGBOUNCER") == "1":
        from tests.test_pgbouncer import pgbouncer_url

        bouncer = pgbouncer_url(database_url)
        if bouncer is None:
            pytest.fail("SR_TEST_PGBOUNCER=1 but no PgBouncer: `make services PGBOUNCER=1`")
        sql_url, pooling = bouncer, True
    # A private loop (not installed as the thread's current loop, so pytest-asyncio's session
    # loop is left alone) lets sync hypothesis tests call the async queries.
    runner = asyncio.Runner(loop_factory=asyncio.new_event_loop)
    engine = create_engine(database_url)
    sql_engine = async_engine(sql_url, pool_size=2, transaction_pooling=pooling)
    try:
        with psycopg.connect(dsn, autocommit=True) as connection:
            yield Reports(connection, engine, runner, sql_engine, dsn)
    finally:
        runner.run(sql_engine.dispose())
        runner.close()
        engine.dispose()
