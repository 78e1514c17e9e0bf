"""The benchmark dataset comes with its derived tables filled, exactly, and no slot.

A freshly seeded benchmark database has bookings but empty rollups until a server's
change-stream consumer starts on it; the platform-wide reports and the client counts read
those tables, so ``benchmarks.dataset`` computes them itself (and for a dataset built before it
did, on reuse). Without that, the benchmarks measure the platform reports on empty rollups.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from benchmarks import dataset as bench
from service.changes import derived
from service.config import Settings
from service.db import libpq_url, with_database
from tests.conftest import _worker_suffix, drop_database

PARAMS = bench.DatasetParams(bookings=3_000, salons=4, days=60, seed=7)


@pytest.fixture
def bench_database(base_settings: Settings, admin_dsn: str, monkeypatch: Any) -> Iterator[str]:
    name = f"salon_reports_bench_test_{_worker_suffix()}"
    monkeypatch.setattr(bench, "BENCH_DATABASE", name)
    drop_database(admin_dsn, name)
    yield name
    drop_database(admin_dsn, name)


def _differences(url: str) -> dict[str, int]:
    """Per derived table: rows stored but not recomputed, plus rows recomputed but not stored."""
    out = {}
    with psycopg.connect(libpq_url(url)) as connection:
        for table in derived.TABLES:
            stored, fresh = derived.stored_sql(table), derived.recompute_sql(table)
            row = connection.execute(
                f"SELECT (SELECT count(*) FROM (({stored}) EXCEPT ALL ({fresh})) a)"
                f" + (SELECT count(*) FROM (({fresh}) EXCEPT ALL ({stored})) b)"
            ).fetchone()
            assert row is not None
            out[table] = int(row[0])
    return out


def _filled(url: str) -> dict[str, Any]:
    with psycopg.connect(libpq_url(url)) as connection:
        row = connection.execute(
            "SELECT (SELECT sum(pending + confirmed + completed + cancelled + no_show)"
            " FROM platform_day_rollups), (SELECT count(*) FROM bookings),"
            " (SELECT count(*) FROM salon_client_first_bookings),"
            " (SELECT state FROM change_stream_position)"
        ).fetchone()
    assert row is not None
    return {"rolled_up": row[0], "bookings": row[1], "firsts": row[2], "state": row[3]}


def _slots(admin_dsn: str, name: str) -> int:
    with psycopg.connect(admin_dsn) as connection:
        row = connection.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE database = %s", (name,)
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_a_built_dataset_has_its_derived_tables(
    base_settings: Settings, admin_dsn: str, bench_database: str
) -> None:
    built = bench.ensure_dataset(PARAMS, progress=False, log=lambda *_: None)
    assert not built.reused
    url = with_database(base_settings.database_url, bench_database)
    filled = _filled(url)
    assert filled["rolled_up"] == filled["bookings"] == PARAMS.bookings
    assert filled["firsts"] > 0
    assert _differences(url) == dict.fromkeys(derived.TABLES, 0)
    # no slot: the stream stays uninitialised, a server started on it later rebuilds
    assert filled["state"] == "uninitialised"
    assert _slots(admin_dsn, bench_database) == 0

    # A dataset whose derived tables are empty (built before this step) is filled on reuse.
    with psycopg.connect(libpq_url(url)) as connection:
        for table in derived.TABLES:
            connection.execute(f"DELETE FROM {table}")
    reused = bench.ensure_dataset(PARAMS, progress=False, log=lambda *_: None)
    assert reused.reused
    assert _filled(url)["rolled_up"] == PARAMS.bookings
    assert _differences(url) == dict.fromkeys(derived.TABLES, 0)
    assert _slots(admin_dsn, bench_database) == 0


def test_a_dataset_for_the_service_has_its_stream_current(
    base_settings: Settings, admin_dsn: str, bench_database: str
) -> None:
    """The load tests start servers that answer only once the stream is current (readiness):
    with ``stream=True`` it is initialised before they start, with its slot, exactly; asked
    again, nothing more is done (the same slot); the fixture drops the slot with the database."""
    url = with_database(base_settings.database_url, bench_database)
    bench.ensure_dataset(PARAMS, progress=False, log=lambda *_: None, stream=True)
    filled = _filled(url)
    assert filled["state"] == "current"
    assert filled["rolled_up"] == PARAMS.bookings
    assert _differences(url) == dict.fromkeys(derived.TABLES, 0)
    assert _slots(admin_dsn, bench_database) == 1
    with psycopg.connect(libpq_url(url)) as connection:
        row = connection.execute("SELECT slot_name FROM change_stream_position").fetchone()
    assert row is not None
    bench.ensure_dataset(PARAMS, progress=False, log=lambda *_: None, stream=True)
    with psycopg.connect(libpq_url(url)) as connection:
        again = connection.execute("SELECT slot_name FROM change_stream_position").fetchone()
    assert again == row
    assert _slots(admin_dsn, bench_database) == 1
