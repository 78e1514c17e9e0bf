"""Hypothesis strategies for the differential report tests: small, nasty salon datasets.

A ``Dataset`` is plain rows with explicit ids (salons, professionals, services, clients,
bookings); ``load`` writes one into an emptied test database. ``cases()`` draws a dataset
together with what to ask of it: a scope (one salon or the whole platform) and a period.

The data is built to hit the report definitions' corners: salons in DST time zones and UTC,
bookings just inside and just outside the period's local bounds, bookings before the period
(returning clients), clients shared between salons, inactive professionals, a few prices
only (ties in revenue and in the top services), every status. ``DatasetBuilder`` writes the
hand-made datasets of the explicit examples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import psycopg
from hypothesis import strategies as st

from service.reports.params import STATUSES, BookingFilters, Period, Scope, Status

TIMEZONES = ("UTC", "Europe/Lisbon", "America/New_York", "Australia/Sydney")
CATEGORIES = ("hair", "nails", "spa")
PRICES = (0, 1000, 2500, 3000)
TABLES = ("audit_events", "bookings", "services", "professionals", "users", "salons")

# Days around which the periods are drawn: DST changes in every zone above, a month end and a
# year end. Lisbon: 2026-03-29 / 2026-10-25; New York: 2026-03-08 / 2026-11-01; Sydney:
# 2026-04-05 / 2026-10-04.
ANCHORS = (
    date(2026, 3, 8),
    date(2026, 3, 29),
    date(2026, 4, 5),
    date(2026, 10, 4),
    date(2026, 10, 25),
    date(2026, 11, 1),
    date(2026, 1, 31),
    date(2025, 12, 31),
)
# Local times of day: the period's edges (midnight, just before midnight) are what matters.
TIMES = (
    time(0, 0),
    time(0, 30),
    time(1, 30),
    time(2, 30),  # does not exist on a spring-forward day in New York
    time(9, 0),
    time(12, 15),
    time(17, 45),
    time(23, 0),
    time(23, 30),
    time(23, 59, 59, 999_999),
)


@dataclass(frozen=True)
class SalonRow:
    id: int
    timezone: str


@dataclass(frozen=True)
class ProfessionalRow:
    id: int
    salon_id: int
    name: str
    is_active: bool


@dataclass(frozen=True)
class ServiceRow:
    id: int
    salon_id: int
    category: str
    name: str
    price_cents: int


@dataclass(frozen=True)
class BookingRow:
    id: int
    salon_id: int
    client_id: int
    professional_id: int
    service_id: int
    scheduled_at: datetime
    status: str
    price_cents: int


@dataclass(frozen=True)
class Dataset:
    salons: tuple[SalonRow, ...] = ()
    professionals: tuple[ProfessionalRow, ...] = ()
    services: tuple[ServiceRow, ...] = ()
    clients: tuple[int, ...] = ()
    bookings: tuple[BookingRow, ...] = ()

    def timezone(self, salon_id: int | None) -> str:
        if salon_id is None:
            return "UTC"
        return next(salon.timezone for salon in self.salons if salon.id == salon_id)

    def scope(self, salon_id: int | None) -> Scope:
        return Scope(salon_id=salon_id, timezone=self.timezone(salon_id))


@dataclass(frozen=True)
class Case:
    """A dataset and the report request to run on it."""

    dataset: Dataset
    salon_id: int | None
    period: Period

    @property
    def scope(self) -> Scope:
        return self.dataset.scope(self.salon_id)


@dataclass
class DatasetBuilder:
    """Hand-made datasets: ids are assigned in order, local times are in the salon's zone."""

    salons: list[SalonRow] = field(default_factory=list)
    professionals: list[ProfessionalRow] = field(default_factory=list)
    services: list[ServiceRow] = field(default_factory=list)
    clients: list[int] = field(default_factory=list)
    bookings: list[BookingRow] = field(default_factory=list)

    def salon(self, timezone: str = "UTC") -> int:
        self.salons.append(SalonRow(id=len(self.salons) + 1, timezone=timezone))
        return len(self.salons)

    def professional(self, salon_id: int, *, is_active: bool = True) -> int:
        pid = len(self.professionals) + 1
        self.professionals.append(ProfessionalRow(pid, salon_id, f"Pro {pid}", is_active))
        return pid

    def service(self, salon_id: int, category: str = "hair", price_cents: int = 3000) -> int:
        sid = len(self.services) + 1
        self.services.append(ServiceRow(sid, salon_id, category, f"Service {sid}", price_cents))
        return sid

    def client(self) -> int:
        self.clients.append(len(self.clients) + 1)
        return len(self.clients)

    def booking(
        self,
        *,
        client: int,
        professional: int,
        service: int,
        local: datetime,
        status: str = "completed",
        price_cents: int | None = None,
    ) -> int:
        """A booking at the naive local wall time ``local`` of the professional's salon."""
        salon_id = next(p.salon_id for p in self.professionals if p.id == professional)
        timezone = next(s.timezone for s in self.salons if s.id == salon_id)
        price = price_cents
        if price is None:
            price = next(s.price_cents for s in self.services if s.id == service)
        bid = len(self.bookings) + 1
        scheduled_at = local.replace(tzinfo=ZoneInfo(timezone)).astimezone(UTC)
        self.bookings.append(
            BookingRow(bid, salon_id, client, professional, service, scheduled_at, status, price)
        )
        return bid

    def build(self) -> Dataset:
        return Dataset(
            salons=tuple(self.salons),
            professionals=tuple(self.professionals),
            services=tuple(self.services),
            clients=tuple(self.clients),
            bookings=tuple(self.bookings),
        )


