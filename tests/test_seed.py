"""The demo-data generator (``service.tools.seed``) on the real test database.

Small datasets (a few thousand bookings over 400 days) seeded into the clean test database:
counts, determinism, referential integrity, statuses against time, local opening hours in
time zones with and without DST, the skew of returning clients, ``if_empty`` and appending.

Most tests pin ``today`` so that they cannot straddle midnight UTC; one checks the default
(the current UTC date).
"""

from __future__ import annotations

import re
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest

from service.models import Base
from service.tools.seed import DST_TIMEZONES, TIMEZONES, local_day_starts, seed_database

TABLES = ("salons", "users", "professionals", "services", "bookings", "audit_events")
TODAY = date(2026, 3, 25)  # the week after spans the European DST change (29 March)
ANCHOR = datetime(TODAY.year, TODAY.month, TODAY.day, tzinfo=UTC)
BOOKINGS, SALONS, DAYS = 3_000, 5, 400


def seed(database_url: str, seed: int = 7, **overrides: object) -> str:
    arguments: dict[str, object] = {
        "bookings": BOOKINGS,
        "salons": SALONS,
        "days": DAYS,
        "seed": seed,
        "today": TODAY,
    }
    arguments.update(overrides)
    return seed_database(database_url, **arguments)  # type: ignore[arg-type]


def checksums(db: psycopg.Connection) -> dict[str, str]:
    """md5 of every table's rows as text, in id order."""
    result = {}
    for table in TABLES:
        row = db.execute(
            f"SELECT md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t.id), '')) FROM {table} t"
        ).fetchone()
        assert row is not None
        result[table] = row[0]
    return result


def empty(db: psycopg.Connection) -> None:
    db.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")


def scalar(db: psycopg.Connection, query: str, anchor: datetime | None = None) -> Any:
    """The single value of ``query``; ``%(a)s`` in it stands for ``anchor``."""
    row = db.execute(query, {"a": anchor} if anchor else None).fetchone()
    assert row is not None
    return row[0]


CREATED_AT_TABLES = ("salons", "users", "professionals", "bookings", "audit_events")


def nothing_after(db: psycopg.Connection, anchor: datetime) -> dict[str, int]:
    """Rows per table created after ``anchor`` (nothing may happen after "now")."""
    return {
        table: scalar(db, f"SELECT count(*) FROM {table} WHERE created_at > %(a)s", anchor)
        for table in CREATED_AT_TABLES
    }


def schema(db: psycopg.Connection) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """Every index and constraint of the seeded tables, with its definition."""
    indexes = db.execute(
        "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"
        " ORDER BY 1, 2"
    ).fetchall()
    constraints = db.execute(
        "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid), convalidated::text"
        " FROM pg_constraint WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2"
    ).fetchall()
    return indexes, constraints


def test_counts_match_arguments(database_url: str, db: psycopg.Connection) -> None:
    summary = seed(database_url)

    assert "3,000 bookings" in summary
    assert scalar(db, "SELECT count(*) FROM bookings") == BOOKINGS
    assert scalar(db, "SELECT count(*) FROM salons") == SALONS
    per_salon = db.execute(
        "SELECT count(*), count(*) FILTER (WHERE NOT is_active) FROM professionals"
        " GROUP BY salon_id"
    ).fetchall()
    assert len(per_salon) == SALONS
    assert all(3 <= total <= 12 for total, _ in per_salon)
    assert sum(inactive for _, inactive in per_salon) >= 1
    roles: dict[str, int] = dict(
        db.execute("SELECT role, count(*) FROM users GROUP BY role").fetchall()
    )
    assert roles["admin"] == 2
    assert 1 <= roles["owner"] <= SALONS
    assert roles["professional"] == scalar(db, "SELECT count(*) FROM professionals")
    # Every client booked at least once, and there are far fewer clients than bookings.
    assert roles["client"] == scalar(db, "SELECT count(DISTINCT client_id) FROM bookings")
    assert BOOKINGS / 8 < roles["client"] < BOOKINGS / 2
    categories = {r[0] for r in db.execute("SELECT DISTINCT category FROM services")}
    assert "hair" in categories
    assert len(categories) >= 4
    assert scalar(db, "SELECT min(price_cents) FROM services") > 0
    assert scalar(db, "SELECT count(*) FROM audit_events") > BOOKINGS / 20


