"""The platform rollups stay exact under every kind of write, folded by the change stream.

Platform-wide reports are answered from the rollups, so after any sequence of writes —
inserts, moves to another day or hour, status, price, client and professional changes,
deletes, multi-row statements — and once the stream has caught up, the rollup tables must
equal a computation from scratch (written here independently of ``service.changes.derived``),
and the platform-wide reports must still equal the naive baseline. Concurrent writers are
tested by the history checker in ``tests/changes``.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import psycopg
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.naive import naive_bookings, naive_dashboard, naive_professionals
from service.config import Settings
from service.db import libpq_url, migrate, with_database
from service.reports import queries
from service.reports.params import STATUSES, BookingFilters, Period, Scope
from service.tools.seed import seed_database
from tests.conftest import _worker_suffix, create_database, drop_database, settle_stream
from tests.reports.harness import Reports
from tests.reports.strategies import Case, cases

PLATFORM = Scope(salon_id=None)

# Each counter rollup: its key columns, and their expressions over a booking.
_UTC = "scheduled_at AT TIME ZONE 'UTC'"
_DAY = f"({_UTC})::date"
_MONTH = f"date_trunc('month', {_UTC})::date"
COUNTERS = {
    "platform_day_rollups": (("day", _DAY),),
    "platform_hour_rollups": (("day", _DAY), ("hour", f"extract(hour FROM {_UTC})::int")),
    "service_day_rollups": (("day", _DAY), ("service_id", "service_id")),
    "service_month_rollups": (("month", _MONTH), ("service_id", "service_id")),
    "professional_day_rollups": (("day", _DAY), ("professional_id", "professional_id")),
    "professional_month_rollups": (("month", _MONTH), ("professional_id", "professional_id")),
}
_COUNTS = ", ".join(f"count(*) FILTER (WHERE status = '{s}')" for s in STATUSES)
_REVENUE = "coalesce(sum(price_cents) FILTER (WHERE status = 'completed'), 0)"
_NONZERO = " OR ".join(f"{column} <> 0" for column in (*STATUSES, "revenue_cents"))


def _sql_pairs() -> dict[str, tuple[str, str]]:
    """Per table: (what it holds, what it must hold computed from ``bookings`` from scratch).

    A counter that went back to zero may stay in its table, so zero rows are left out.
    """
    pairs = {
        table: (
            f"SELECT {', '.join(name for name, _ in keys)}, {', '.join(STATUSES)},"
            f" revenue_cents FROM {table} WHERE {_NONZERO}",
            f"SELECT {', '.join(expression for _, expression in keys)}, {_COUNTS}, {_REVENUE}"
            f" FROM bookings GROUP BY {', '.join(str(n + 1) for n in range(len(keys)))}",
        )
        for table, keys in COUNTERS.items()
    }
    pairs["client_visit_days"] = (
        "SELECT client_id, day, bookings FROM client_visit_days",
        f"SELECT client_id, {_DAY}, count(*) FROM bookings GROUP BY 1, 2",
    )
    pairs["client_visit_pairs"] = (
        "SELECT day, prev_day::text, clients FROM client_visit_pairs WHERE clients <> 0",
        f"""
        SELECT day, prev_day::text, count(*) FROM (
            SELECT day, coalesce(lag(day) OVER (PARTITION BY client_id ORDER BY day),
                                 '-infinity') AS prev_day
            FROM (SELECT DISTINCT client_id, {_DAY} AS day FROM bookings) AS days
        ) AS pairs GROUP BY 1, 2""",
    )
    return pairs


ROLLUPS = _sql_pairs()


def assert_rollups_exact(connection: psycopg.Connection) -> None:
    """Every derived table the schema has (``client_visit_days`` arrived with 0005)."""
    for table, (stored, expected) in ROLLUPS.items():
        found = connection.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
        if table == "client_visit_days" and found == (False,):
            continue
        held = sorted(connection.execute(stored).fetchall())
        assert held == sorted(connection.execute(expected).fetchall()), table


# -- writes ---------------------------------------------------------------------------------


def _write_sql(
    kind: str, booking_id: int, case: Case, pick: int, shift_hours: int
) -> tuple[str, tuple[Any, ...]]:
    dataset = case.dataset
    client = dataset.clients[pick % len(dataset.clients)]
    professional = dataset.professionals[pick % len(dataset.professionals)]
    status = STATUSES[pick % len(STATUSES)]
    if kind == "move":
        return (
            "UPDATE bookings SET scheduled_at = scheduled_at + %s WHERE id = %s",
            (timedelta(hours=shift_hours), booking_id),
        )
    if kind == "status":
        return "UPDATE bookings SET status = %s WHERE id = %s", (status, booking_id)
    if kind == "price":
        return "UPDATE bookings SET price_cents = %s WHERE id = %s", (pick * 700, booking_id)
    if kind == "client":
        return "UPDATE bookings SET client_id = %s WHERE id = %s", (client, booking_id)
    if kind == "professional":
        return (
            "UPDATE bookings SET professional_id = %s WHERE id = %s",
            (professional.id, booking_id),
        )
    if kind == "delete":
        return "DELETE FROM bookings WHERE id = %s", (booking_id,)
    if kind == "copy":
        # a new booking: the same as an existing one, a few hours later, for another client
        return (
            "INSERT INTO bookings (salon_id, client_id, professional_id, service_id,"
            " scheduled_at, status, price_cents)"
            " SELECT salon_id, %s, professional_id, service_id, scheduled_at + %s, %s,"
            " price_cents FROM bookings WHERE id = %s",
            (client, timedelta(hours=shift_hours), status, booking_id),
        )
    if kind == "all_status":
        return "UPDATE bookings SET status = %s WHERE client_id = %s", (status, client)
    assert kind == "all_delete"
    return "DELETE FROM bookings WHERE client_id = %s AND status = %s", (client, status)


WRITE_KINDS = (
    "move",
    "status",
    "price",
    "client",
    "professional",
    "delete",
    "copy",
    "all_status",
    "all_delete",
)
writes = st.lists(
    st.tuples(
        st.sampled_from(WRITE_KINDS),
        st.integers(0, 30),  # which booking (by position)
        st.integers(0, 40),  # which client / professional / status / price
        st.sampled_from((-49, -24, -1, 1, 5, 24, 30 * 24)),  # hours moved
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=40, deadline=None)
@given(case=cases(), changes=writes)
def test_rollups_follow_every_kind_of_write(
    reports: Reports, case: Case, changes: list[tuple[str, int, int, int]]
) -> None:
    reports.load(case.dataset)
    connection = reports.connection
    if case.dataset.bookings:
        connection.execute("SELECT setval('bookings_id_seq', (SELECT max(id) FROM bookings))")
    for kind, position, pick, shift in changes:
        ids = [row[0] for row in connection.execute("SELECT id FROM bookings ORDER BY id")]
        if not ids:
            break
        sql, params = _write_sql(kind, ids[position % len(ids)], case, pick, shift)
        connection.execute(sql, params)

    reports.settle()
    assert_rollups_exact(connection)
    # ... and the platform-wide reports, which read them, still equal the naive ones
    period = case.period
    assert reports.sql(queries.dashboard_metrics, PLATFORM, period) == reports.naive(
        naive_dashboard, PLATFORM, period
    )
    for status in (None, "completed", "cancelled"):
        filters = BookingFilters(status=status)
        assert reports.sql(
            queries.booking_metrics, PLATFORM, period, "week", filters
        ) == reports.naive(naive_bookings, PLATFORM, period, "week", filters)
    assert reports.sql_professionals(PLATFORM, period, 2) == reports.naive(
        naive_professionals, PLATFORM, period
    )


def _platform_bookings(connection: psycopg.Connection, clients: int) -> None:
    """One salon, a professional and a service; ``clients`` clients."""
    connection.execute(
        "TRUNCATE salons, users, professionals, services, bookings RESTART IDENTITY CASCADE"
    )
    connection.execute("INSERT INTO salons (id, name, timezone) VALUES (1, 'S', 'UTC')")
    connection.execute(
        "INSERT INTO users (id, role, email)"
        " SELECT g, 'client', 'c' || g || '@example.test' FROM generate_series(1, %s) g",
        (clients,),
    )
    connection.execute(
        "INSERT INTO professionals (id, salon_id, name)"
        " SELECT g, 1, 'P' || g FROM generate_series(1, 4) g"
    )
    connection.execute(
        "INSERT INTO services (id, salon_id, category, name, price_cents, duration_min)"
        " SELECT g, 1, 'hair', 'Cut ' || g, 1000, 30 FROM generate_series(1, 4) g"
    )


def test_bulk_statements(reports: Reports) -> None:
    """Hundreds of clients in one statement (a batch import), table-wide moves, TRUNCATE."""
    connection = reports.connection
    _platform_bookings(connection, clients=300)
    connection.execute(
        "INSERT INTO bookings (salon_id, client_id, professional_id, service_id, scheduled_at,"
        " status, price_cents)"
        " SELECT 1, 1 + g % 300, 1, 1, timestamptz '2026-03-01 10:00+00' + g * interval '7 h',"
        " (ARRAY['pending','confirmed','completed','cancelled','no_show'])[1 + g % 5], 1000"
        " FROM generate_series(1, 900) g"
    )
    reports.settle()
    assert_rollups_exact(connection)
    connection.execute("UPDATE bookings SET scheduled_at = scheduled_at + interval '1 day'")
    connection.execute("UPDATE bookings SET client_id = 1 + (client_id * 7) % 300")
    reports.settle()
    assert_rollups_exact(connection)
    connection.execute("DELETE FROM bookings WHERE id % 3 = 0")
    reports.settle()
    assert_rollups_exact(connection)
    period = Period(datetime(2026, 3, 5).date(), datetime(2026, 4, 20).date())
    assert reports.sql(queries.dashboard_metrics, PLATFORM, period) == reports.naive(
        naive_dashboard, PLATFORM, period
    )
    # a TRUNCATE, then new bookings in the same batch: only the new ones count
    with connection.transaction():
        connection.execute("TRUNCATE bookings")
        connection.execute(
            "INSERT INTO bookings (salon_id, client_id, professional_id, service_id,"
            " scheduled_at, status, price_cents)"
            " VALUES (1, 7, 1, 1, '2026-03-02 10:00+00', 'completed', 1000)"
        )
    reports.settle()
    assert_rollups_exact(connection)
    connection.execute("TRUNCATE bookings")
    reports.settle()
    for table in ROLLUPS:
        assert connection.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,), table


def test_upgrading_a_database_with_bookings_fills_the_rollups(
    base_settings: Settings, admin_dsn: str
) -> None:
    """Migrations 0004 and 0005 on a database that already holds bookings leave every derived
    table exact; so does the first consumer's rebuild, and the writes folded after it."""
    name = f"salon_reports_fill_{_worker_suffix()}"
    create_database(admin_dsn, name)
    url = with_database(base_settings.database_url, name)
    try:
        migrate(url, "0003")
        seed_database(url, bookings=3_000, salons=4, days=60, seed=5)
        migrate(url, "0004")
        with psycopg.connect(libpq_url(url)) as connection:
            connection.execute("UPDATE bookings SET status = 'cancelled' WHERE id % 5 = 0")
            connection.commit()
        migrate(url)
        with psycopg.connect(libpq_url(url), autocommit=True) as connection:
            assert connection.execute("SELECT count(*) FROM bookings").fetchone() == (3_000,)
            assert_rollups_exact(connection)
            # No trigger left: the write is folded by the stream (initialised by this wait).
            connection.execute("UPDATE bookings SET scheduled_at = scheduled_at - interval '1 day'")
            settle_stream(libpq_url(url))
            assert_rollups_exact(connection)
    finally:
        drop_database(admin_dsn, name)
