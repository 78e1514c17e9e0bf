"""A history checker for the change stream: concurrent writers, then everything exact.

Eight writer connections run randomized multi-statement transactions for a few seconds while
reports are read (and cached) through the app: inserts, a multi-row insert and a COPY, status
changes, moves of ``scheduled_at`` across local days, months and UTC midnight, changes of
client, professional, service, salon and price, deletes, and 10 % rollbacks. Each transaction
changes at most one existing row (plus new ones), so the workload cannot deadlock by itself:
any deadlock, serialization failure or lock timeout would be caused by the service, and the
test asserts there are none. Nothing is switched off: the stream is folded by a consumer and
the app invalidates its cache from the stream's notifications.

Once the stream has caught up: every derived table equals its recomputation
(``rollups verify``), and every report — per salon in four time zones and platform-wide, read
through the API from the cache and recomputed — equals the naive baseline.

Interleavings this would catch: a fold that counts a transaction twice or skips one (counters
off), visit days or first bookings recomputed from a state that misses a concurrent change, an
invalidation sent before the derived rows commit (a stale entry cached as current), a writer
blocked or aborted by anything of ours.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from datetime import UTC, date, datetime, timedelta
from typing import Any

import orjson
import psycopg
import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session

from benchmarks.naive import naive_bookings, naive_dashboard, naive_professionals
from service.changes.verify import verify
from service.reports.params import BookingFilters, Period, Scope
from service.reports.schemas import (
    BookingsReport,
    DashboardReport,
    ProfessionalsReport,
    ReportMeta,
)
from tests.conftest import Api

WRITERS = 8
SECONDS = 4.0
TIMEZONES = ("UTC", "Europe/Lisbon", "America/New_York", "Asia/Tokyo")
STATUSES = ("pending", "confirmed", "completed", "cancelled", "no_show")
# around a month's end, so moves cross local days, months and UTC midnight
PERIODS = (
    Period(date(2026, 1, 20), date(2026, 2, 10)),
    Period(date(2026, 1, 31), date(2026, 2, 1)),
)
BASE = datetime(2026, 1, 31, 20, tzinfo=UTC)
SHIFTS = (-49, -25, -24, -5, -1, 1, 3, 4, 23, 24, 24 * 31)  # hours
SERVICE_ADDED = (
    psycopg.errors.DeadlockDetected,
    psycopg.errors.SerializationFailure,
    psycopg.errors.LockNotAvailable,
)


def build(db: psycopg.Connection, rng: random.Random) -> dict[str, Any]:
    salons, pros, services = [], {}, {}
    for index, zone in enumerate(TIMEZONES):
        salon = db.execute(
            "INSERT INTO salons (name, timezone) VALUES (%s, %s) RETURNING id",
            (f"S{index}", zone),
        ).fetchone()[0]
        salons.append(salon)
        pros[salon] = [
            db.execute(
                "INSERT INTO professionals (salon_id, name) VALUES (%s, %s) RETURNING id",
                (salon, f"P{index}.{n}"),
            ).fetchone()[0]
            for n in range(3)
        ]
        services[salon] = [
            db.execute(
                "INSERT INTO services (salon_id, category, name, price_cents, duration_min)"
                " VALUES (%s, %s, %s, %s, 30) RETURNING id",
                (salon, ("hair", "nails", "spa")[n], f"Sv{index}.{n}", 1000 + 500 * n),
            ).fetchone()[0]
            for n in range(3)
        ]
    clients = [
        db.execute(
            "INSERT INTO users (role, email) VALUES ('client', %s) RETURNING id",
            (f"h{n}@example.test",),
        ).fetchone()[0]
        for n in range(30)
    ]
    world = {"salons": salons, "pros": pros, "services": services, "clients": clients}
    for _ in range(300):
        db.execute(*insert_sql(world, rng))
    return world


def booking_values(world: dict[str, Any], rng: random.Random) -> tuple[Any, ...]:
    salon = rng.choice(world["salons"])
    return (
        salon,
        rng.choice(world["clients"]),
        rng.choice(world["pros"][salon]),
        rng.choice(world["services"][salon]),
        BASE + timedelta(hours=rng.randint(-24 * 12, 24 * 12), minutes=rng.choice((0, 30))),
        rng.choice(STATUSES),
        rng.choice((0, 1500, 2500, 4000)),
    )


def insert_sql(world: dict[str, Any], rng: random.Random) -> tuple[str, tuple[Any, ...]]:
    return (
        "INSERT INTO bookings (salon_id, client_id, professional_id, service_id, scheduled_at,"
        " status, price_cents) VALUES (%s, %s, %s, %s, %s, %s, %s)",
        booking_values(world, rng),
    )


def change_sql(
    world: dict[str, Any], rng: random.Random, booking: int
) -> tuple[str, tuple[Any, ...]]:
    """One change to one existing booking."""
    kind = rng.choice(
        ("status", "move", "client", "professional", "service", "salon", "price", "delete")
    )
    if kind == "status":
        return "UPDATE bookings SET status = %s WHERE id = %s", (rng.choice(STATUSES), booking)
    if kind == "move":
        shift = timedelta(hours=rng.choice(SHIFTS))
        return "UPDATE bookings SET scheduled_at = scheduled_at + %s WHERE id = %s", (
            shift,
            booking,
        )
    if kind == "client":
        return "UPDATE bookings SET client_id = %s WHERE id = %s", (
            rng.choice(world["clients"]),
            booking,
        )
    if kind == "price":
        return "UPDATE bookings SET price_cents = %s WHERE id = %s", (
            rng.randint(0, 9) * 500,
            booking,
        )
    if kind == "delete":
        return "DELETE FROM bookings WHERE id = %s", (booking,)
    salon = rng.choice(world["salons"])
    if kind == "salon":  # to another salon, with one of its professionals and services
        return (
            "UPDATE bookings SET salon_id = %s, professional_id = %s, service_id = %s"
            " WHERE id = %s",
            (
                salon,
                rng.choice(world["pros"][salon]),
                rng.choice(world["services"][salon]),
                booking,
            ),
        )
    column = "professional_id" if kind == "professional" else "service_id"
    pool = world["pros"] if kind == "professional" else world["services"]
    return (
        f"UPDATE bookings SET {column} = %s"
        f" WHERE id = %s AND salon_id = %s",  # same salon: the row stays consistent
        (rng.choice(pool[salon]), booking, salon),
    )


class Writers:
    """WRITERS threads writing random transactions until ``stop``; failures are sorted."""

    def __init__(self, dsn: str, world: dict[str, Any], seed: int) -> None:
        self.dsn = dsn
        self.world = world
        self.seed = seed
        self.stop = threading.Event()
        self.committed = 0
        self.rolled_back = 0
        self.service_failures: list[str] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()

    def run(self, index: int) -> None:
        rng = random.Random(self.seed * 100 + index)
        try:
            with psycopg.connect(self.dsn) as connection:
                ids = [row[0] for row in connection.execute("SELECT id FROM bookings")]
                connection.commit()
                while not self.stop.is_set():
                    self._transaction(connection, rng, ids)
        except BaseException as error:  # reported by the test
            self.errors.append(error)

    def _transaction(
        self, connection: psycopg.Connection, rng: random.Random, ids: list[int]
    ) -> None:
        world = self.world
        try:
            for _ in range(rng.randint(0, 2)):
                connection.execute(*insert_sql(world, rng))
            roll = rng.random()
            if roll < 0.1:  # a multi-row insert
                rows = [booking_values(world, rng) for _ in range(3)]
                connection.execute(
                    "INSERT INTO bookings (salon_id, client_id, professional_id, service_id,"
                    " scheduled_at, status, price_cents) VALUES"
                    + ", ".join(["(%s, %s, %s, %s, %s, %s, %s)"] * len(rows)),
                    [value for row in rows for value in row],
                )
            elif roll < 0.15:  # COPY
                with connection.cursor().copy(
                    "COPY bookings (salon_id, client_id, professional_id, service_id,"
                    " scheduled_at, status, price_cents) FROM STDIN"
                ) as copy:
                    for _ in range(2):
                        copy.write_row(booking_values(world, rng))
            connection.execute(*change_sql(world, rng, rng.choice(ids)))
            if rng.random() < 0.1:
                connection.rollback()
                with self._lock:
                    self.rolled_back += 1
            else:
                connection.commit()
                with self._lock:
                    self.committed += 1
        except SERVICE_ADDED as error:
            connection.rollback()
            with self._lock:
                self.service_failures.append(type(error).__name__)


def expected_body(engine: Engine, report: str, scope: Scope, period: Period) -> Any:
    meta = ReportMeta(
        salon_id=scope.salon_id, timezone=scope.timezone, start=period.start, end=period.end
    )
    with Session(engine) as session:
        if report == "dashboard":
            model: Any = DashboardReport(meta=meta, **naive_dashboard(session, scope, period))
        elif report == "bookings":
            data = naive_bookings(session, scope, period, "day", BookingFilters())
            model = BookingsReport(meta=meta, **data)
        else:
            items = naive_professionals(session, scope, period)
            model = ProfessionalsReport(meta=meta, items=items, next_cursor=None)
    return orjson.loads(orjson.dumps(model.model_dump()))


def asks(world: dict[str, Any]) -> list[tuple[str, Scope, Period]]:
    scopes = [Scope(None, "UTC")] + [
        Scope(salon, zone) for salon, zone in zip(world["salons"], TIMEZONES, strict=True)
    ]
    return [
        (report, scope, period)
        for report in ("dashboard", "bookings", "professionals")
        for scope in scopes
        for period in PERIODS
    ]


async def ask(api: Api, report: str, scope: Scope, period: Period) -> tuple[str, Any]:
    params: dict[str, Any] = {"start": period.start.isoformat(), "end": period.end.isoformat()}
    if scope.salon_id is not None:
        params["salon_id"] = scope.salon_id
    if report == "bookings":
        params["granularity"] = "day"
    if report == "professionals":
        params["limit"] = 200
    response = await api.report(report, **params)
    assert response.status_code == 200, response.text
    return response.headers["x-cache"], response.json()


@pytest.mark.parametrize("seed", [1, 2])
async def test_concurrent_history_leaves_everything_exact(
    api: Api, db: psycopg.Connection, clean_db: str, database_url: str, seed: int
) -> None:
    rng = random.Random(seed)
    world = build(db, rng)
    questions = asks(world)
    writers = Writers(clean_db, world, seed)
    threads = [threading.Thread(target=writers.run, args=(index,)) for index in range(WRITERS)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + SECONDS
    reads = 0
    try:
        while time.monotonic() < deadline:  # reads fill the cache while the writes go on
            await ask(api, *rng.choice(questions))
            reads += 1
            await asyncio.sleep(0.01)
    finally:
        writers.stop.set()
        for thread in threads:
            await asyncio.to_thread(thread.join, 30)
    assert not writers.errors, writers.errors
    assert writers.service_failures == [], writers.service_failures
    assert writers.committed > 200, writers.committed  # the history was not trivial
    assert writers.rolled_back > 0

    await api.resources.listener.settle()  # folded, and the invalidations handled
    assert await verify(clean_db, rounds=1) == []
    engine = create_engine(database_url)
    try:
        for report, scope, period in questions:
            expected = expected_body(engine, report, scope, period)
            first_cache, first = await ask(api, report, scope, period)
            second_cache, second = await ask(api, report, scope, period)
            assert first == expected, (report, scope, period, first_cache)
            assert (second_cache, second) == ("HIT", expected), (report, scope, period)
    finally:
        engine.dispose()
    assert reads >= 3  # reads interleaved with the writes (few: 8 writer threads share the GIL)
