"""Plain-SQL builders of test data (the same path any other writer of the database takes)."""

from __future__ import annotations

from datetime import datetime

import psycopg


def add_salon(db: psycopg.Connection, name: str = "Salon", timezone: str = "UTC") -> int:
    row = db.execute(
        "INSERT INTO salons (name, timezone) VALUES (%s, %s) RETURNING id", (name, timezone)
    ).fetchone()
    assert row is not None
    return int(row[0])


def add_user(db: psycopg.Connection, email: str, role: str = "client") -> int:
    row = db.execute(
        "INSERT INTO users (role, email) VALUES (%s, %s) RETURNING id", (role, email)
    ).fetchone()
    assert row is not None
    return int(row[0])


def add_professional(
    db: psycopg.Connection, salon_id: int, name: str = "Pro", is_active: bool = True
) -> int:
    row = db.execute(
        "INSERT INTO professionals (salon_id, name, is_active) VALUES (%s, %s, %s) RETURNING id",
        (salon_id, name, is_active),
    ).fetchone()
    assert row is not None
    return int(row[0])


def add_service(
    db: psycopg.Connection,
    salon_id: int,
    name: str = "Cut",
    category: str = "hair",
    price_cents: int = 3000,
    duration_min: int = 45,
) -> int:
    row = db.execute(
        "INSERT INTO services (salon_id, category, name, price_cents, duration_min)"
        " VALUES (%s, %s, %s, %s, %s) RETURNING id",
        (salon_id, category, name, price_cents, duration_min),
    ).fetchone()
    assert row is not None
    return int(row[0])


def add_booking(
    db: psycopg.Connection,
    *,
    salon_id: int,
    client_id: int,
    professional_id: int,
    service_id: int,
    scheduled_at: datetime,
    status: str = "completed",
    price_cents: int = 3000,
) -> int:
    row = db.execute(
        "INSERT INTO bookings (salon_id, client_id, professional_id, service_id, scheduled_at,"
        " status, price_cents, completed_at, cancelled_at)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s,"
        "  CASE WHEN %s = 'completed' THEN %s::timestamptz END,"
        "  CASE WHEN %s = 'cancelled' THEN %s::timestamptz END) RETURNING id",
        (
            salon_id,
            client_id,
            professional_id,
            service_id,
            scheduled_at,
            status,
            price_cents,
            status,
            scheduled_at,
            status,
            scheduled_at,
        ),
    ).fetchone()
    assert row is not None
    return int(row[0])


def small_dataset(db: psycopg.Connection) -> dict[str, int]:
    """Two salons in different time zones with a few bookings in the last 30 days."""
    from datetime import UTC, timedelta

    lisbon = add_salon(db, "Lisboa Hair", "Europe/Lisbon")
    newyork = add_salon(db, "NYC Nails", "America/New_York")
    alice = add_user(db, "alice@example.test")
    bob = add_user(db, "bob@example.test")
    pro_l = add_professional(db, lisbon, "Ana")
    pro_n = add_professional(db, newyork, "Nia")
    cut = add_service(db, lisbon, "Cut", "hair", 3000)
    nails = add_service(db, newyork, "Manicure", "nails", 2500)
    now = datetime.now(UTC).replace(microsecond=0)
    for days_ago, client, status in [
        (2, alice, "completed"),
        (3, bob, "completed"),
        (5, alice, "cancelled"),
        (8, alice, "completed"),
    ]:
        add_booking(
            db,
            salon_id=lisbon,
            client_id=client,
            professional_id=pro_l,
            service_id=cut,
            scheduled_at=now - timedelta(days=days_ago),
            status=status,
            price_cents=3000,
        )
    for days_ago, status in [(1, "completed"), (4, "no_show")]:
        add_booking(
            db,
            salon_id=newyork,
            client_id=bob,
            professional_id=pro_n,
            service_id=nails,
            scheduled_at=now - timedelta(days=days_ago),
            status=status,
            price_cents=2500,
        )
    return {
        "lisbon": lisbon,
        "newyork": newyork,
        "alice": alice,
        "bob": bob,
        "pro_lisbon": pro_l,
        "pro_newyork": pro_n,
        "cut": cut,
        "nails": nails,
    }
