"""The first-booking tables stay exact through inserts, updates and deletes by any writer."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

import psycopg
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from benchmarks.naive import naive_dashboard, naive_professionals
from service.reports.params import Period, Scope
from tests.conftest import Api
from tests.factories import add_booking, add_professional, add_salon, add_service, add_user

START, END = date(2026, 3, 1), date(2026, 3, 31)


def _at(day: date, hour: int = 12) -> datetime:
    return datetime(day.year, day.month, day.day, hour, tzinfo=UTC)


async def _compare(api: Api, database_url: str, salon: int) -> dict[str, Any]:
    engine = create_engine(database_url)
    try:
        with Session(engine) as session:
            expected = {}
            for scope in (Scope(salon, "UTC"), Scope(None, "UTC")):
                dashboard = naive_dashboard(session, scope, Period(START, END))
                pros = naive_professionals(session, scope, Period(START, END))
                expected[scope.salon_id] = (dashboard, pros)
    finally:
        engine.dispose()
    await api.resources.listener.settle()  # type: ignore[union-attr]
    got = {}
    for salon_id in (salon, None):
        params: dict[str, Any] = {"start": START.isoformat(), "end": END.isoformat()}
        if salon_id is not None:
            params["salon_id"] = salon_id
        dashboard = (await api.report("dashboard", **params)).json()
        pros = (await api.report("professionals", **params)).json()["items"]
        got[salon_id] = (dashboard, pros)
    for salon_id, (dashboard, pros) in expected.items():
        body, items = got[salon_id]
        for field in ("unique_clients", "new_clients", "returning_clients"):
            assert body[field] == dashboard[field], (salon_id, field)
        assert [
            (i["professional_id"], i["returning_clients"], i["unique_clients"]) for i in items
        ] == [(p["professional_id"], p["returning_clients"], p["unique_clients"]) for p in pros]
    return got[salon][0]


async def test_new_and_returning_follow_every_kind_of_write(
    api: Api, db: psycopg.Connection, database_url: str
) -> None:
    salon = add_salon(db, "S", "UTC")
    other = add_salon(db, "T", "UTC")
    ana = add_professional(db, salon, "Ana")
    bea = add_professional(db, salon, "Bea")
    tia = add_professional(db, other, "Tia")
    cut = add_service(db, salon)
    trim = add_service(db, other)
    alice, bob = add_user(db, "a@example.test"), add_user(db, "b@example.test")

    def book(client: int, pro: int, when: datetime, at: int = salon, service: int = cut) -> int:
        return add_booking(
            db,
            salon_id=at,
            client_id=client,
            professional_id=pro,
            service_id=service,
            scheduled_at=when,
        )

    early = book(alice, ana, _at(date(2026, 2, 10)))
    book(alice, ana, _at(date(2026, 3, 5)))
    book(bob, bea, _at(date(2026, 3, 6)))
    body = await _compare(api, database_url, salon)
    assert (body["new_clients"], body["returning_clients"]) == (1, 1)

    # moving alice's first booking into the period makes her new
    db.execute(
        "UPDATE bookings SET scheduled_at = %s WHERE id = %s", (_at(date(2026, 3, 2)), early)
    )
    body = await _compare(api, database_url, salon)
    assert (body["new_clients"], body["returning_clients"]) == (2, 0)

    # bob booked elsewhere before: new at this salon, returning platform-wide
    before_elsewhere = book(bob, tia, _at(date(2026, 1, 3)), at=other, service=trim)
    body = await _compare(api, database_url, salon)
    assert body["new_clients"] == 2

    # deleting it makes him new everywhere again; moving a booking to another client too
    db.execute("DELETE FROM bookings WHERE id = %s", (before_elsewhere,))
    db.execute("UPDATE bookings SET client_id = %s WHERE id = %s", (bob, early))
    await _compare(api, database_url, salon)
    db.execute("DELETE FROM bookings WHERE salon_id = %s", (salon,))
    body = await _compare(api, database_url, salon)
    assert body["unique_clients"] == 0
    assert db.execute("SELECT count(*) FROM salon_client_first_bookings").fetchone() == (0,)
