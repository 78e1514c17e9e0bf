"""Deterministic, realistic demo data for the reporting service, written with COPY.

``seed_database`` generates salons in several IANA time zones (some observing DST), their
services (with categories and prices in cents) and professionals (a few inactive, a few who
joined late), salon owners, a couple of admins, clients, bookings over ``days`` days ending
about a week after today, and audit events for a sample of bookings.

The shape is chosen so that the reports mean something:

- bookings fall mostly within each salon's opening hours in its *local* time, with
  weekday/weekend differences, seasonality and a growth trend;
- clients come back with a skewed distribution: each client has a Pareto-distributed visit
  rate, so a few regulars make many bookings and many clients book once; some clients also
  book at a second salon;
- statuses follow time: past bookings are mostly completed (~10 % cancelled, ~3 % no-show),
  future ones pending or confirmed; ``completed_at``, ``cancelled_at``, ``created_at`` and
  ``updated_at`` agree with the status and with each other, and no timestamp lies in the future
  except ``scheduled_at``.

Determinism: the same ``seed``, the same starting database and the same UTC date give
byte-identical rows (ids, text and timestamps). Timestamps are relative to midnight UTC of the
current date (``today``, overridable) so that the demo period always ends near the present; two
runs on different days therefore differ. Every generated timestamp except ``scheduled_at`` is
at or before that midnight.

Appending: on a database that already has data, new salons, users, professionals, services,
bookings and audit events get ids after the current maxima (no admins are added if some exist),
and the identity sequences are moved past them. ``if_empty`` skips seeding when bookings exist.
Everything happens in one transaction, under locks that let readers carry on.

Speed: rows are produced in tight loops as preformatted COPY text (1 M bookings take about
25 s on two cores). When ``users``, ``bookings`` or ``audit_events`` is empty, its secondary
indexes and unique constraints (and the bookings' foreign keys) are dropped before the load and
recreated from their catalog definitions before the commit; ``bookings`` and ``audit_events``
are truncated in the same transaction and written with ``COPY … FREEZE``, so that they are
all-visible at once. The tables are vacuumed and analysed at the end.
"""

from __future__ import annotations

import bisect
import math
import random
import time
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import LiteralString
from zoneinfo import ZoneInfo

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from service.db import libpq_url

__all__ = ["DST_TIMEZONES", "TIMEZONES", "local_day_starts", "seed_database"]

DAY = 86_400
FUTURE_DAYS = 7  # the period ends this many days after today
TABLES = ("salons", "users", "professionals", "services", "bookings", "audit_events")

# (IANA zone, city used in salon names); the first salons take them in this order.
TIMEZONES: tuple[tuple[str, str], ...] = (
    ("Europe/Lisbon", "Lisbon"),
    ("America/New_York", "New York"),
    ("Asia/Tokyo", "Tokyo"),
    ("UTC", "Accra"),
    ("Australia/Sydney", "Sydney"),
    ("Europe/Berlin", "Berlin"),
    ("America/Los_Angeles", "Los Angeles"),
    ("America/Sao_Paulo", "São Paulo"),
)
DST_TIMEZONES = frozenset(
    {
        "Europe/Lisbon",
        "America/New_York",
        "Australia/Sydney",
        "Europe/Berlin",
        "America/Los_Angeles",
    }
)
TIMEZONE_WEIGHTS = (4.0, 4.0, 2.0, 1.0, 2.0, 2.0, 2.0, 1.5)

# category -> (service name, base price in cents, duration in minutes, popularity)
CATALOG: dict[str, tuple[tuple[str, int, int, float], ...]] = {
    "hair": (
        ("Women's cut", 4500, 60, 5.0),
        ("Men's cut", 2500, 30, 4.0),
        ("Blow-dry", 3000, 45, 3.0),
        ("Colour", 8500, 120, 2.0),
        ("Highlights", 12000, 150, 1.2),
        ("Kids' cut", 1800, 30, 1.0),
    ),
    "nails": (
        ("Manicure", 2500, 45, 3.0),
        ("Gel manicure", 3500, 60, 3.0),
        ("Pedicure", 3500, 60, 2.0),
        ("Nail art", 1500, 30, 0.8),
    ),
    "skin": (
        ("Classic facial", 6000, 60, 2.0),
        ("Hydrating facial", 7500, 75, 1.0),
        ("Chemical peel", 8000, 45, 0.8),
    ),
    "massage": (
        ("Swedish massage", 7000, 60, 2.0),
        ("Deep tissue massage", 9500, 90, 1.2),
        ("Hot stone massage", 9000, 75, 0.8),
    ),
    "brows": (
        ("Brow shaping", 1500, 20, 2.5),
        ("Brow tint", 1200, 20, 1.2),
        ("Brow lamination", 4000, 45, 0.8),
    ),
    "lashes": (("Lash lift", 5000, 60, 1.2), ("Lash extensions", 9000, 120, 0.8)),
    "barber": (("Beard trim", 1500, 20, 2.0), ("Hot towel shave", 2800, 30, 1.0)),
}
CATEGORIES = tuple(CATALOG)
CATEGORY_POPULARITY = {
    "hair": 1.0,
    "nails": 0.7,
    "skin": 0.35,
    "massage": 0.35,
    "brows": 0.5,
    "lashes": 0.3,
    "barber": 0.3,
}