def test_same_seed_gives_identical_rows(database_url: str, db: psycopg.Connection) -> None:
    seed(database_url, seed=11)
    first = checksums(db)
    empty(db)
    seed(database_url, seed=11)
    assert checksums(db) == first

    empty(db)
    seed(database_url, seed=12)
    other = checksums(db)
    assert all(other[table] != first[table] for table in TABLES)


def test_keys_are_valid_and_schema_is_restored(database_url: str, db: psycopg.Connection) -> None:
    before = schema(db)
    seed(database_url)
    # Indexes and constraints set aside for the load are back: as before, and as the models
    # declare them (the test database is shared, so "before" alone could already be damaged).
    assert schema(db) == before
    indexes, constraints = schema(db)
    index_names = {(table, name) for table, name, _ in indexes}
    for table in Base.metadata.sorted_tables:
        for index in table.indexes:
            assert (table.name, index.name) in index_names
    foreign_keys = {(table, definition) for table, _, definition, _ in constraints}
    for table in Base.metadata.sorted_tables:
        for key in table.foreign_keys:
            referenced = key.column.table.name
            definition = f"FOREIGN KEY ({key.parent.name}) REFERENCES {referenced}(id)"
            assert any(t == table.name and d.startswith(definition) for t, d in foreign_keys), (
                definition
            )
    assert ("users", "users_email_key", "UNIQUE (email)", "true") in constraints
    assert all(validated == "true" for *_, validated in constraints)

    orphans = {
        "booking salon": "SELECT count(*) FROM bookings b LEFT JOIN salons s ON s.id = b.salon_id"
        " WHERE s.id IS NULL",
        "booking client": "SELECT count(*) FROM bookings b LEFT JOIN users u ON u.id = b.client_id"
        " WHERE u.id IS NULL OR u.role <> 'client'",
        # A booking's professional and service belong to the booking's salon.
        "booking professional": "SELECT count(*) FROM bookings b"
        " LEFT JOIN professionals p ON p.id = b.professional_id AND p.salon_id = b.salon_id"
        " WHERE p.id IS NULL",
        "booking service": "SELECT count(*) FROM bookings b"
        " LEFT JOIN services v ON v.id = b.service_id AND v.salon_id = b.salon_id"
        " WHERE v.id IS NULL",
        "professional user": "SELECT count(*) FROM professionals p"
        " LEFT JOIN users u ON u.id = p.user_id AND u.role = 'professional' WHERE u.id IS NULL",
        "audit booking": "SELECT count(*) FROM audit_events a LEFT JOIN bookings b"
        " ON b.id = a.entity_id WHERE a.entity_type = 'booking' AND b.id IS NULL",
        "audit professional": "SELECT count(*) FROM audit_events a LEFT JOIN professionals p"
        " ON p.id = a.entity_id WHERE a.entity_type = 'professional' AND p.id IS NULL",
        "audit service": "SELECT count(*) FROM audit_events a LEFT JOIN services v"
        " ON v.id = a.entity_id WHERE a.entity_type = 'service' AND v.id IS NULL",
        "audit actor": "SELECT count(*) FROM audit_events a LEFT JOIN users u ON u.id = a.actor_id"
        " WHERE u.id IS NULL",
        "audit salon": "SELECT count(*) FROM audit_events a LEFT JOIN salons s"
        " ON s.id = (a.payload->>'salon_id')::bigint WHERE s.id IS NULL",
    }
    assert {name: scalar(db, query) for name, query in orphans.items()} == dict.fromkeys(orphans, 0)
    entity_types = db.execute("SELECT DISTINCT entity_type FROM audit_events").fetchall()
    assert {r[0] for r in entity_types} == {"booking", "professional", "service"}


def test_emails_are_fake_and_kept_out_of_audit_payloads(
    database_url: str, db: psycopg.Connection
) -> None:
    seed(database_url)
    pattern = re.compile(r"(client|owner|pro|admin)[0-9]+@example\.test")
    emails = [r[0] for r in db.execute("SELECT email FROM users").fetchall()]
    assert emails
    assert all(pattern.fullmatch(email) for email in emails)
    assert scalar(db, "SELECT count(*) FROM audit_events WHERE payload::text LIKE '%@%'") == 0
    assert (
        scalar(db, "SELECT count(*) FROM audit_events WHERE jsonb_typeof(payload) <> 'object'") == 0
    )


