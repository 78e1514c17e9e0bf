"""The optimised report SQL against the naive ORM baseline, and both against hand-made numbers.

Differential tests: on hypothesis-generated datasets (``strategies.py``) every report of
``service.reports.queries`` must equal its counterpart in ``benchmarks.naive`` exactly —
including the types (dates as ``date``, rates as ``float``). The explicit examples pin the
corners the definitions of docs/api.md turn on: period edges in local time, DST changes, empty
periods, platform scope, ties.

Hand-checked tests: figures worked out by hand on tiny datasets, asserted on both
implementations, so that a mistake shared by the two cannot pass unnoticed.

Each example empties the test database itself (``strategies.load``) instead of using the
function-scoped ``clean_db`` fixture, which hypothesis would not re-run per example.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from benchmarks.naive import (
    naive_bookings,
    naive_dashboard,
    naive_professionals,
    naive_realtime,
)
from service.reports import queries
from service.reports.params import BookingFilters, Period, Scope
from tests.reports.harness import Reports
from tests.reports.strategies import (
    Case,
    Dataset,
    DatasetBuilder,
    booking_filters,
    cases,
)

GRANULARITIES = ("day", "week", "month")
PAGE_LIMITS = (2, 3)
EXAMPLES = settings(max_examples=60, deadline=None)


# --- The datasets of the explicit examples ---------------------------------------------------


def edges_dataset() -> Dataset:
    """Period edges and DST changes in four zones, a platform-wide mix and ties.

    Salon 1 is in Lisbon (DST 2026-03-29 and 2026-10-25), salon 2 in New York (2026-03-08,
    2026-11-01), salon 3 in UTC, salon 4 in Sydney (2026-04-05). Client 1 books everywhere,
    a lot.
    """
    b = DatasetBuilder()
    lisbon, new_york, utc = b.salon("Europe/Lisbon"), b.salon("America/New_York"), b.salon("UTC")
    ana, bea = b.professional(lisbon), b.professional(lisbon)
    b.professional(lisbon, is_active=False)  # inactive, never booked: never listed
    ines = b.professional(lisbon, is_active=False)  # inactive but booked: listed
    carl = b.professional(new_york)
    dan = b.professional(utc)
    cut = b.service(lisbon, "hair", 3000)
    nails = b.service(lisbon, "nails", 1500)
    spa = b.service(lisbon, "spa", 3000)
    color = b.service(new_york, "hair", 2500)
    wash = b.service(utc, "hair", 1000)
    c1, c2, c3, c4 = b.client(), b.client(), b.client(), b.client()

    # Lisbon, March 2026: before the period, the DST night, the last evening and the morning after.
    b.booking(client=c2, professional=ana, service=cut, local=datetime(2026, 2, 27, 10))
    b.booking(client=c1, professional=ana, service=cut, local=datetime(2026, 3, 1, 0, 0))
    b.booking(client=c1, professional=bea, service=nails, local=datetime(2026, 3, 29, 1, 30))
    b.booking(client=c1, professional=bea, service=nails, local=datetime(2026, 3, 29, 2, 30))
    b.booking(client=c2, professional=ana, service=spa, local=datetime(2026, 3, 31, 23, 30))
    b.booking(
        client=c3, professional=ines, service=cut, local=datetime(2026, 3, 31, 23, 59, 59, 999999)
    )
    b.booking(client=c4, professional=ana, service=cut, local=datetime(2026, 4, 1, 0, 0))
    # A cancelled-only day (2026-03-15) and a client with many bookings.
    for status in ("cancelled", "cancelled", "cancelled"):
        b.booking(
            client=c3, professional=bea, service=spa, local=datetime(2026, 3, 15, 11), status=status
        )
    for day in range(2, 28, 3):
        b.booking(
            client=c1,
            professional=ana,
            service=nails,
            local=datetime(2026, 3, day, 18),
            status=("completed", "no_show", "pending", "confirmed")[day % 4],
        )
    # bea and ines end March level on revenue (6000 each): a shared revenue rank.
    b.booking(client=c4, professional=bea, service=spa, local=datetime(2026, 3, 20, 9))
    b.booking(client=c4, professional=ines, service=cut, local=datetime(2026, 3, 20, 10))
    # Lisbon's autumn change, twice 01:30 on 2026-10-25.
    b.booking(client=c2, professional=ana, service=cut, local=datetime(2026, 10, 25, 1, 30, fold=0))
    b.booking(client=c2, professional=ana, service=cut, local=datetime(2026, 10, 25, 1, 30, fold=1))
    b.booking(client=c3, professional=bea, service=nails, local=datetime(2026, 10, 31, 23, 30))

    # New York: spring forward 2026-03-08 (02:30 does not exist), fall back 2026-11-01.
    b.booking(client=c1, professional=carl, service=color, local=datetime(2026, 3, 7, 23, 30))
    b.booking(client=c1, professional=carl, service=color, local=datetime(2026, 3, 8, 2, 30))
    b.booking(client=c2, professional=carl, service=color, local=datetime(2026, 3, 8, 3, 0))
    b.booking(
        client=c2, professional=carl, service=color, local=datetime(2026, 11, 1, 1, 30, fold=1)
    )
    b.booking(client=c4, professional=carl, service=color, local=datetime(2026, 10, 31, 23, 30))

    # UTC: a client new here who is not new to the platform.
    b.booking(client=c2, professional=dan, service=wash, local=datetime(2026, 3, 31, 23, 30))
    b.booking(
        client=c1,
        professional=dan,
        service=wash,
        local=datetime(2026, 3, 1, 0, 0),
        status="no_show",
    )

    # Sydney (DST ends 2026-04-05): ties everywhere. Top services: t2 and t1 tie on bookings,
    # t2 earns more; t3, t4 and t6 tie on bookings and revenue, the limit of 5 cuts t6.
    # Categories hair and nails tie on bookings. Professionals syd1 and syd2 tie on revenue.
    sydney = b.salon("Australia/Sydney")
    syd1, syd2 = b.professional(sydney), b.professional(sydney)
    t1 = b.service(sydney, "nails", 500)
    t2 = b.service(sydney, "hair", 1500)
    t3, t4 = b.service(sydney, "spa", 100), b.service(sydney, "spa", 100)
    t5 = b.service(sydney, "hair", 2000)
    t6 = b.service(sydney, "nails", 100)
    for day, pro, service in (
        (3, syd2, t1),
        (4, syd2, t1),
        (5, syd1, t2),
        (6, syd1, t2),
        (7, syd2, t5),
    ):
        b.booking(client=c3, professional=pro, service=service, local=datetime(2026, 3, day, 12))
    for service in (t3, t4, t6):  # a cancelled-only day
        b.booking(
            client=c4,
            professional=syd1,
            service=service,
            local=datetime(2026, 3, 10, 12),
            status="cancelled",
        )
    b.booking(client=c1, professional=syd1, service=t2, local=datetime(2026, 4, 5, 2, 30, fold=1))
    b.booking(client=c1, professional=syd2, service=t5, local=datetime(2026, 4, 30, 23, 30))
    b.booking(client=c2, professional=syd2, service=t5, local=datetime(2026, 5, 1, 0, 0))
    return b.build()


EDGES = edges_dataset()
MARCH = Period(date(2026, 3, 1), date(2026, 3, 31))
AUTUMN = Period(date(2026, 10, 19), date(2026, 11, 3))
EXAMPLE_CASES = (
    Case(EDGES, 1, MARCH),  # Lisbon, DST inside, 23:30 on the last day, 00:00 after it
    Case(EDGES, 2, MARCH),  # New York, spring forward
    Case(EDGES, 1, AUTUMN),  # Lisbon, fall back
    Case(EDGES, 2, AUTUMN),  # New York, fall back
    Case(EDGES, None, MARCH),  # platform-wide, UTC calendar
    Case(EDGES, 4, MARCH),  # Sydney: ties in top services, categories and revenue rank
    Case(EDGES, 4, Period(date(2026, 4, 1), date(2026, 4, 30))),  # Sydney, DST ends
    Case(EDGES, None, Period(date(2026, 2, 1), date(2026, 12, 31))),  # platform, most of a year
    # platform, March and April minus a day at either end (rollup_ranges subtracts those days:
    # Lisbon's 1 March 00:00 and Sydney's 30 April bookings are in them)
    Case(EDGES, None, Period(date(2026, 3, 2), date(2026, 4, 29))),
    Case(EDGES, 3, Period(date(2026, 6, 1), date(2026, 6, 30))),  # empty period
    Case(Dataset(), None, Period(date(2026, 1, 1), date(2026, 1, 1))),  # empty database
)


def with_examples(
    make: Callable[[int, Case], dict[str, Any]],
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorate a ``@given`` test with one ``@example`` per case of ``EXAMPLE_CASES``."""

    def decorate(test: Callable[..., None]) -> Callable[..., None]:
        for index, case in reversed(list(enumerate(EXAMPLE_CASES))):
            test = example(**make(index, case))(test)
        return test

    return decorate