SALON_WORDS = (
    "Velvet",
    "Golden",
    "Urban",
    "Blossom",
    "Silk",
    "Ivory",
    "Coral",
    "Luna",
    "Maple",
    "Olive",
    "Amber",
    "Indigo",
    "Willow",
    "Sage",
    "Pearl",
    "Juniper",
    "Saffron",
)
SALON_KINDS = ("Studio", "Salon", "Beauty Bar", "Spa", "Atelier", "Lounge", "House")
FIRST_NAMES = (
    "Ana",
    "Beatriz",
    "Carla",
    "Diana",
    "Eva",
    "Filipa",
    "Grace",
    "Hana",
    "Inês",
    "Julia",
    "Kenji",
    "Liam",
    "Marta",
    "Noah",
    "Olivia",
    "Pedro",
    "Rita",
    "Sofia",
    "Tomás",
    "Yuki",
    "Zoe",
    "Mateus",
    "Chloe",
    "Aiko",
    "Emma",
    "Lucas",
    "Mia",
    "Oscar",
)
LAST_NAMES = (
    "Silva",
    "Santos",
    "Tanaka",
    "Smith",
    "Jones",
    "Müller",
    "Costa",
    "Sato",
    "Brown",
    "Garcia",
    "Wilson",
    "Ferreira",
    "Suzuki",
    "Taylor",
    "Martin",
    "Lopez",
    "Schmidt",
)

WEEKDAY_DEMAND = (0.75, 0.9, 1.0, 1.1, 1.3, 1.45, 0.6)  # Monday .. Sunday
MONTH_DEMAND = (0.9, 0.9, 1.0, 1.0, 1.05, 1.05, 0.95, 0.85, 1.0, 1.05, 1.1, 1.25)
HOUR_DEMAND = {
    7: 0.5,
    8: 1.5,
    9: 3.0,
    10: 5.0,
    11: 6.0,
    12: 4.0,
    13: 4.0,
    14: 5.0,
    15: 5.0,
    16: 6.0,
    17: 7.0,
    18: 5.0,
    19: 3.0,
    20: 1.5,
}
SLOT_TABLE_SIZE = 512
OUT_OF_HOURS_RATE = 0.015  # bookings up to an hour before opening or just after closing

# Clients: candidates per booking at a salon, Pareto shape and cap of the visit rate, share
# of a salon's clientele that are clients of another salon.
CLIENTS_PER_BOOKING = 0.42
VISIT_RATE_SHAPE = 1.1
VISIT_RATE_CAP = 25.0
SHARED_CLIENT_SHARE = 0.08
AUDITED_BOOKING_RATE = 0.12
DISCOUNT_RATE = 0.1

COPY_BATCH = 4_000  # rows per write to the COPY stream

USER_ROLE_ORDER = {"admin": 0, "owner": 1, "professional": 2, "client": 3}
EMAIL_PREFIX = {"admin": "admin", "owner": "owner", "professional": "pro", "client": "client"}


@dataclass(slots=True)
class _Service:
    id: int
    category: int  # index into the salon's categories
    name: str
    price_cents: int
    duration_min: int
    weight: float


@dataclass(slots=True)
class _Professional:
    id: int
    name: str
    categories: list[int]
    start_day: int  # first day index it takes bookings
    end_day: int  # first day index it no longer does (days when still active)
    created_at: int  # epoch seconds
    weight: int  # 1 or 2: senior professionals are booked twice as often
    user: int = -1  # index into the user list, then the user id


@dataclass(slots=True)
class _Salon:
    id: int
    name: str
    timezone: str
    created_at: int
    start_day: int
    weight: float
    cancel_rate: float
    no_show_rate: float
    hours: list[tuple[int, int] | None]  # (open, close) minutes per weekday, None = closed
    categories: list[str] = field(default_factory=list)
    services: list[_Service] = field(default_factory=list)
    professionals: list[_Professional] = field(default_factory=list)
    owner: int = -1  # index into the user list
    bookings: int = 0
    clients: list[int] = field(default_factory=list)  # global client indexes, by signup
    client_cumulative: list[float] = field(default_factory=list)
    client_signup_days: list[int] = field(default_factory=list)


@dataclass(slots=True)
class _User:
    role: str
    created_at: int
    id: int = 0


@dataclass(frozen=True, slots=True)
class _Start:
    """Where appended rows start: the current maximum id of every table."""

    salons: int
    users: int
    professionals: int
    services: int
    bookings: int
    audit_events: int
    has_admins: bool


class _Timestamps(dict[int, str]):
    """Days since the epoch -> ``"YYYY-MM-DD "`` (filled on demand), with the 86,400 times of
    day as ``"HH:MM:SS+00"``: an epoch becomes timestamptz text in two look-ups."""

    def __init__(self) -> None:
        super().__init__()
        self.time_of_day = [
            f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}+00" for s in range(DAY)
        ]

    def __missing__(self, epoch_day: int) -> str:
        text = (date(1970, 1, 1) + timedelta(days=epoch_day)).isoformat() + " "
        self[epoch_day] = text
        return text

    def format(self, epoch: int) -> str:
        return self[epoch // DAY] + self.time_of_day[epoch % DAY]


def seed_database(
    database_url: str,
    *,
    bookings: int,
    salons: int,
    days: int,
    seed: int,
    if_empty: bool = False,
    progress: bool = False,
    today: date | None = None,
) -> str:
    """Generate and load a dataset; returns a one-line summary.

    ``today`` (default: the current UTC date) anchors the period, which ends ``FUTURE_DAYS``
    after it. With ``if_empty`` nothing happens when bookings exist; otherwise new rows are
    appended with ids after the current maxima.
    """
    if bookings < 0 or salons < 1 or days < 1:
        raise ValueError("need bookings >= 0, salons >= 1 and days >= 1")
    started = time.perf_counter()
    today = today or datetime.now(UTC).date()
    with (
        psycopg.connect(libpq_url(database_url)) as connection,
        Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=not progress,
        ) as bar,
    ):
        # EXCLUSIVE: readers carry on, other writers wait until the commit, so the emptiness
        # check and the id ranges below stay true while loading.
        connection.execute(
            "LOCK TABLE salons, users, professionals, services, bookings, audit_events"
            " IN EXCLUSIVE MODE"
        )
        existing = _count(connection, "bookings")
        if if_empty and existing:
            connection.rollback()
            return f"database already has {existing:,} bookings; nothing seeded (--if-empty)"
        generator = _Generator(
            random_seed=seed,
            bookings=bookings,
            salons=salons,
            days=days,
            today=today,
            start=_current_maxima(connection),
        )
        counts = generator.load(connection, bar, bookings_empty=existing == 0)
        connection.commit()
    _vacuum(database_url)
    elapsed = time.perf_counter() - started
    first, last = generator.first_date, generator.last_date
    return (
        f"seeded {counts['bookings']:,} bookings, {counts['salons']:,} salons,"
        f" {counts['professionals']:,} professionals, {counts['services']:,} services,"
        f" {counts['users']:,} users, {counts['audit_events']:,} audit events"
        f" ({first.isoformat()} .. {last.isoformat()}, seed {seed})"
        f" in {elapsed:.1f} s ({counts['bookings'] / max(elapsed, 1e-9):,.0f} bookings/s)"
    )