def test_statuses_follow_time(database_url: str, db: psycopg.Connection) -> None:
    seed(database_url)
    anchor = ANCHOR
    violations = {
        "completed without completed_at >= scheduled_at": "status = 'completed'"
        " AND (completed_at IS NULL OR completed_at < scheduled_at)",
        "completed_at on another status": "status <> 'completed' AND completed_at IS NOT NULL",
        "cancelled without cancelled_at before scheduled_at": "status = 'cancelled'"
        " AND (cancelled_at IS NULL OR cancelled_at >= scheduled_at"
        "      OR cancelled_at < created_at)",
        "cancelled_at on another status": "status <> 'cancelled' AND cancelled_at IS NOT NULL",
        "created after scheduled": "created_at >= scheduled_at",
        "updated before created": "updated_at < created_at",
        "happened after now": "greatest(created_at, updated_at, completed_at, cancelled_at)"
        " > %(a)s",
        "open booking long past": "status IN ('pending', 'confirmed')"
        " AND scheduled_at < %(a)s - interval '1 day'",
        "finished in the future": "status IN ('completed', 'no_show') AND scheduled_at > %(a)s",
        "negative price": "price_cents < 0",
    }
    counts = {
        name: scalar(db, f"SELECT count(*) FROM bookings WHERE {condition}", anchor)
        for name, condition in violations.items()
    }
    assert counts == dict.fromkeys(violations, 0)
    assert nothing_after(db, anchor) == dict.fromkeys(CREATED_AT_TABLES, 0)
    # A client signs up before booking.
    assert (
        scalar(
            db,
            "SELECT count(*) FROM bookings b JOIN users u ON u.id = b.client_id"
            " WHERE b.created_at < u.created_at",
        )
        == 0
    )

    past: dict[str, int] = dict(
        db.execute(
            "SELECT status, count(*) FROM bookings WHERE scheduled_at < %s GROUP BY status",
            (anchor - timedelta(days=1),),
        ).fetchall()
    )
    total = sum(past.values())
    assert past["completed"] / total > 0.8
    assert 0.06 < past["cancelled"] / total < 0.14
    assert 0.01 < past["no_show"] / total < 0.06
    future: dict[str, int] = dict(
        db.execute(
            "SELECT status, count(*) FROM bookings WHERE scheduled_at > %s GROUP BY status",
            (anchor + timedelta(days=1),),
        ).fetchall()
    )
    assert future.get("pending", 0) > 0
    assert future.get("confirmed", 0) > 0
    assert set(future) <= {"pending", "confirmed", "cancelled"}
    # Prices: mostly the service's price, sometimes discounted, never above it.
    discounted, above, same = db.execute(
        "SELECT count(*) FILTER (WHERE b.price_cents < v.price_cents),"
        " count(*) FILTER (WHERE b.price_cents > v.price_cents),"
        " count(*) FILTER (WHERE b.price_cents = v.price_cents)"
        " FROM bookings b JOIN services v ON v.id = b.service_id"
    ).fetchone() or (0, 0, 0)
    assert above == 0
    assert same > 0.8 * BOOKINGS
    assert discounted > 0


def test_period_ends_a_week_after_today(database_url: str, db: psycopg.Connection) -> None:
    before = datetime.now(UTC).date()
    seed_database(database_url, bookings=2_000, salons=3, days=120, seed=3)
    after = datetime.now(UTC).date()
    row = db.execute("SELECT min(scheduled_at), max(scheduled_at) FROM bookings").fetchone()
    assert row is not None
    first, last = row[0].date(), row[1].date()
    # Local dates today - 112 .. today + 7; a UTC date is within a day of the local one, and
    # the first or last day may be one when the few salons are closed.
    assert before - timedelta(days=114) <= first <= after - timedelta(days=105)
    assert before + timedelta(days=4) <= last <= after + timedelta(days=8)
    now = datetime.now(UTC)
    happened_later = scalar(
        db,
        "SELECT count(*) FROM bookings"
        " WHERE greatest(created_at, updated_at, completed_at, cancelled_at) > %(a)s",
        now,
    )
    assert happened_later == 0


