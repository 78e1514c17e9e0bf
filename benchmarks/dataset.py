"""The benchmark dataset: 1,000,000 bookings in their own database, built once and reused.

``ensure_dataset()`` makes sure that the database ``salon_reports_bench``, on the same
PostgreSQL server as ``DATABASE_URL``, exists, is migrated to the newest schema and holds the
benchmark data, and returns its SQLAlchemy URL. The data is that of

    seed_database(url, bookings=1_000_000, salons=200, days=400, seed=42, today=<day seeded>)

A finished load leaves a marker, ``COMMENT ON DATABASE salon_reports_bench`` holding those
parameters, the day it was seeded (the data is relative to that day; the benchmarks take
their windows from it, so a dataset seeded last week still measures the same thing) and a
digest of the code that shaped it (``migrations/versions/*.py`` and ``service/tools/seed/``). The
database is reused when the marker matches and ``bookings`` holds exactly that many rows;
otherwise it is dropped and rebuilt (about 25 s for the load plus indexes and ``VACUUM
ANALYZE``): a new or edited migration (a rollup table, say) or another generator never meets
a database built by older code, and a database migrated by another branch is rebuilt rather
than half-migrated. Two benchmark processes starting together serialise on an advisory lock.

The derived tables of the change stream (the rollups, the visit pairs, the first bookings) are
computed from ``bookings`` when the dataset is built, and on reuse when they are still empty
(a dataset built before this step): the platform-wide reports and the client counts read them,
and nothing else fills them until a server's change-stream consumer starts on the database.
No replication slot is created for the query benchmark (an unread slot on a benchmark database
would hold WAL back). The benchmarks that start the service (``make loadtest``, the noisy
neighbour, the hot path, the refusals) ask for ``stream=True``: the stream is then initialised
here when it is not current (``salon-reports rollups rebuild``'s work: the slot, the derived
tables rebuilt at its snapshot), before any server starts. A server started on an uninitialised
database would do the same in its consumer, but on 1 M bookings that takes longer than the load
test waits for a server to be ready, and every server of a run would race for it.

Two variables change it: ``BENCH_BOOKINGS`` (default 1,000,000: e.g. 5000000 for the scaling
figures) and ``BENCH_DATABASE`` (default ``salon_reports_bench``; another name keeps a second
dataset, or one's own on a shared server, beside the first).

    python -m benchmarks.dataset            # ensure, print the summary
    python -m benchmarks.dataset --rebuild  # drop and seed again
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import psycopg
from alembic.util.exc import CommandError
from psycopg import sql

from service.changes import derived
from service.changes.rebuild import rebuild as rebuild_stream
from service.config import get_settings
from service.db import MIGRATIONS_DIR, libpq_url, migrate, with_database
from service.tools import seed as seed_module
from service.tools.seed import seed_database

BENCH_DATABASE = os.environ.get("BENCH_DATABASE") or "salon_reports_bench"
MAINTENANCE_DATABASE = "postgres"
# pg_advisory_lock(LOCK_ID, hashtext(<database>)) is held while checking or building a dataset:
# per database, so a build of one does not hold up the users of another.
LOCK_ID = 0x5A1_0B_E4C
MARKER_KIND = "salon-reports benchmark dataset"


@dataclass(frozen=True, slots=True)
class DatasetParams:
    bookings: int = int(os.environ.get("BENCH_BOOKINGS") or 1_000_000)
    salons: int = 200
    days: int = 400
    seed: int = 42


@dataclass(frozen=True, slots=True)
class Dataset:
    """A ready benchmark database."""

    url: str
    params: DatasetParams
    seeded_on: date  # the ``today`` the data was generated relative to
    bookings: int
    reused: bool
    build_seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "database": BENCH_DATABASE,
            "params": asdict(self.params),
            "seeded_on": self.seeded_on.isoformat(),
            "bookings": self.bookings,
            "reused": self.reused,
            "build_seconds": round(self.build_seconds, 1),
            "code_digest": code_digest(),
        }


def bench_url(database_url: str | None = None) -> str:
    """``DATABASE_URL`` (from the environment or ``.env``) pointing at the benchmark database."""
    return with_database(database_url or get_settings().database_url, BENCH_DATABASE)


def code_digest() -> str:
    """What shapes the dataset besides its parameters: the migrations and the generator."""
    digest = hashlib.sha256()
    seed_files = sorted(Path(seed_module.__file__ or "").parent.glob("*.py"))
    files = [*sorted((MIGRATIONS_DIR / "versions").glob("*.py")), *seed_files]
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _marker(params: DatasetParams, seeded_on: date) -> str:
    return json.dumps(
        {
            "kind": MARKER_KIND,
            **asdict(params),
            "seeded_on": seeded_on.isoformat(),
            "code": code_digest(),
        }
    )


def _read_marker(admin: psycopg.Connection[Any], params: DatasetParams) -> date | None:
    """The day the dataset was seeded, when the marker says it was seeded with ``params``."""
    row = admin.execute(
        "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
        (BENCH_DATABASE,),
    ).fetchone()
    if row is None or not row[0]:
        return None
    try:
        marker = json.loads(row[0])
    except json.JSONDecodeError:
        return None
    if not isinstance(marker, dict) or marker.get("kind") != MARKER_KIND:
        return None
    if any(marker.get(key) != value for key, value in asdict(params).items()):
        return None
    if marker.get("code") != code_digest():
        return None
    try:
        return date.fromisoformat(str(marker.get("seeded_on")))
    except ValueError:
        return None


def _booking_count(url: str) -> int | None:
    try:
        with psycopg.connect(libpq_url(url)) as connection:
            row = connection.execute("SELECT count(*) FROM bookings").fetchone()
    except psycopg.Error:
        return None
    return None if row is None else int(row[0])


def _derived_filled(url: str) -> bool:
    """Whether the derived tables hold the bookings (or a server's stream maintains them)."""
    with psycopg.connect(libpq_url(url)) as connection:
        row = connection.execute(
            "SELECT (SELECT state FROM change_stream_position),"
            " EXISTS (SELECT 1 FROM platform_day_rollups), EXISTS (SELECT 1 FROM bookings)"
        ).fetchone()
    assert row is not None
    state, rolled_up, booked = row
    return state != "uninitialised" or rolled_up or not booked


def fill_derived(url: str, log: Any = print) -> float:
    """Compute every derived table from ``bookings`` (no slot), then ``VACUUM ANALYZE`` them."""
    started = time.perf_counter()
    with psycopg.connect(libpq_url(url)) as connection:
        for table in derived.TABLES:
            connection.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(table)))
            connection.execute(
                f"INSERT INTO {table} ({derived.columns_of(table)}) {derived.recompute_sql(table)}"
            )
        connection.commit()
    with psycopg.connect(libpq_url(url), autocommit=True) as connection:
        tables = sql.SQL(", ").join(map(sql.Identifier, derived.TABLES))
        connection.execute(sql.SQL("VACUUM (ANALYZE) {}").format(tables))
        # Index-only scans need the visibility map; a transaction open elsewhere on the server
        # (an old snapshot) can keep VACUUM from setting it: say so rather than measure heap.
        partly = connection.execute(
            "SELECT relname FROM pg_class WHERE relname = ANY(%s) AND relallvisible < relpages",
            (list(derived.TABLES),),
        ).fetchall()
        if partly:
            names = ", ".join(row[0] for row in partly)
            log(f"benchmark database {BENCH_DATABASE}: not all-visible after VACUUM: {names}")
    seconds = time.perf_counter() - started
    log(f"benchmark database {BENCH_DATABASE}: derived tables computed in {seconds:.1f} s")
    return seconds