def _count(connection: psycopg.Connection[TupleRow], table: LiteralString) -> int:
    row = connection.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
    result = row.fetchone()
    return int(result[0]) if result else 0


def _current_maxima(connection: psycopg.Connection[TupleRow]) -> _Start:
    row = connection.execute(
        "SELECT (SELECT coalesce(max(id), 0) FROM salons),"
        " (SELECT coalesce(max(id), 0) FROM users),"
        " (SELECT coalesce(max(id), 0) FROM professionals),"
        " (SELECT coalesce(max(id), 0) FROM services),"
        " (SELECT coalesce(max(id), 0) FROM bookings),"
        " (SELECT coalesce(max(id), 0) FROM audit_events),"
        " EXISTS (SELECT 1 FROM users WHERE role = 'admin')"
    ).fetchone()
    assert row is not None
    salons, users, professionals, services, bookings, audit_events = (int(v) for v in row[:6])
    return _Start(
        salons=salons,
        users=users,
        professionals=professionals,
        services=services,
        bookings=bookings,
        audit_events=audit_events,
        has_admins=bool(row[6]),
    )


class _Generator:
    """Plans the dataset from the seed, then streams it into the database."""

    def __init__(
        self,
        *,
        random_seed: int,
        bookings: int,
        salons: int,
        days: int,
        today: date,
        start: _Start,
    ) -> None:
        self.seed = random_seed
        self.total_bookings = bookings
        self.salon_count = salons
        self.days = days
        self.start = start
        future_days = min(FUTURE_DAYS, days // 2)
        self.today_index = days - 1 - future_days  # day index of `today`
        self.first_date = today - timedelta(days=self.today_index)
        self.last_date = self.first_date + timedelta(days=days - 1)
        self.first_epoch = _epoch(self.first_date)
        self.anchor = _epoch(today)  # midnight UTC today: nothing but scheduled_at after it
        self.users: list[_User] = []
        self.salons: list[_Salon] = []
        self.client_users: list[int] = []  # global client index -> index into users
        self.client_signups: list[int] = []
        self.client_rates: list[float] = []
        self.timestamps = _Timestamps()
        self.next_audit_id = start.audit_events

    def _random(self, purpose: str) -> random.Random:
        # One stream per purpose: changing how bookings are drawn leaves salons alone.
        return random.Random(f"salon-reports:{self.seed}:{purpose}")

    # -- planning ------------------------------------------------------------------------

    def plan_structure(self) -> None:
        """Salons, their hours, services and professionals, owners and admins."""
        rng = self._random("structure")
        start = self.start
        service_id, professional_id = start.services, start.professionals
        for index in range(self.salon_count):
            zone, city = (
                TIMEZONES[index]
                if index < len(TIMEZONES)
                else rng.choices(TIMEZONES, weights=TIMEZONE_WEIGHTS)[0]
            )
            late_joiner = index > 0 and self.today_index >= 30 and rng.random() < 0.2
            start_day = rng.randrange(self.today_index * 2 // 3) if late_joiner else 0
            start_epoch = self.first_epoch + start_day * DAY
            created_at = start_epoch - rng.randrange(46 * DAY, (60 if late_joiner else 900) * DAY)
            salon = _Salon(
                id=start.salons + index + 1,
                name=f"{rng.choice(SALON_WORDS)} {rng.choice(SALON_KINDS)} {city}",
                timezone=zone,
                created_at=created_at,
                start_day=start_day,
                weight=rng.lognormvariate(0.0, 0.35),
                cancel_rate=rng.uniform(0.07, 0.13),
                no_show_rate=rng.uniform(0.02, 0.05),
                hours=self._opening_hours(rng),
            )
            self._plan_services(rng, salon, service_id)
            service_id += len(salon.services)
            self._plan_professionals(rng, salon, professional_id)
            professional_id += len(salon.professionals)
            active = sum(1 for p in salon.professionals if p.end_day >= self.days)
            salon.weight *= active
            # A few owners run two salons.
            if self.salons and rng.random() < 0.1:
                salon.owner = self.salons[-1].owner
                owner = self.users[salon.owner]
                owner.created_at = min(owner.created_at, created_at - DAY)
            else:
                salon.owner = self._add_user("owner", created_at - rng.randrange(DAY, 30 * DAY))
            self.salons.append(salon)
        if not start.has_admins:
            platform_start = min(s.created_at for s in self.salons) - 90 * DAY
            for _ in range(2):
                self._add_user("admin", platform_start + rng.randrange(DAY))

    @staticmethod
    def _opening_hours(rng: random.Random) -> list[tuple[int, int] | None]:
        opens = rng.choice((8, 9, 9, 10)) * 60
        closes = rng.choice((18, 19, 19, 20)) * 60
        saturday = (opens, min(closes, rng.choice((17, 18)) * 60))
        sunday = (10 * 60, 16 * 60) if rng.random() < 0.35 else None
        monday = None if rng.random() < 0.25 else (opens, closes)
        return [
            monday,
            (opens, closes),
            (opens, closes),
            (opens, closes),
            (opens, closes),
            saturday,
            sunday,
        ]

    @staticmethod
    def _plan_services(rng: random.Random, salon: _Salon, last_id: int) -> None:
        others = [c for c in CATEGORIES if c != "hair"]
        chosen = rng.sample(others, rng.randint(2, 4))
        if rng.random() < 0.95 or not chosen:
            chosen.insert(0, "hair")
        salon.categories = [c for c in CATEGORIES if c in chosen]
        price_level = rng.uniform(0.75, 1.6)
        for category_index, category in enumerate(salon.categories):
            offered = [s for s in CATALOG[category] if rng.random() < 0.8] or [CATALOG[category][0]]
            for name, base_price, duration, popularity in offered:
                price = round(base_price * price_level * rng.uniform(0.9, 1.1) / 50) * 50
                last_id += 1
                salon.services.append(
                    _Service(
                        id=last_id,
                        category=category_index,
                        name=name,
                        price_cents=price,
                        duration_min=duration,
                        weight=popularity * CATEGORY_POPULARITY[category] * rng.uniform(0.6, 1.4),
                    )
                )

    def _plan_professionals(self, rng: random.Random, salon: _Salon, last_id: int) -> None:
        count = rng.randint(3, 12)
        category_weights = [CATEGORY_POPULARITY[c] for c in salon.categories]
        salon_start = self.first_epoch + salon.start_day * DAY
        for index in range(count):
            start_day, end_day = salon.start_day, self.days
            # The first two stay all along; later ones may join late or leave.
            if index >= 2 and self.today_index >= 30:
                draw = rng.random()
                if draw < 0.12:
                    end_day = rng.randint(
                        max(salon.start_day + 1, self.today_index // 5), self.today_index * 9 // 10
                    )
                elif draw < 0.27:
                    start_day = rng.randint(
                        salon.start_day, max(salon.start_day, self.today_index * 4 // 5)
                    )
            specialties = rng.choices(
                range(len(salon.categories)), category_weights, k=rng.randint(1, 2)
            )
            categories = sorted(set(specialties))
            created_at = (
                salon_start - rng.randrange(46 * DAY, 120 * DAY)
                if start_day == salon.start_day
                else self.first_epoch + start_day * DAY - rng.randrange(46 * DAY, 90 * DAY)
            )
            professional = _Professional(
                id=last_id + index + 1,
                name=f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}",
                categories=categories,
                start_day=start_day,
                end_day=end_day,
                created_at=created_at,
                weight=2 if rng.random() < 0.3 else 1,
            )
            professional.user = self._add_user("professional", created_at)
            salon.professionals.append(professional)
        # Every category is served by someone who stays all along.
        steady = salon.professionals[:2]
        for category_index in range(len(salon.categories)):
            if not any(category_index in p.categories for p in steady):
                rng.choice(steady).categories.append(category_index)

    def _add_user(self, role: str, created_at: int) -> int:
        self.users.append(_User(role=role, created_at=created_at))
        return len(self.users) - 1

    def plan_volume(self) -> list[array[int]]:
        """Bookings per day and salon (exactly ``total_bookings`` in all)."""
        rng = self._random("volume")
        weights: list[list[float]] = []
        for day in range(self.days):
            current = self.first_date + timedelta(days=day)
            seasonal = MONTH_DEMAND[current.month - 1] * (0.75 + 0.5 * day / self.days)
            weekday = current.weekday()
            row = []
            for salon in self.salons:
                noise = rng.uniform(0.7, 1.3)
                open_today = day >= salon.start_day and salon.hours[weekday] is not None
                row.append(
                    salon.weight * WEEKDAY_DEMAND[weekday] * seasonal * noise if open_today else 0.0
                )
            weights.append(row)
        total = math.fsum(math.fsum(row) for row in weights)
        if not total:
            # A period of a day or two when every salon is closed: open on that day anyway.
            weights = [[s.weight for s in self.salons] for _ in range(self.days)]
            total = math.fsum(math.fsum(row) for row in weights)
        counts: list[array[int]] = []
        accumulated, allocated = 0.0, 0
        for row in weights:
            day_counts = array("q")
            for weight in row:
                accumulated += weight
                target = round(accumulated / total * self.total_bookings) if total else 0
                day_counts.append(target - allocated)
                allocated = target
            counts.append(day_counts)
        # Float rounding may leave the last cell short or long by one.
        if allocated != self.total_bookings:
            for day_counts in reversed(counts):
                for salon_index in reversed(range(len(day_counts))):
                    if day_counts[salon_index] or not allocated:
                        day_counts[salon_index] += self.total_bookings - allocated
                        allocated = self.total_bookings
                        break
                if allocated == self.total_bookings:
                    break
        for day_counts in counts:
            for salon, count in zip(self.salons, day_counts, strict=True):
                salon.bookings += count
        return counts

    def plan_clients(self) -> None:
        """Candidate clients per salon with a signup time and a skewed visit rate."""
        rng = self._random("clients")
        by_timezone: dict[str, list[int]] = {}
        own: list[list[int]] = []
        latest_signup = self.anchor - 3600
        for salon_index, salon in enumerate(self.salons):
            salon_start = self.first_epoch + salon.start_day * DAY
            existing_share = 0.3 if salon.start_day == 0 else 0.1
            span = max(1, latest_signup - salon_start)
            first = len(self.client_signups)
            candidates = max(1, round(salon.bookings * CLIENTS_PER_BOOKING))
            signups, rates, random_ = self.client_signups, self.client_rates, rng.random
            for index in range(candidates):
                # The salon's clientele before it is on the platform (always at least one).
                if index == 0 or random_() < existing_share:
                    signups.append(salon_start - 2 * DAY - int(random_() * 538 * DAY))
                else:
                    signups.append(salon_start + int(random_() * span))
                # Pareto visit rate (as random.paretovariate), capped: a few regulars.
                rate = (1.0 - random_()) ** (-1.0 / VISIT_RATE_SHAPE)
                rates.append(rate if rate < VISIT_RATE_CAP else VISIT_RATE_CAP)
            own.append(list(range(first, first + candidates)))
            by_timezone.setdefault(salon.timezone, []).append(salon_index)
        for salon_index, salon in enumerate(self.salons):
            neighbours = [i for i in by_timezone[salon.timezone] if i != salon_index]
            neighbours = neighbours or [i for i in range(len(self.salons)) if i != salon_index]
            shared: list[int] = []
            if neighbours:
                for _ in range(round(len(own[salon_index]) * SHARED_CLIENT_SHARE)):
                    pool = own[rng.choice(neighbours)]
                    shared.append(rng.choice(pool))
            self._index_clients(salon, own[salon_index], dict.fromkeys(shared), rng)

    def _index_clients(
        self, salon: _Salon, own: list[int], shared: dict[int, None], rng: random.Random
    ) -> None:
        # Visiting another salon is occasional: a lower rate than at the home salon.
        signups = self.client_signups
        rates = {c: self.client_rates[c] for c in own}
        rates.update({c: rng.uniform(0.5, 1.5) for c in shared if c not in rates})
        ordered = [c for _, c in sorted((signups[c], c) for c in rates)]
        salon.clients = ordered
        salon.client_cumulative = _cumulative(rates[c] for c in ordered)
        # A client books from the second day after signing up (signup_day < day - 1), which
        # keeps every booking after the signup whatever the salon's UTC offset.
        first_epoch = self.first_epoch
        salon.client_signup_days = [(signups[c] - first_epoch) // DAY for c in ordered]

    def draw_clients(self, counts: list[array[int]]) -> array[int]:
        """The client (global index) of every booking, in booking order."""
        rng = self._random("bookings-clients")
        random_ = rng.random
        bisect_right = bisect.bisect_right
        choices: array[int] = array("q")
        append = choices.append
        for day, day_counts in enumerate(counts):
            for salon, count in zip(self.salons, day_counts, strict=True):
                if not count:
                    continue
                eligible = bisect.bisect_left(salon.client_signup_days, day - 1)
                cumulative, clients = salon.client_cumulative, salon.clients
                total = cumulative[eligible - 1]
                for _ in range(count):
                    append(clients[bisect_right(cumulative, random_() * total, 0, eligible)])
        return choices

    def assign_user_ids(self, client_choices: array[int]) -> None:
        """Clients who book become users; ids follow signup order, after the current max."""
        self.client_users = [-1] * len(self.client_signups)
        for client in sorted(set(client_choices)):
            self.client_users[client] = self._add_user("client", self.client_signups[client])
        users = self.users
        order = sorted(
            (user.created_at, USER_ROLE_ORDER[user.role], index) for index, user in enumerate(users)
        )
        for rank, (_, _, index) in enumerate(order, start=self.start.users + 1):
            users[index].id = rank

    # -- loading -------------------------------------------------------------------------

    def load(
        self,
        connection: psycopg.Connection[TupleRow],
        bar: Progress,
        *,
        bookings_empty: bool,
    ) -> dict[str, int]:
        steps = bar.add_task("planning", total=None)
        self.plan_structure()
        counts = self.plan_volume()
        self.plan_clients()
        client_choices = self.draw_clients(counts)
        self.assign_user_ids(client_choices)
        bar.remove_task(steps)

        cursor = connection.cursor()
        cursor.execute("SET LOCAL maintenance_work_mem = '512MB'")
        cursor.execute("SET LOCAL statement_timeout = 0")  # index builds may take a while
        # Bulk loads into empty tables: secondary indexes (and the bookings' foreign keys) are
        # built once at the end rather than maintained row by row.
        deferred: list[sql.SQL | sql.Composed] = []
        freeze: dict[str, bool] = {}
        for table, empty, foreign_keys in (
            ("users", _count(connection, "users") == 0, False),
            ("bookings", bookings_empty, True),
            ("audit_events", _count(connection, "audit_events") == 0, False),
        ):
            if empty:
                restore, freeze[table] = _set_aside(cursor, table, foreign_keys=foreign_keys)
                deferred += restore

        self._copy(cursor, "salons", ("id", "name", "timezone", "created_at"), self._salon_rows())
        self._copy(cursor, "users", ("id", "role", "email", "created_at"), self._user_rows())
        self._copy(
            cursor,
            "professionals",
            ("id", "salon_id", "user_id", "name", "is_active", "created_at"),
            self._professional_rows(),
        )
        self._copy(
            cursor,
            "services",
            ("id", "salon_id", "category", "name", "price_cents", "duration_min"),
            self._service_rows(),
        )

        audit_lines: list[str] = []
        task = bar.add_task("bookings", total=self.total_bookings)
        self._copy(
            cursor,
            "bookings",
            (
                "id",
                "salon_id",
                "client_id",
                "professional_id",
                "service_id",
                "scheduled_at",
                "status",
                "price_cents",
                "created_at",
                "updated_at",
                "completed_at",
                "cancelled_at",
            ),
            self._booking_rows(counts, client_choices, audit_lines, bar, task),
            freeze=freeze.get("bookings", False),
        )
        audit_lines.extend(self._other_audit_lines())
        audit_count = sum(chunk.count("\n") for chunk in audit_lines)
        self._copy(
            cursor,
            "audit_events",
            ("id", "entity_type", "entity_id", "event_type", "actor_id", "payload", "created_at"),
            audit_lines,
            freeze=freeze.get("audit_events", False),
        )
        if deferred:
            task = bar.add_task("indexes and constraints", total=len(deferred))
            for statement in deferred:
                cursor.execute(statement)
                bar.advance(task)
        for table in TABLES:
            cursor.execute(
                sql.SQL(
                    "SELECT setval(pg_get_serial_sequence({name}, 'id'), coalesce(max(id), 0) + 1,"
                    " false) FROM {table}"
                ).format(name=sql.Literal(table), table=sql.Identifier(table))
            )
        return {
            "salons": len(self.salons),
            "users": len(self.users),
            "professionals": sum(len(s.professionals) for s in self.salons),
            "services": sum(len(s.services) for s in self.salons),
            "bookings": self.total_bookings,
            "audit_events": audit_count,
        }

    @staticmethod
    def _copy(
        cursor: psycopg.Cursor[TupleRow],
        table: LiteralString,
        columns: tuple[LiteralString, ...],
        chunks: Iterable[str],
        *,
        freeze: bool = False,
    ) -> None:
        statement = sql.SQL("COPY {table} ({columns}) FROM STDIN{options}").format(
            table=sql.Identifier(table),
            columns=sql.SQL(", ").join(map(sql.Identifier, columns)),
            options=sql.SQL(" WITH (FREEZE)" if freeze else ""),
        )
        with cursor.copy(statement) as copy:
            for chunk in chunks:
                copy.write(chunk)

    def _salon_rows(self) -> Iterator[str]:
        fmt = self.timestamps.format
        yield "".join(f"{s.id}\t{s.name}\t{s.timezone}\t{fmt(s.created_at)}\n" for s in self.salons)

    def _user_rows(self) -> Iterator[str]:
        fmt = self.timestamps.format
        for offset in range(0, len(self.users), COPY_BATCH):
            yield "".join(
                f"{u.id}\t{u.role}\t{EMAIL_PREFIX[u.role]}{u.id}@example.test\t{fmt(u.created_at)}\n"
                for u in self.users[offset : offset + COPY_BATCH]
            )

    def _professional_rows(self) -> Iterator[str]:
        fmt = self.timestamps.format
        for salon in self.salons:
            yield "".join(
                f"{p.id}\t{salon.id}\t{self.users[p.user].id}\t{p.name}"
                f"\t{'t' if p.end_day >= self.days else 'f'}\t{fmt(p.created_at)}\n"
                for p in salon.professionals
            )

    def _service_rows(self) -> Iterator[str]:
        for salon in self.salons:
            yield "".join(
                f"{s.id}\t{salon.id}\t{salon.categories[s.category]}\t{s.name}"
                f"\t{s.price_cents}\t{s.duration_min}\n"
                for s in salon.services
            )

    def _slot_tables(self, salon: _Salon) -> list[list[int] | None]:
        """Per weekday, SLOT_TABLE_SIZE start minutes (quarter hours from opening to 45 minutes
        before closing, as often as HOUR_DEMAND says): a uniform index into it draws a start."""
        tables: list[list[int] | None] = []
        for hours in salon.hours:
            if hours is None:
                tables.append(None)
                continue
            opens, closes = hours
            slots = list(range(opens, closes - 45 + 1, 15))
            cumulative = []
            total = 0.0
            for minute in slots:
                total += HOUR_DEMAND[minute // 60]
                cumulative.append(total)
            tables.append(
                [
                    slots[bisect.bisect_right(cumulative, (q + 0.5) / SLOT_TABLE_SIZE * total)]
                    for q in range(SLOT_TABLE_SIZE)
                ]
            )
        return tables

    def _booking_rows(
        self,
        counts: list[array[int]],
        client_choices: array[int],
        audit_lines: list[str],
        bar: Progress,
        task: TaskID,
    ) -> Iterator[str]:
        # The hot loop of the seed: everything that can be is looked up or formatted once,
        # outside it (ids as text, timestamps as two table look-ups).
        rng = self._random("bookings")
        random_ = rng.random
        bisect_right = bisect.bisect_right
        day_seconds = DAY
        first_day = self.first_epoch // DAY
        # Every timestamp of a booking lies between 46 days before the period and its end.
        day_text = {d: self.timestamps[d] for d in range(first_day - 47, first_day + self.days + 2)}
        time_text = self.timestamps.time_of_day
        anchor = self.anchor
        users = self.users
        client_ids = [users[u].id if u >= 0 else 0 for u in self.client_users]
        client_texts = [str(i) for i in client_ids]
        signups = self.client_signups
        audit = _AuditWriter(self._random("audit"), self.start.audit_events, self.timestamps)
        audit_booking = audit.booking
        day_starts = {
            s.timezone: local_day_starts(s.timezone, self.first_date, self.days)
            for s in self.salons
        }
        slot_tables = [self._slot_tables(s) for s in self.salons]
        services = [
            [
                (str(v.id), v.category, v.price_cents, str(v.price_cents), v.duration_min * 60)
                for v in s.services
            ]
            for s in self.salons
        ]
        service_cumulative = [_cumulative(v.weight for v in s.services) for s in self.salons]
        owner_ids = [users[s.owner].id for s in self.salons]
        available: list[list[list[tuple[str, int]]]] = [[] for _ in self.salons]
        changes = [
            {p.start_day for p in s.professionals} | {p.end_day for p in s.professionals}
            for s in self.salons
        ]

        booking_id = self.start.bookings
        choice_index = 0
        lines: list[str] = []
        append = lines.append
        for day in range(self.days):
            current = self.first_date + timedelta(days=day)
            weekday = current.weekday()
            day_total = 0
            for salon_index, count in enumerate(counts[day]):
                salon = self.salons[salon_index]
                if day == 0 or day in changes[salon_index]:
                    available[salon_index] = self._available(salon, day)
                if not count:
                    continue
                day_total += count
                local_midnight = day_starts[salon.timezone][day]
                # A closed weekday only gets bookings in a tiny all-closed period (see
                # plan_volume); those follow Tuesday's hours, when every salon is open.
                slots = slot_tables[salon_index][weekday] or slot_tables[salon_index][1]
                assert slots is not None
                opens, closes = salon.hours[weekday] or salon.hours[1] or (9 * 60, 19 * 60)
                salon_id = salon.id
                salon_text = f"\t{salon_id}\t"
                owner_id = owner_ids[salon_index]
                salon_services = services[salon_index]
                cumulative = service_cumulative[salon_index]
                service_total = cumulative[-1]
                by_category = available[salon_index]
                cancel_rate = salon.cancel_rate
                no_show_rate = cancel_rate + salon.no_show_rate
                minutes = []
                for _ in range(count):
                    if random_() < OUT_OF_HOURS_RATE:
                        minutes.append(
                            opens - 60 + 15 * int(random_() * 4)
                            if random_() < 0.5
                            else closes + 15 * int(random_() * 3)
                        )
                    else:
                        minutes.append(slots[int(random_() * SLOT_TABLE_SIZE)])
                minutes.sort()
                for minute in minutes:
                    booking_id += 1
                    scheduled = local_midnight + minute * 60
                    service_text, category, price, price_text, duration = salon_services[
                        bisect_right(cumulative, random_() * service_total)
                    ]
                    pros = by_category[category]
                    professional_text, professional_user = pros[int(random_() * len(pros))]
                    client = client_choices[choice_index]
                    choice_index += 1

                    draw = random_()
                    if draw < 0.2:
                        lead = 1800 + int(random_() * 21_600)
                    elif draw < 0.7:
                        lead = day_seconds + int(random_() * 518_400)
                    else:
                        lead = 604_800 + int(random_() * 3_283_200)
                    created = scheduled - lead
                    if created > anchor - 60:  # booked for next week: booked before now
                        created = (
                            anchor - 60 - int(random_() * (lead if lead < 1_209_600 else 1_209_600))
                        )
                    if created < signups[client] + 600:
                        created = signups[client] + 600
                    if random_() < DISCOUNT_RATE:
                        price = int(price * (0.7 + 0.2 * random_())) // 50 * 50
                        price_text = str(price)

                    end = scheduled + duration
                    draw = random_()
                    if end <= anchor:
                        if draw < cancel_rate:
                            status = "cancelled"
                            updated = created + int(random_() * (scheduled - created))
                        elif draw < no_show_rate:
                            status = "no_show"
                            updated = end + 1800
                        else:
                            status = "completed"
                            updated = end + int(random_() * 900)
                        if updated > anchor:
                            updated = anchor
                    elif draw < 0.05:  # cancelled before now, and before it starts
                        status = "cancelled"
                        limit = scheduled if scheduled < anchor else anchor
                        updated = created + int(random_() * (limit - created))
                    elif draw < 0.65:
                        status = "confirmed"
                        wait = (scheduled - created) // 2
                        updated = (
                            created
                            + 300
                            + int(random_() * (wait if wait < day_seconds else day_seconds))
                        )
                        if updated > anchor:
                            updated = anchor
                    else:
                        status = "pending"
                        updated = created
                    updated_text = (
                        day_text[updated // day_seconds] + time_text[updated % day_seconds]
                    )
                    if status == "completed":
                        tail = f"{updated_text}\t{updated_text}\t\\N\n"
                    elif status == "cancelled":
                        tail = f"{updated_text}\t\\N\t{updated_text}\n"
                    else:
                        tail = f"{updated_text}\t\\N\t\\N\n"
                    append(
                        f"{booking_id}{salon_text}{client_texts[client]}\t{professional_text}"
                        f"\t{service_text}\t{day_text[scheduled // day_seconds]}"
                        f"{time_text[scheduled % day_seconds]}\t{status}\t{price_text}"
                        f"\t{day_text[created // day_seconds]}{time_text[created % day_seconds]}"
                        f"\t{tail}"
                    )
                    if random_() < AUDITED_BOOKING_RATE:
                        audit_booking(
                            booking_id,
                            salon_id,
                            status,
                            price,
                            scheduled,
                            created,
                            updated,
                            client_ids[client],
                            professional_user,
                            owner_id,
                        )
                if len(lines) >= COPY_BATCH:
                    yield "".join(lines)
                    lines.clear()
            if day_total:
                bar.advance(task, day_total)
        if lines:
            yield "".join(lines)
        audit_lines.extend(audit.chunks())
        self.next_audit_id = audit.last_id

    def _available(self, salon: _Salon, day: int) -> list[list[tuple[str, int]]]:
        """Per category of the salon, (professional id as text, user id) of those working that
        day; senior professionals appear twice."""
        working = [p for p in salon.professionals if p.start_day <= day < p.end_day]
        steady = salon.professionals[:2]
        by_category: list[list[tuple[str, int]]] = []
        for category in range(len(salon.categories)):
            serving = [p for p in working if category in p.categories] or [
                p for p in steady if category in p.categories
            ]
            by_category.append(
                [(str(p.id), self.users[p.user].id) for p in serving for _ in range(p.weight)]
            )
        return by_category

    def _other_audit_lines(self) -> Iterator[str]:
        """Professionals leaving and price changes, for the audit trail to be varied."""
        rng = self._random("audit-other")
        writer = _AuditWriter(rng, self.next_audit_id, self.timestamps)
        for salon in self.salons:
            owner = self.users[salon.owner].id
            for professional in salon.professionals:
                if professional.end_day < self.days:
                    at = self.first_epoch + professional.end_day * DAY - rng.randrange(3600, DAY)
                    writer.event(
                        "professional",
                        professional.id,
                        "professional.deactivated",
                        owner,
                        f'{{"salon_id": {salon.id}, "reason": "left"}}',
                        at,
                    )
            for service in salon.services:
                if self.today_index and rng.random() < 0.1:
                    at = self.first_epoch + rng.randrange(self.today_index) * DAY
                    old = round(service.price_cents * rng.uniform(0.8, 0.95) / 50) * 50
                    writer.event(
                        "service",
                        service.id,
                        "service.price_changed",
                        owner,
                        f'{{"salon_id": {salon.id}, "old_price_cents": {old},'
                        f' "new_price_cents": {service.price_cents}}}',
                        at + rng.randrange(9 * 3600, 18 * 3600),
                    )
        yield from writer.chunks()


class _AuditWriter:
    """Audit event rows as COPY text; payloads carry ids, statuses and amounts, never emails."""

    CHANNELS = ("app", "app", "web", "phone")
    REASONS = ("client_request", "rescheduled", "illness", "salon_unavailable")

    def __init__(self, rng: random.Random, last_id: int, timestamps: _Timestamps) -> None:
        self.random = rng.random
        self.last_id = last_id
        self.format = timestamps.format
        self.lines: list[str] = []
        self.done: list[str] = []

    def event(
        self, entity: str, entity_id: int, event: str, actor: int, payload: str, at: int
    ) -> None:
        self.last_id += 1
        self.lines.append(
            f"{self.last_id}\t{entity}\t{entity_id}\t{event}\t{actor}\t{payload}"
            f"\t{self.format(at)}\n"
        )
        if len(self.lines) >= COPY_BATCH:
            self.done.append("".join(self.lines))
            self.lines.clear()

    def booking(
        self,
        booking_id: int,
        salon_id: int,
        status: str,
        price: int,
        scheduled: int,
        created: int,
        updated: int,
        client_id: int,
        professional_user: int,
        owner_id: int,
    ) -> None:
        """The booking's history: created, then confirmed, then how it ended."""
        event, random_ = self.event, self.random
        channel = self.CHANNELS[int(random_() * 4)]
        event(
            "booking",
            booking_id,
            "booking.created",
            client_id,
            f'{{"salon_id": {salon_id}, "status": "pending", "channel": "{channel}"}}',
            created,
        )
        if status == "pending":
            return
        if status == "cancelled":
            by_client = random_() < 0.8
            reason = self.REASONS[int(random_() * 4)]
            event(
                "booking",
                booking_id,
                "booking.cancelled",
                client_id if by_client else owner_id,
                f'{{"salon_id": {salon_id}, "to": "cancelled", "reason": "{reason}",'
                f' "by": "{"client" if by_client else "salon"}"}}',
                updated,
            )
            return
        confirmed = updated
        if status != "confirmed":
            confirmed = min(created + 300 + int(random_() * 3600), scheduled - 60)
        event(
            "booking",
            booking_id,
            "booking.confirmed",
            professional_user,
            f'{{"salon_id": {salon_id}, "from": "pending", "to": "confirmed"}}',
            max(confirmed, created),
        )
        if status == "completed":
            event(
                "booking",
                booking_id,
                "booking.completed",
                professional_user,
                f'{{"salon_id": {salon_id}, "from": "confirmed", "to": "completed",'
                f' "price_cents": {price}}}',
                updated,
            )
        elif status == "no_show":
            event(
                "booking",
                booking_id,
                "booking.no_show",
                professional_user,
                f'{{"salon_id": {salon_id}, "from": "confirmed", "to": "no_show"}}',
                updated,
            )

    def chunks(self) -> Iterator[str]:
        yield from self.done
        if self.lines:
            yield "".join(self.lines)


def local_day_starts(zone: str, first: date, days: int) -> list[int]:
    """Per local date from ``first``: the epoch to which adding a wall-clock time of that day
    (in seconds since midnight) gives its instant in the zone.

    DST switches happen at night, so the UTC offset at noon holds for any time from about
    04:00 on, which covers every time a booking is scheduled at.
    """
    tz = ZoneInfo(zone)
    starts = []
    for day in range(days):
        current = first + timedelta(days=day)
        offset = datetime(current.year, current.month, current.day, 12, tzinfo=tz).utcoffset()
        assert offset is not None
        starts.append(_epoch(current) - int(offset.total_seconds()))
    return starts


def _cumulative(weights: Iterable[float]) -> list[float]:
    total, out = 0.0, []
    for weight in weights:
        total += weight
        out.append(total)
    return out


def _epoch(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())


def _set_aside(
    cursor: psycopg.Cursor[TupleRow], table: LiteralString, *, foreign_keys: bool
) -> tuple[list[sql.SQL | sql.Composed], bool]:
    """Drop what slows a bulk load into the empty ``table`` and truncate it for COPY FREEZE.

    Set aside: every index but the primary key, unique constraints no foreign key relies on,
    and (with ``foreign_keys``) the table's own foreign keys. Returns the statements that put
    them back, from their catalog definitions, and whether the table could be truncated
    (nothing may reference it), which COPY FREEZE requires.
    """
    restore: list[sql.SQL | sql.Composed] = []
    name = sql.Identifier(table)
    indexes = cursor.execute(
        "SELECT i.relname, pg_get_indexdef(x.indexrelid) FROM pg_index x"
        " JOIN pg_class i ON i.oid = x.indexrelid"
        " WHERE x.indrelid = %s::regclass"
        " AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid)"
        " ORDER BY i.relname",
        (table,),
    ).fetchall()
    constraints = cursor.execute(
        "SELECT c.conname, pg_get_constraintdef(c.oid) FROM pg_constraint c"
        " WHERE c.conrelid = %(table)s::regclass"
        " AND (c.contype = 'f' AND %(foreign_keys)s"
        "  OR c.contype = 'u' AND NOT EXISTS (SELECT 1 FROM pg_constraint f"
        "   WHERE f.contype = 'f' AND f.confrelid = c.conrelid AND f.conindid = c.conindid))"
        " ORDER BY c.contype DESC, c.conname",
        {"table": table, "foreign_keys": foreign_keys},
    ).fetchall()
    for index_name, _ in indexes:
        cursor.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(index_name)))
    for constraint_name, _ in constraints:
        cursor.execute(
            sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                name, sql.Identifier(constraint_name)
            )
        )
    # TRUNCATE needs nothing to reference the table; then COPY can write frozen rows.
    referenced = cursor.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE confrelid = %s::regclass)", (table,)
    ).fetchone()
    truncated = bool(referenced and not referenced[0])
    if truncated:
        cursor.execute(sql.SQL("TRUNCATE {}").format(name))
    # The definitions come from the catalog, not from user input.
    restore += [sql.SQL(definition) for _, definition in indexes]
    restore += [
        sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
            name, sql.Identifier(constraint_name), sql.SQL(definition)
        )
        for constraint_name, definition in constraints
    ]
    return restore, truncated


def _vacuum(database_url: str) -> None:
    """Visibility map and statistics, so index-only scans and plans are right at once."""
    with psycopg.connect(libpq_url(database_url), autocommit=True) as connection:
        connection.execute(
            sql.SQL("VACUUM (ANALYZE) {}").format(sql.SQL(", ").join(map(sql.Identifier, TABLES)))
        )