# --- Differential tests --------------------------------------------------------------------


@EXAMPLES
@given(case=cases())
@with_examples(lambda _, case: {"case": case})
def test_dashboard_matches_naive(reports: Reports, case: Case) -> None:
    reports.load(case.dataset)
    expected = reports.naive(naive_dashboard, case.scope, case.period)
    actual = reports.sql(queries.dashboard_metrics, case.scope, case.period)
    assert actual == expected


@st.composite
def filtered_cases(draw: st.DrawFn) -> tuple[Case, BookingFilters]:
    case = draw(cases())
    return case, draw(booking_filters(case.dataset))


FILTER_EXAMPLES = (
    BookingFilters(),
    BookingFilters(status="cancelled"),
    BookingFilters(professional_id=1, status="completed"),
    BookingFilters(service_id=3),
)


@EXAMPLES
@given(case_and_filters=filtered_cases())
@with_examples(
    lambda index, case: {"case_and_filters": (case, FILTER_EXAMPLES[index % len(FILTER_EXAMPLES)])}
)
def test_bookings_match_naive(
    reports: Reports, case_and_filters: tuple[Case, BookingFilters]
) -> None:
    case, filters = case_and_filters
    reports.load(case.dataset)
    for granularity in GRANULARITIES:
        for chosen in dict.fromkeys((filters, BookingFilters())):
            expected = reports.naive(naive_bookings, case.scope, case.period, granularity, chosen)
            actual = reports.sql(
                queries.booking_metrics, case.scope, case.period, granularity, chosen
            )
            assert actual == expected, (granularity, chosen)