def _database_exists(admin: psycopg.Connection[Any]) -> bool:
    row = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (BENCH_DATABASE,))
    return row.fetchone() is not None


def _recreate(admin: psycopg.Connection[Any]) -> None:
    name = sql.Identifier(BENCH_DATABASE)
    # FORCE: a benchmark server left running from an aborted run must not block the rebuild.
    admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))
    admin.execute(sql.SQL("CREATE DATABASE {}").format(name))


def ensure_dataset(
    params: DatasetParams | None = None,
    *,
    database_url: str | None = None,
    rebuild: bool = False,
    progress: bool = True,
    log: Any = print,
    stream: bool = False,
) -> Dataset:
    """The benchmark database, migrated and seeded; built only when missing or different.
    With ``stream``, its change stream is also current (initialised here if it is not)."""
    dataset = _ensure_dataset(params, database_url, rebuild, progress, log)
    if stream:
        initialise_stream(dataset.url, log)
    return dataset


def initialise_stream(url: str, log: Any = print) -> None:
    """Initialise the change stream (slot and derived tables) unless it is current."""
    with psycopg.connect(libpq_url(url)) as connection:
        row = connection.execute("SELECT state FROM change_stream_position").fetchone()
    if row is not None and row[0] == "current":
        return
    # In a thread of its own: callers may be inside an event loop already.
    with ThreadPoolExecutor(max_workers=1) as pool:
        rebuilt = pool.submit(asyncio.run, rebuild_stream(libpq_url(url))).result()
    log(
        f"benchmark database {BENCH_DATABASE}: change stream initialised (slot"
        f" {rebuilt.slot_name}, derived tables rebuilt in {rebuilt.seconds:.1f} s)"
    )