@pytest.mark.parametrize("zone", [zone for zone, _ in TIMEZONES])
def test_local_day_starts_give_wall_clock_times_across_dst(zone: str) -> None:
    tz = ZoneInfo(zone)
    first = date(2025, 1, 1)
    starts = local_day_starts(zone, first, 800)
    offsets = set()
    for day, start in enumerate(starts):
        for minute in range(4 * 60, 24 * 60, 37):
            local = datetime.fromtimestamp(start + minute * 60, tz)
            assert local.date() == first + timedelta(days=day)
            assert local.hour * 60 + local.minute == minute, (local, minute)
            offsets.add(local.utcoffset())
    assert (len(offsets) == 2) == (zone in DST_TIMEZONES)


def test_local_opening_hours_and_time_zones(database_url: str, db: psycopg.Connection) -> None:
    seed(database_url)
    zones = [r[0] for r in db.execute("SELECT DISTINCT timezone FROM salons").fetchall()]
    assert len(zones) == SALONS

    def observes_dst(zone: str) -> bool:
        tz = ZoneInfo(zone)
        return (
            datetime(2026, 1, 15, tzinfo=tz).utcoffset()
            != datetime(2026, 7, 15, tzinfo=tz).utcoffset()
        )

    assert any(observes_dst(zone) for zone in zones)
    assert any(not observes_dst(zone) and zone != "UTC" for zone in zones)

    rows = db.execute(
        "SELECT s.timezone, count(*),"
        " count(*) FILTER (WHERE local::time >= '08:00' AND local::time < '20:00'),"
        " min(local::time), max(local::time)"
        " FROM bookings b JOIN salons s ON s.id = b.salon_id,"
        " LATERAL (SELECT b.scheduled_at AT TIME ZONE s.timezone AS local) l"
        " GROUP BY s.timezone"
    ).fetchall()
    for zone, total, in_hours, earliest, latest in rows:
        assert in_hours / total > 0.95, zone
        # Out-of-hours bookings stay within an hour or so of opening hours, DST or not.
        assert earliest.hour >= 7, zone
        assert latest.hour < 21, zone

    # Both sides of the DST changes keep local hours (a fixed offset would shift by an hour).
    for season in ("01", "07"):
        row = db.execute(
            "SELECT count(*), count(*) FILTER (WHERE (b.scheduled_at AT TIME ZONE s.timezone)::time"
            "  BETWEEN '07:00' AND '20:30')"
            " FROM bookings b JOIN salons s ON s.id = b.salon_id"
            " WHERE s.timezone IN ('Europe/Lisbon', 'America/New_York', 'Australia/Sydney')"
            " AND to_char(b.scheduled_at AT TIME ZONE s.timezone, 'MM') = %s",
            (season,),
        ).fetchone()
        assert row is not None
        assert row[0] > 0
        assert row[1] == row[0]

    by_weekday: dict[int, int] = dict(
        db.execute(
            "SELECT extract(isodow FROM b.scheduled_at AT TIME ZONE s.timezone)::int, count(*)"
            " FROM bookings b JOIN salons s ON s.id = b.salon_id GROUP BY 1"
        ).fetchall()
    )
    assert by_weekday.get(7, 0) < by_weekday[6]  # quieter Sundays (many salons closed)
    assert by_weekday[5] > by_weekday.get(1, 0)  # busier Fridays than Mondays