@EXAMPLES
@given(case=cases())
@with_examples(lambda _, case: {"case": case})
def test_professionals_match_naive(reports: Reports, case: Case) -> None:
    reports.load(case.dataset)
    expected = reports.naive(naive_professionals, case.scope, case.period)
    for limit in PAGE_LIMITS:
        assert reports.sql_professionals(case.scope, case.period, limit) == expected, limit


@EXAMPLES
@given(case=cases())
@with_examples(lambda _, case: {"case": case})
def test_realtime_matches_naive(reports: Reports, case: Case) -> None:
    reports.load(case.dataset)
    zone = ZoneInfo(case.scope.timezone)
    booked_days = {b.scheduled_at.astimezone(zone).date() for b in case.dataset.bookings}
    edges = {case.period.start - timedelta(days=1), case.period.start, case.period.end}
    for today in sorted(booked_days | edges):
        expected = reports.naive(naive_realtime, case.scope, today)
        assert reports.sql(queries.realtime_metrics, case.scope, today) == expected, today


# --- Hand-checked figures -----------------------------------------------------------------

IMPLEMENTATIONS = ("naive", "sql")


def dashboard(reports: Reports, implementation: str, scope: Scope, period: Period) -> Any:
    if implementation == "naive":
        return reports.naive(naive_dashboard, scope, period)
    return reports.sql(queries.dashboard_metrics, scope, period)


def bookings(
    reports: Reports,
    implementation: str,
    scope: Scope,
    period: Period,
    granularity: str,
    filters: BookingFilters | None = None,
) -> Any:
    chosen = filters or BookingFilters()
    if implementation == "naive":
        return reports.naive(naive_bookings, scope, period, granularity, chosen)
    return reports.sql(queries.booking_metrics, scope, period, granularity, chosen)