def _ensure_dataset(
    params: DatasetParams | None,
    database_url: str | None,
    rebuild: bool,
    progress: bool,
    log: Any,
) -> Dataset:
    params = params or DatasetParams()
    url = bench_url(database_url)
    server = with_database(database_url or get_settings().database_url, MAINTENANCE_DATABASE)
    started = time.perf_counter()
    with psycopg.connect(libpq_url(server), autocommit=True) as admin:
        admin.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (LOCK_ID, BENCH_DATABASE))
        try:
            seeded_on = None if rebuild else _read_marker(admin, params)
            if seeded_on is not None and _booking_count(url) == params.bookings:
                try:
                    migrate(url)
                except CommandError as error:
                    # Migrated by a newer tree (another branch): this one cannot use it as is.
                    log(f"benchmark database {BENCH_DATABASE}: {error}; rebuilding it")
                else:
                    if not _derived_filled(url):
                        fill_derived(url, log)
                    return Dataset(
                        url, params, seeded_on, params.bookings, True, time.perf_counter() - started
                    )
            if _database_exists(admin):
                log(
                    f"benchmark database {BENCH_DATABASE}: no marker, other parameters, other"
                    " migrations or generator, or another row count; rebuilding it"
                )
            _recreate(admin)
            migrate(url)
            seeded_on = datetime.now(UTC).date()
            log(seed_database(url, **asdict(params), today=seeded_on, progress=progress))
            fill_derived(url, log)
            # The marker comes last: an interrupted build is never mistaken for a finished one.
            admin.execute(
                sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                    sql.Identifier(BENCH_DATABASE), sql.Literal(_marker(params, seeded_on))
                )
            )
            count = _booking_count(url) or 0
            if count != params.bookings:
                raise RuntimeError(f"seeded {count} bookings, expected {params.bookings}")
            return Dataset(url, params, seeded_on, count, False, time.perf_counter() - started)
        finally:
            admin.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", (LOCK_ID, BENCH_DATABASE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rebuild", action="store_true", help="drop and seed again")
    args = parser.parse_args()
    dataset = ensure_dataset(rebuild=args.rebuild)
    print(json.dumps(dataset.as_dict(), indent=2))


if __name__ == "__main__":
    main()
