"""The plan of a dataset, drawn from the seed before anything is written, step by step:

1. ``plan_structure``: salons (time zone, opening hours, weight), their services and
   professionals, owners and admins;
2. ``plan_volume``: how many bookings each salon gets each day (exactly the total asked for);
3. ``plan_clients``: candidate clients per salon, with a signup time and a Pareto visit rate
   (a few regulars, many one-off visitors), some shared with a neighbouring salon;
4. ``draw_clients``: the client of every booking, in booking order;
5. ``assign_user_ids``: clients who book become users; user ids follow signup order.

Each step draws from its own random stream (``Plan.random``), so changing how one step draws
leaves the others' data alone.
"""

from __future__ import annotations

import bisect
import math
import random
from array import array
from datetime import date, timedelta

from service.tools.seed.catalog import (
    CATALOG,
    CATEGORIES,
    CATEGORY_POPULARITY,
    CLIENTS_PER_BOOKING,
    DAY,
    FIRST_NAMES,
    FUTURE_DAYS,
    LAST_NAMES,
    MONTH_DEMAND,
    SALON_KINDS,
    SALON_WORDS,
    SHARED_CLIENT_SHARE,
    TIMEZONE_WEIGHTS,
    TIMEZONES,
    USER_ROLE_ORDER,
    VISIT_RATE_CAP,
    VISIT_RATE_SHAPE,
    WEEKDAY_DEMAND,
)
from service.tools.seed.entities import (
    Professional,
    Salon,
    Service,
    Start,
    User,
    cumulative,
    epoch_of,
)


class Plan:
    """Plans the dataset from the seed (see the module docstring for the steps)."""

    def __init__(
        self,
        *,
        random_seed: int,
        bookings: int,
        salons: int,
        days: int,
        today: date,
        start: Start,
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
        self.first_epoch = epoch_of(self.first_date)
        self.anchor = epoch_of(today)  # midnight UTC today: nothing but scheduled_at after it
        self.users: list[User] = []
        self.salons: list[Salon] = []
        self.client_users: list[int] = []  # global client index -> index into users
        self.client_signups: list[int] = []
        self.client_rates: list[float] = []

    def stream(self, purpose: str) -> random.Random:
        # One stream per purpose: changing how bookings are drawn leaves salons alone.
        return random.Random(f"salon-reports:{self.seed}:{purpose}")

    def run(self) -> tuple[list[array[int]], array[int]]:
        """Every step in order; returns the bookings per day and salon, and their clients."""
        self.plan_structure()
        counts = self.plan_volume()
        self.plan_clients()
        client_choices = self.draw_clients(counts)
        self.assign_user_ids(client_choices)
        return counts, client_choices

    def plan_structure(self) -> None:
        """Salons, their hours, services and professionals, owners and admins."""
        rng = self.stream("structure")
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
            salon = Salon(
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
    def _plan_services(rng: random.Random, salon: Salon, last_id: int) -> None:
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
                    Service(
                        id=last_id,
                        category=category_index,
                        name=name,
                        price_cents=price,
                        duration_min=duration,
                        weight=popularity * CATEGORY_POPULARITY[category] * rng.uniform(0.6, 1.4),
                    )
                )

    def _plan_professionals(self, rng: random.Random, salon: Salon, last_id: int) -> None:
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
            professional = Professional(
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
        self.users.append(User(role=role, created_at=created_at))
        return len(self.users) - 1

    def plan_volume(self) -> list[array[int]]:
        """Bookings per day and salon (exactly ``total_bookings`` in all)."""
        rng = self.stream("volume")
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
        rng = self.stream("clients")
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
        self, salon: Salon, own: list[int], shared: dict[int, None], rng: random.Random
    ) -> None:
        # Visiting another salon is occasional: a lower rate than at the home salon.
        signups = self.client_signups
        rates = {c: self.client_rates[c] for c in own}
        rates.update({c: rng.uniform(0.5, 1.5) for c in shared if c not in rates})
        ordered = [c for _, c in sorted((signups[c], c) for c in rates)]
        salon.clients = ordered
        salon.client_cumulative = cumulative(rates[c] for c in ordered)
        # A client books from the second day after signing up (signup_day < day - 1), which
        # keeps every booking after the signup whatever the salon's UTC offset.
        first_epoch = self.first_epoch
        salon.client_signup_days = [(signups[c] - first_epoch) // DAY for c in ordered]

    def draw_clients(self, counts: list[array[int]]) -> array[int]:
        """The client (global index) of every booking, in booking order."""
        rng = self.stream("bookings-clients")
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