def professionals(reports: Reports, implementation: str, scope: Scope, period: Period) -> Any:
    if implementation == "naive":
        return reports.naive(naive_professionals, scope, period)
    return reports.sql_professionals(scope, period, limit=2)


def realtime(reports: Reports, implementation: str, scope: Scope, today: date) -> Any:
    if implementation == "naive":
        return reports.naive(naive_realtime, scope, today)
    return reports.sql(queries.realtime_metrics, scope, today)


LISBON = Scope(salon_id=1, timezone="Europe/Lisbon")
DST_WEEKEND = Period(date(2026, 3, 28), date(2026, 3, 29))  # Lisbon springs forward on the 29th


def lisbon_weekend() -> Dataset:
    """Two days in Lisbon around the spring-forward night; every figure below is by hand."""
    b = DatasetBuilder()
    salon = b.salon("Europe/Lisbon")
    other = b.salon("UTC")
    pro = b.professional(salon)
    cut = b.service(salon, "hair", 3000)
    nails = b.service(salon, "nails", 1000)
    away = b.service(other, "hair", 500)
    away_pro = b.professional(other)
    old, fresh, late, elsewhere = b.client(), b.client(), b.client(), b.client()
    # Before the period: makes ``old`` a returning client.
    b.booking(
        client=old,
        professional=pro,
        service=cut,
        local=datetime(2026, 3, 27, 23, 59),
        status="cancelled",
    )
    # In the period (Saturday 28th, Sunday 29th up to 23:30).
    b.booking(
        client=old,
        professional=pro,
        service=cut,
        local=datetime(2026, 3, 28, 0, 0),
        price_cents=1001,
    )
    b.booking(
        client=old,
        professional=pro,
        service=nails,
        local=datetime(2026, 3, 28, 9),
        status="no_show",
    )
    b.booking(
        client=fresh,
        professional=pro,
        service=nails,
        local=datetime(2026, 3, 29, 3, 0),
        price_cents=1000,
    )
    b.booking(
        client=fresh,
        professional=pro,
        service=cut,
        local=datetime(2026, 3, 29, 23, 30),
        status="cancelled",
    )
    # After the period: Monday 00:00 Lisbon is 2026-03-29 23:00 UTC, still excluded.
    b.booking(client=late, professional=pro, service=cut, local=datetime(2026, 3, 30, 0, 0))
    # Another salon: ``elsewhere`` booked there before, so is not new platform-wide.
    b.booking(client=elsewhere, professional=away_pro, service=away, local=datetime(2026, 3, 1, 12))
    b.booking(
        client=elsewhere,
        professional=pro,
        service=cut,
        local=datetime(2026, 3, 29, 12),
        status="pending",
    )
    return b.build()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_dashboard_by_hand(reports: Reports, implementation: str) -> None:
    reports.load(lisbon_weekend())
    report = dashboard(reports, implementation, LISBON, DST_WEEKEND)
    assert report == {
        "bookings_total": 5,
        "by_status": {"pending": 1, "confirmed": 0, "completed": 2, "cancelled": 1, "no_show": 1},
        "completion_rate": 0.4,
        "cancellation_rate": 0.2,
        "no_show_rate": 0.2,
        "revenue_cents": 2001,
        "average_ticket_cents": 1001,  # 1000.5 rounded half up, not to even
        "unique_clients": 3,
        "new_clients": 2,  # fresh and elsewhere: first booking at this salon
        "returning_clients": 1,  # old, whose cancelled booking on the 27th still counts
        "top_services": [
            {"service_id": 1, "name": "Service 1", "bookings": 3, "revenue_cents": 1001},
            {"service_id": 2, "name": "Service 2", "bookings": 2, "revenue_cents": 1000},
        ],
        "daily": [
            {"date": date(2026, 3, 28), "bookings": 2, "completed": 1, "revenue_cents": 1001},
            {"date": date(2026, 3, 29), "bookings": 3, "completed": 1, "revenue_cents": 1000},
        ],
    }


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_platform_new_clients_by_hand(reports: Reports, implementation: str) -> None:
    reports.load(lisbon_weekend())
    # UTC calendar, [28th 00:00 UTC, 30th 00:00 UTC). Lisbon is UTC+0 until 29th 01:00 UTC and
    # UTC+1 after, so the weekend's five Lisbon bookings are inside, and so is Monday 00:00
    # Lisbon (29th 23:00 UTC); the cancelled 27th 23:59 and salon 2's 1st are not.
    report = dashboard(reports, implementation, Scope(salon_id=None), DST_WEEKEND)
    assert report["bookings_total"] == 6
    assert report["unique_clients"] == 4
    # fresh and late are new; old booked on the 27th, elsewhere on the 1st (at another salon).
    assert (report["new_clients"], report["returning_clients"]) == (2, 2)
    assert [point["bookings"] for point in report["daily"]] == [2, 4]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_bookings_by_hand(reports: Reports, implementation: str) -> None:
    reports.load(lisbon_weekend())
    weekly = bookings(reports, implementation, LISBON, DST_WEEKEND, "week")
    # Saturday 28th and Sunday 29th are both in the ISO week of Monday 23rd; so is the 27th,
    # which is before the period and not counted.
    assert weekly["series"] == [
        {
            "bucket_start": date(2026, 3, 23),
            "bookings": 5,
            "completed": 2,
            "cancelled": 1,
            "no_show": 1,
            "revenue_cents": 2001,
        },
    ]
    assert weekly["by_category"] == [
        {"category": "hair", "bookings": 3, "revenue_cents": 1001},
        {"category": "nails", "bookings": 2, "revenue_cents": 1000},
    ]
    hours = {point["hour"]: point["bookings"] for point in weekly["by_hour"] if point["bookings"]}
    # 03:00 on the 29th is local summer time (02:00 UTC); it must land in hour 3.
    assert hours == {0: 1, 9: 1, 3: 1, 12: 1, 23: 1}
    assert [point["hour"] for point in weekly["by_hour"]] == list(range(24))

    monthly = bookings(
        reports,
        implementation,
        LISBON,
        DST_WEEKEND,
        "month",
        BookingFilters(professional_id=1, status="cancelled"),
    )
    assert [(p["bucket_start"], p["bookings"]) for p in monthly["series"]] == [
        (date(2026, 3, 1), 1)
    ]
    assert monthly["by_category"] == [{"category": "hair", "bookings": 1, "revenue_cents": 0}]