def test_clients_return_with_a_skewed_distribution(
    database_url: str, db: psycopg.Connection
) -> None:
    seed(database_url)
    visits = Counter(
        {
            (salon, client): n
            for salon, client, n in db.execute(
                "SELECT salon_id, client_id, count(*) FROM bookings GROUP BY 1, 2"
            ).fetchall()
        }
    )
    counts = sorted(visits.values(), reverse=True)
    assert counts[0] >= 15  # a regular
    assert sum(1 for n in counts if n == 1) / len(counts) > 0.3  # many one-off clients
    top = counts[: len(counts) // 10]
    assert sum(top) / sum(counts) > 0.3  # a tenth of the clients make a third of the bookings
    multi_salon = scalar(
        db,
        "SELECT count(*) FROM (SELECT client_id FROM bookings GROUP BY 1"
        " HAVING count(DISTINCT salon_id) > 1) c",
    )
    assert multi_salon > 0
    # New and returning clients both exist in a recent month.
    new, returning = db.execute(
        "WITH first AS (SELECT salon_id, client_id, min(scheduled_at) AS first_at"
        "  FROM bookings GROUP BY 1, 2),"
        " recent AS (SELECT DISTINCT salon_id, client_id FROM bookings"
        "  WHERE scheduled_at >= %(a)s - interval '30 days' AND scheduled_at < %(a)s)"
        " SELECT count(*) FILTER (WHERE f.first_at >= %(a)s - interval '30 days'),"
        "  count(*) FILTER (WHERE f.first_at < %(a)s - interval '30 days')"
        " FROM recent r JOIN first f USING (salon_id, client_id)",
        {"a": ANCHOR},
    ).fetchone() or (0, 0)
    assert new > 0
    assert returning > new / 2


def test_if_empty_leaves_existing_data_alone(database_url: str, db: psycopg.Connection) -> None:
    assert "seeded" in seed(database_url, if_empty=True)  # an empty database is seeded
    before = checksums(db)
    summary = seed(database_url, seed=99, bookings=500, if_empty=True)
    assert "nothing seeded" in summary
    assert checksums(db) == before


def test_appending_continues_after_existing_rows(database_url: str, db: psycopg.Connection) -> None:
    seed(database_url, seed=1, bookings=1_000, salons=3)
    first = {
        table: scalar(db, f"SELECT md5(string_agg(t::text, ',' ORDER BY t.id)) FROM {table} t")
        for table in TABLES
    }
    last_ids = {table: scalar(db, f"SELECT max(id) FROM {table}") for table in TABLES}
    indexes_before = schema(db)

    summary = seed(database_url, seed=2, bookings=1_500, salons=2, progress=True)
    assert "1,500 bookings" in summary

    assert scalar(db, "SELECT count(*) FROM bookings") == 2_500
    assert scalar(db, "SELECT count(*) FROM salons") == 5
    assert scalar(db, "SELECT count(*) FROM users WHERE role = 'admin'") == 2
    for table in TABLES:
        # The first dataset is untouched; the new rows come after it, without gaps.
        assert (
            scalar(
                db,
                f"SELECT md5(string_agg(t::text, ',' ORDER BY t.id)) FROM {table} t"
                f" WHERE t.id <= {last_ids[table]}",
            )
            == first[table]
        )
        total, highest = db.execute(f"SELECT count(*), max(id) FROM {table}").fetchone() or (0, 0)
        assert total == highest, table
    new_bookings_elsewhere = scalar(
        db,
        f"SELECT count(*) FROM bookings WHERE id > {last_ids['bookings']}"
        f" AND salon_id <= {last_ids['salons']}",
    )
    assert new_bookings_elsewhere == 0
    assert schema(db) == indexes_before
    # Identity sequences were moved past the explicit ids.
    new_salon = scalar(db, "INSERT INTO salons (name) VALUES ('New') RETURNING id")
    assert new_salon == 6
    new_user = scalar(
        db, "INSERT INTO users (role, email) VALUES ('client', 'new@example.test') RETURNING id"
    )
    assert new_user == 1 + scalar(db, "SELECT max(id) FROM users WHERE email <> 'new@example.test'")


@pytest.mark.parametrize(
    ("bookings", "salons", "days"),
    [(0, 2, 30), (50, 1, 1), (200, 12, 3)],
)
def test_small_and_degenerate_sizes(
    database_url: str, db: psycopg.Connection, bookings: int, salons: int, days: int
) -> None:
    seed_database(database_url, bookings=bookings, salons=salons, days=days, seed=5, today=TODAY)
    assert scalar(db, "SELECT count(*) FROM bookings") == bookings
    assert scalar(db, "SELECT count(*) FROM salons") == salons
    assert (
        scalar(
            db,
            "SELECT count(*) FROM bookings WHERE created_at >= scheduled_at"
            " OR (status = 'completed') <> (completed_at IS NOT NULL)"
            " OR (status = 'cancelled') <> (cancelled_at IS NOT NULL)",
        )
        == 0
    )
    assert nothing_after(db, ANCHOR) == dict.fromkeys(CREATED_AT_TABLES, 0)


def test_rejects_nonsense_sizes(database_url: str) -> None:
    with pytest.raises(ValueError, match="salons"):
        seed_database(database_url, bookings=10, salons=0, days=10, seed=1)
