"""The ``reports`` fixture shared by the report tests."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import create_engine

from service.db import async_engine
from tests.reports.harness import Reports


@pytest.fixture(scope="module")
def reports(database_url: str, dsn: str) -> Iterator[Reports]:
    # A private loop (not installed as the thread's current loop, so pytest-asyncio's session
    # loop is left alone) lets sync hypothesis tests call the async queries.
    runner = asyncio.Runner(loop_factory=asyncio.new_event_loop)
    engine = create_engine(database_url)
    sql_engine = async_engine(database_url, pool_size=2)
    try:
        with psycopg.connect(dsn, autocommit=True) as connection:
            yield Reports(connection, engine, runner, sql_engine, dsn)
    finally:
        runner.run(sql_engine.dispose())
        runner.close()
        engine.dispose()