def retention_dataset() -> Dataset:
    """One salon, four professionals; retention, returning clients and revenue-rank ties."""
    b = DatasetBuilder()
    salon = b.salon("America/New_York")
    kim, lee = b.professional(salon), b.professional(salon)
    max_ = b.professional(salon, is_active=False)  # booked in the period: listed
    b.professional(salon, is_active=False)  # not booked: not listed
    cut = b.service(salon, "hair", 2000)
    x, y, z = b.client(), b.client(), b.client()
    # kim: x completes twice (retained), y once plus a cancellation (not retained) -> 1/2.
    b.booking(client=x, professional=kim, service=cut, local=datetime(2026, 11, 2, 10))
    b.booking(client=x, professional=kim, service=cut, local=datetime(2026, 11, 5, 10))
    b.booking(client=y, professional=kim, service=cut, local=datetime(2026, 11, 3, 10))
    b.booking(
        client=y, professional=kim, service=cut, local=datetime(2026, 11, 4, 10), status="cancelled"
    )
    # y saw kim before the period (a no-show still counts as a booking): y is returning for kim.
    b.booking(
        client=y,
        professional=kim,
        service=cut,
        local=datetime(2026, 10, 31, 23, 59),
        status="no_show",
    )
    # z saw lee before the period, but only kim in it: not returning for kim.
    b.booking(client=z, professional=lee, service=cut, local=datetime(2026, 10, 1, 10))
    b.booking(
        client=z, professional=kim, service=cut, local=datetime(2026, 11, 6, 10), status="no_show"
    )
    # lee earns 6000 like kim: a tie for rank 1. max_ (inactive) has one booking: listed.
    b.booking(
        client=z, professional=lee, service=cut, local=datetime(2026, 11, 2, 10), price_cents=6000
    )
    b.booking(
        client=x, professional=max_, service=cut, local=datetime(2026, 11, 2, 10), status="pending"
    )
    return b.build()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_professionals_by_hand(reports: Reports, implementation: str) -> None:
    reports.load(retention_dataset())
    scope = Scope(salon_id=1, timezone="America/New_York")
    period = Period(date(2026, 11, 1), date(2026, 11, 7))
    items = professionals(reports, implementation, scope, period)
    assert items == [
        {
            "professional_id": 1,
            "name": "Pro 1",
            "bookings": 5,
            "completed": 3,
            "cancelled": 1,
            "no_show": 1,
            "revenue_cents": 6000,
            "unique_clients": 3,
            "returning_clients": 1,
            "client_retention_rate": 0.5,
            "revenue_rank": 1,
        },
        {
            "professional_id": 2,
            "name": "Pro 2",
            "bookings": 1,
            "completed": 1,
            "cancelled": 0,
            "no_show": 0,
            "revenue_cents": 6000,
            "unique_clients": 1,
            "returning_clients": 1,
            "client_retention_rate": 0.0,
            "revenue_rank": 1,
        },
        {
            "professional_id": 3,
            "name": "Pro 3",
            "bookings": 1,
            "completed": 0,
            "cancelled": 0,
            "no_show": 0,
            "revenue_cents": 0,
            "unique_clients": 1,
            "returning_clients": 0,
            "client_retention_rate": 0.0,
            "revenue_rank": 3,
        },
    ]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_rates_round_half_up_by_hand(reports: Reports, implementation: str) -> None:
    b = DatasetBuilder()
    salon = b.salon()
    pro = b.professional(salon)
    cut = b.service(salon, price_cents=1)
    client = b.client()
    # 2 completed of 3 bookings: 0.66666… -> 0.6667; 1 of 3 -> 0.3333. Revenue 1 + 2 over 2
    # completed: 1.5 -> 2 (half up, where rounding to even would give 2 as well, so see below).
    day = datetime(2026, 5, 4, 12)
    b.booking(client=client, professional=pro, service=cut, local=day, price_cents=1)
    b.booking(client=client, professional=pro, service=cut, local=day, price_cents=2)
    b.booking(client=client, professional=pro, service=cut, local=day, status="no_show")
    reports.load(b.build())
    report = dashboard(reports, implementation, Scope(salon_id=1), Period(day.date(), day.date()))
    assert (report["completion_rate"], report["no_show_rate"]) == (0.6667, 0.3333)
    assert report["average_ticket_cents"] == 2
    # Exactly halfway at the fifth decimal: 1/32 = 0.03125 -> 0.0313 (half up, not to even).
    for _ in range(29):
        b.booking(client=client, professional=pro, service=cut, local=day, status="pending")
    reports.load(b.build())
    report = dashboard(reports, implementation, Scope(salon_id=1), Period(day.date(), day.date()))
    assert report["bookings_total"] == 32
    assert report["no_show_rate"] == 0.0313


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_realtime_by_hand(reports: Reports, implementation: str) -> None:
    b = DatasetBuilder()
    sydney = b.salon("Australia/Sydney")
    pro = b.professional(sydney)
    cut = b.service(sydney, price_cents=4000)
    client = b.client()
    for hour, status in ((0, "completed"), (8, "cancelled"), (23, "completed"), (12, "confirmed")):
        b.booking(
            client=client,
            professional=pro,
            service=cut,
            local=datetime(2026, 4, 5, hour, 30),
            status=status,
        )
    b.booking(client=client, professional=pro, service=cut, local=datetime(2026, 4, 6, 0, 0))
    reports.load(b.build())
    # 2026-04-05 is Sydney's autumn change (25 hours long); all four belong to it.
    today = realtime(reports, implementation, Scope(1, "Australia/Sydney"), date(2026, 4, 5))
    assert today == {
        "bookings_total": 4,
        "by_status": {"pending": 0, "confirmed": 1, "completed": 2, "cancelled": 1, "no_show": 0},
        "revenue_cents": 8000,
    }