def load(connection: psycopg.Connection, dataset: Dataset) -> None:
    """Empty the test database and write ``dataset`` into it, ids as given, in one transaction.

    DELETE rather than TRUNCATE: on a handful of rows it is some thirty times faster, and
    hypothesis loads hundreds of datasets (the ids are explicit, so no sequence to restart).
    """
    booking_rows: list[tuple[object, ...]] = [
        (
            b.id,
            b.salon_id,
            b.client_id,
            b.professional_id,
            b.service_id,
            b.scheduled_at,
            b.status,
            b.price_cents,
            b.scheduled_at if b.status == "completed" else None,
            b.scheduled_at if b.status == "cancelled" else None,
        )
        for b in dataset.bookings
    ]
    tables: list[tuple[str, list[tuple[object, ...]]]] = [
        (
            "salons (id, name, timezone)",
            [(s.id, f"Salon {s.id}", s.timezone) for s in dataset.salons],
        ),
        (
            "users (id, role, email)",
            [(c, "client", f"client{c}@example.test") for c in dataset.clients],
        ),
        (
            "professionals (id, salon_id, name, is_active)",
            [(p.id, p.salon_id, p.name, p.is_active) for p in dataset.professionals],
        ),
        (
            "services (id, salon_id, category, name, price_cents, duration_min)",
            [(s.id, s.salon_id, s.category, s.name, s.price_cents, 45) for s in dataset.services],
        ),
        (
            "bookings (id, salon_id, client_id, professional_id, service_id, scheduled_at, status,"
            " price_cents, completed_at, cancelled_at)",
            booking_rows,
        ),
    ]
    with connection.transaction():
        for table in TABLES:
            connection.execute(f"DELETE FROM {table}")
        with connection.cursor() as cursor:
            for target, rows in tables:
                with cursor.copy(f"COPY {target} FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)


@st.composite
def periods(draw: st.DrawFn) -> Period:
    anchor = draw(st.sampled_from(ANCHORS))
    start = anchor + timedelta(days=draw(st.integers(-6, 2)))
    length = draw(st.one_of(st.integers(1, 10), st.integers(11, 75)))
    return Period(start=start, end=start + timedelta(days=length - 1))


@st.composite
def datasets(draw: st.DrawFn, around: Period, max_bookings: int = 25) -> Dataset:
    """Salons, staff, services, clients and bookings around ``around`` (before, in, after)."""
    builder = DatasetBuilder()
    for timezone in draw(st.lists(st.sampled_from(TIMEZONES), min_size=1, max_size=3)):
        salon_id = builder.salon(timezone)
        for is_active in draw(st.lists(st.booleans(), min_size=1, max_size=3)):
            builder.professional(salon_id, is_active=is_active)
        for category, price in draw(
            st.lists(
                st.tuples(st.sampled_from(CATEGORIES), st.sampled_from(PRICES)),
                min_size=1,
                max_size=3,
            )
        ):
            builder.service(salon_id, category, price)
    for _ in range(draw(st.integers(1, 5))):
        builder.client()

    # Lots of empty days and buckets come for free; the period edges are drawn on purpose.
    for _ in range(draw(st.integers(0, max_bookings))):
        salon = draw(st.sampled_from(builder.salons))
        professional = draw(
            st.sampled_from([p.id for p in builder.professionals if p.salon_id == salon.id])
        )
        service = draw(st.sampled_from([s.id for s in builder.services if s.salon_id == salon.id]))
        day = draw(
            st.one_of(
                st.sampled_from((around.start, around.end, around.end + timedelta(days=1))),
                st.integers(-8, around.days + 2).map(
                    lambda offset: around.start + timedelta(offset)
                ),
            )
        )
        local = datetime.combine(day, draw(st.sampled_from(TIMES)))
        builder.booking(
            client=draw(st.sampled_from(builder.clients)),
            professional=professional,
            service=service,
            local=local.replace(fold=draw(st.sampled_from((0, 0, 1)))),
            status=draw(st.sampled_from(STATUSES)),
            price_cents=draw(st.one_of(st.none(), st.sampled_from(PRICES))),
        )
    return builder.build()


@st.composite
def cases(draw: st.DrawFn, max_bookings: int = 25) -> Case:
    period = draw(periods())
    dataset = draw(datasets(period, max_bookings))
    salon_id = draw(st.one_of(st.none(), st.sampled_from([s.id for s in dataset.salons])))
    return Case(dataset=dataset, salon_id=salon_id, period=period)


@st.composite
def booking_filters(draw: st.DrawFn, dataset: Dataset) -> BookingFilters:
    """No filter, or any mix of a professional, a service and a status (possibly matching none)."""
    professional_ids = [p.id for p in dataset.professionals]
    service_ids = [s.id for s in dataset.services]
    status: Status | None = draw(st.one_of(st.none(), st.sampled_from(STATUSES)))
    return BookingFilters(
        professional_id=draw(st.one_of(st.none(), st.sampled_from(professional_ids))),
        service_id=draw(st.one_of(st.none(), st.sampled_from(service_ids))),
        status=status,
    )
