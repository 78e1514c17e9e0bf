"""The naive baseline: every report computed the obvious way with the SQLAlchemy ORM.

It loads the bookings of the period with one plain ``select(Booking)`` and then does what a
straightforward implementation does: a ``session.get`` per booking for its service, a query
per client for "did they book before?", a query per professional for their bookings. All
calendar logic (local dates, weeks, months, hours, DST) is plain Python with ``zoneinfo``;
SQL is only asked for rows, never for a date function or an aggregate.

It is deliberately slow and deliberately obvious: the differential tests
(``tests/reports/test_queries.py``) hold the optimised SQL of ``service/reports/queries.py``
to it, and the benchmark measures the SQL against it. Each function returns the same dict as
its counterpart in ``queries.py`` (dates as ``datetime.date``, rates as ``float``).

    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    with Session(create_engine(database_url)) as session:
        naive_dashboard(session, Scope(salon_id=7, timezone="Europe/Lisbon"), period)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.models import Booking, Professional, Service
from service.reports.params import STATUSES, BookingFilters, Period, Scope

TOP_SERVICES = 5
RATE_QUANTUM = Decimal("0.0001")


def rate(numerator: int, denominator: int) -> float:
    """``numerator / denominator`` rounded half-up to 4 decimals; 0 when the denominator is 0."""
    if denominator == 0:
        return 0.0
    exact = Decimal(numerator) / Decimal(denominator)
    return float(exact.quantize(RATE_QUANTUM, rounding=ROUND_HALF_UP))


def divide_rounded(numerator: int, denominator: int) -> int:
    """``numerator / denominator`` rounded half-up to an integer; 0 when the denominator is 0."""
    if denominator == 0:
        return 0
    return int((Decimal(numerator) / Decimal(denominator)).quantize(Decimal(1), ROUND_HALF_UP))


def local_date(moment: datetime, timezone: str) -> date:
    return moment.astimezone(ZoneInfo(timezone)).date()


def days_of(period: Period) -> Iterator[date]:
    day = period.start
    while day <= period.end:
        yield day
        day += timedelta(days=1)


def week_start(day: date) -> date:
    return day - timedelta(days=day.weekday())


def month_start(day: date) -> date:
    return day.replace(day=1)


def next_month(day: date) -> date:
    return date(day.year + 1, 1, 1) if day.month == 12 else date(day.year, day.month + 1, 1)


def bucket_starts(period: Period, granularity: str) -> list[date]:
    """First day of every day / ISO week / calendar month overlapping the period, ascending."""
    if granularity == "day":
        return list(days_of(period))
    starts: list[date] = []
    if granularity == "week":
        bucket = week_start(period.start)
        while bucket <= period.end:
            starts.append(bucket)
            bucket += timedelta(days=7)
        return starts
    if granularity == "month":
        bucket = month_start(period.start)
        while bucket <= period.end:
            starts.append(bucket)
            bucket = next_month(bucket)
        return starts
    raise ValueError(f"unknown granularity {granularity!r}")


BUCKET_OF: dict[str, Callable[[date], date]] = {
    "day": lambda day: day,
    "week": week_start,
    "month": month_start,
}


def status_counts(bookings: Sequence[Booking]) -> dict[str, int]:
    counts = Counter(booking.status for booking in bookings)
    return {status: counts[status] for status in STATUSES}


def revenue(bookings: Sequence[Booking]) -> int:
    return sum(booking.price_cents for booking in bookings if booking.status == "completed")


def bookings_between(
    session: Session, scope: Scope, lower: datetime, upper: datetime
) -> list[Booking]:
    """The bookings of the scope scheduled in ``[lower, upper)``."""
    query = select(Booking).where(Booking.scheduled_at >= lower, Booking.scheduled_at < upper)
    if scope.salon_id is not None:
        query = query.where(Booking.salon_id == scope.salon_id)
    return list(session.scalars(query.order_by(Booking.id)))


def bookings_in(session: Session, scope: Scope, period: Period) -> list[Booking]:
    lower, upper = period.bounds(scope.timezone)
    return bookings_between(session, scope, lower, upper)


def booked_before(session: Session, scope: Scope, client_id: int, moment: datetime) -> bool:
    """Whether the client has any booking (any status) in scope scheduled before ``moment``."""
    query = select(Booking).where(Booking.client_id == client_id, Booking.scheduled_at < moment)
    if scope.salon_id is not None:
        query = query.where(Booking.salon_id == scope.salon_id)
    return session.scalars(query.limit(1)).first() is not None


def booked_with_before(
    session: Session, professional_id: int, client_id: int, moment: datetime
) -> bool:
    """Whether the client had any booking with the professional scheduled before ``moment``."""
    query = select(Booking).where(
        Booking.professional_id == professional_id,
        Booking.client_id == client_id,
        Booking.scheduled_at < moment,
    )
    return session.scalars(query.limit(1)).first() is not None


def service_of(session: Session, booking: Booking) -> Service:
    service = session.get(Service, booking.service_id)
    if service is None:  # pragma: no cover - the foreign key forbids it
        raise LookupError(f"booking {booking.id} has no service {booking.service_id}")
    return service


def naive_dashboard(session: Session, scope: Scope, period: Period) -> dict[str, Any]:
    """The dashboard report (every field but ``meta``)."""
    lower, _ = period.bounds(scope.timezone)
    bookings = bookings_in(session, scope, period)
    by_status = status_counts(bookings)
    total = len(bookings)
    revenue_cents = revenue(bookings)

    clients = sorted({booking.client_id for booking in bookings})
    new_clients = sum(
        1 for client_id in clients if not booked_before(session, scope, client_id, lower)
    )

    per_service: dict[int, dict[str, Any]] = {}
    for booking in bookings:
        service = service_of(session, booking)
        entry = per_service.setdefault(
            service.id,
            {"service_id": service.id, "name": service.name, "bookings": 0, "revenue_cents": 0},
        )
        entry["bookings"] += 1
        if booking.status == "completed":
            entry["revenue_cents"] += booking.price_cents
    top_services = sorted(
        per_service.values(),
        key=lambda entry: (-entry["bookings"], -entry["revenue_cents"], entry["service_id"]),
    )[:TOP_SERVICES]

    daily = []
    for day in days_of(period):
        that_day = [b for b in bookings if local_date(b.scheduled_at, scope.timezone) == day]
        daily.append(
            {
                "date": day,
                "bookings": len(that_day),
                "completed": sum(1 for b in that_day if b.status == "completed"),
                "revenue_cents": revenue(that_day),
            }
        )

    return {
        "bookings_total": total,
        "by_status": by_status,
        "completion_rate": rate(by_status["completed"], total),
        "cancellation_rate": rate(by_status["cancelled"], total),
        "no_show_rate": rate(by_status["no_show"], total),
        "revenue_cents": revenue_cents,
        "average_ticket_cents": divide_rounded(revenue_cents, by_status["completed"]),
        "unique_clients": len(clients),
        "new_clients": new_clients,
        "returning_clients": len(clients) - new_clients,
        "top_services": top_services,
        "daily": daily,
    }


def matches(booking: Booking, filters: BookingFilters) -> bool:
    return (
        (filters.professional_id is None or booking.professional_id == filters.professional_id)
        and (filters.service_id is None or booking.service_id == filters.service_id)
        and (filters.status is None or booking.status == filters.status)
    )


def naive_bookings(
    session: Session,
    scope: Scope,
    period: Period,
    granularity: str,
    filters: BookingFilters,
) -> dict[str, Any]:
    """The bookings report (every field but ``meta``)."""
    zone = ZoneInfo(scope.timezone)
    bookings = [b for b in bookings_in(session, scope, period) if matches(b, filters)]
    bucket_of = BUCKET_OF[granularity]

    series = []
    for start in bucket_starts(period, granularity):
        inside = [
            b for b in bookings if bucket_of(local_date(b.scheduled_at, scope.timezone)) == start
        ]
        series.append(
            {
                "bucket_start": start,
                "bookings": len(inside),
                "completed": sum(1 for b in inside if b.status == "completed"),
                "cancelled": sum(1 for b in inside if b.status == "cancelled"),
                "no_show": sum(1 for b in inside if b.status == "no_show"),
                "revenue_cents": revenue(inside),
            }
        )

    per_category: dict[str, dict[str, Any]] = {}
    for booking in bookings:
        category = service_of(session, booking).category
        entry = per_category.setdefault(
            category, {"category": category, "bookings": 0, "revenue_cents": 0}
        )
        entry["bookings"] += 1
        if booking.status == "completed":
            entry["revenue_cents"] += booking.price_cents
    by_category = sorted(
        per_category.values(), key=lambda entry: (-entry["bookings"], entry["category"])
    )

    hours = Counter(booking.scheduled_at.astimezone(zone).hour for booking in bookings)
    by_hour = [{"hour": hour, "bookings": hours[hour]} for hour in range(24)]

    return {
        "granularity": granularity,
        "series": series,
        "by_category": by_category,
        "by_hour": by_hour,
    }


def naive_professionals(session: Session, scope: Scope, period: Period) -> list[dict[str, Any]]:
    """Every item of the professionals report (no pagination), ordered by professional id."""
    lower, upper = period.bounds(scope.timezone)
    query = select(Professional)
    if scope.salon_id is not None:
        query = query.where(Professional.salon_id == scope.salon_id)
    professionals = list(session.scalars(query.order_by(Professional.id)))

    items: list[dict[str, Any]] = []
    for professional in professionals:
        bookings = list(
            session.scalars(
                select(Booking)
                .where(
                    Booking.professional_id == professional.id,
                    Booking.scheduled_at >= lower,
                    Booking.scheduled_at < upper,
                )
                .order_by(Booking.id)
            )
        )
        if not professional.is_active and not bookings:
            continue
        clients = sorted({booking.client_id for booking in bookings})
        returning = sum(
            1
            for client_id in clients
            if booked_with_before(session, professional.id, client_id, lower)
        )
        completed_per_client = Counter(b.client_id for b in bookings if b.status == "completed")
        by_status = status_counts(bookings)
        items.append(
            {
                "professional_id": professional.id,
                "name": professional.name,
                "bookings": len(bookings),
                "completed": by_status["completed"],
                "cancelled": by_status["cancelled"],
                "no_show": by_status["no_show"],
                "revenue_cents": revenue(bookings),
                "unique_clients": len(clients),
                "returning_clients": returning,
                "client_retention_rate": rate(
                    sum(1 for count in completed_per_client.values() if count >= 2),
                    len(completed_per_client),
                ),
            }
        )

    # RANK(): one more than the number of items with strictly more revenue; ties share a rank.
    for item in items:
        item["revenue_rank"] = 1 + sum(
            1 for other in items if other["revenue_cents"] > item["revenue_cents"]
        )
    return items


def naive_realtime(session: Session, scope: Scope, today: date) -> dict[str, Any]:
    """Today's (local) bookings by status, and the revenue of those completed."""
    bookings = bookings_in(session, scope, Period(start=today, end=today))
    return {
        "bookings_total": len(bookings),
        "by_status": status_counts(bookings),
        "revenue_cents": revenue(bookings),
    }
