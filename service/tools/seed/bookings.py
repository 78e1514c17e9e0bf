"""The bookings of a plan as COPY text, in id order: the seed's hot loop, in steps.

For each day and salon with bookings: ``_start_minutes`` draws the local start times (mostly
within opening hours, as often as ``HOUR_DEMAND`` says), then for each booking, in start
order, the service and a professional working that day who serves its category,
``_created_at`` (booked hours to weeks ahead, never before the client signed up nor after
now), an occasional discount, and ``_status`` (how it ended, or stands, and when that was
last updated). About one booking in eight also gets its history in the audit trail.

Everything that can be is looked up or formatted once, before the loop (``_Lookups``): ids as
text, timestamps as two table look-ups. The random draws happen in a fixed order, so the same
seed gives the same rows.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Callable, Iterator
from datetime import timedelta

from rich.progress import Progress, TaskID

from service.tools.seed.audit import AuditWriter
from service.tools.seed.catalog import (
    AUDITED_BOOKING_RATE,
    COPY_BATCH,
    DAY,
    DISCOUNT_RATE,
    HOUR_DEMAND,
    OUT_OF_HOURS_RATE,
    SLOT_TABLE_SIZE,
)
from service.tools.seed.entities import Salon, Timestamps, cumulative, local_day_starts
from service.tools.seed.plan import Plan

Draw = Callable[[], float]


def slot_tables(salon: Salon) -> list[list[int] | None]:
    """Per weekday, SLOT_TABLE_SIZE start minutes (quarter hours from opening to 45 minutes
    before closing, as often as HOUR_DEMAND says): a uniform index into it draws a start."""
    tables: list[list[int] | None] = []
    for hours in salon.hours:
        if hours is None:
            tables.append(None)
            continue
        opens, closes = hours
        slots = list(range(opens, closes - 45 + 1, 15))
        running = []
        total = 0.0
        for minute in slots:
            total += HOUR_DEMAND[minute // 60]
            running.append(total)
        tables.append(
            [
                slots[bisect.bisect_right(running, (q + 0.5) / SLOT_TABLE_SIZE * total)]
                for q in range(SLOT_TABLE_SIZE)
            ]
        )
    return tables


def available(plan: Plan, salon: Salon, day: int) -> list[list[tuple[str, int]]]:
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
            [(str(p.id), plan.users[p.user].id) for p in serving for _ in range(p.weight)]
        )
    return by_category


class _Lookups:
    """What the loop reads, prepared once: per salon and per client."""

    def __init__(self, plan: Plan, timestamps: Timestamps) -> None:
        first_day = plan.first_epoch // DAY
        # Every timestamp of a booking lies between 46 days before the period and its end.
        self.day_text = {d: timestamps[d] for d in range(first_day - 47, first_day + plan.days + 2)}
        self.time_text = timestamps.time_of_day
        users = plan.users
        self.client_ids = [users[u].id if u >= 0 else 0 for u in plan.client_users]
        self.client_texts = [str(i) for i in self.client_ids]
        self.signups = plan.client_signups
        self.day_starts = {
            s.timezone: local_day_starts(s.timezone, plan.first_date, plan.days)
            for s in plan.salons
        }
        self.slot_tables = [slot_tables(s) for s in plan.salons]
        self.services = [
            [
                (str(v.id), v.category, v.price_cents, str(v.price_cents), v.duration_min * 60)
                for v in s.services
            ]
            for s in plan.salons
        ]
        self.service_cumulative = [cumulative(v.weight for v in s.services) for s in plan.salons]
        self.owner_ids = [users[s.owner].id for s in plan.salons]
        # Days on which a salon's team changes (someone joins or leaves).
        self.changes = [
            {p.start_day for p in s.professionals} | {p.end_day for p in s.professionals}
            for s in plan.salons
        ]

    def text(self, epoch: int) -> str:
        return self.day_text[epoch // DAY] + self.time_text[epoch % DAY]


def _start_minutes(draw: Draw, count: int, slots: list[int], opens: int, closes: int) -> list[int]:
    """``count`` local start times (minutes after midnight), sorted: from the slot table, or,
    rarely, up to an hour before opening or just after closing."""
    minutes = []
    for _ in range(count):
        if draw() < OUT_OF_HOURS_RATE:
            minutes.append(
                opens - 60 + 15 * int(draw() * 4) if draw() < 0.5 else closes + 15 * int(draw() * 3)
            )
        else:
            minutes.append(slots[int(draw() * SLOT_TABLE_SIZE)])
    minutes.sort()
    return minutes


def _created_at(draw: Draw, scheduled: int, anchor: int, signup: int) -> int:
    """When it was booked: 30 min to 6 h, a day to a week, or one to six weeks ahead; before
    now (``anchor``) and at least 10 minutes after the client signed up."""
    kind = draw()
    if kind < 0.2:
        lead = 1800 + int(draw() * 21_600)
    elif kind < 0.7:
        lead = DAY + int(draw() * 518_400)
    else:
        lead = 604_800 + int(draw() * 3_283_200)
    created = scheduled - lead
    if created > anchor - 60:  # booked for next week: booked before now
        created = anchor - 60 - int(draw() * (lead if lead < 1_209_600 else 1_209_600))
    if created < signup + 600:
        created = signup + 600
    return created


def _status(
    draw: Draw,
    scheduled: int,
    created: int,
    end: int,
    anchor: int,
    cancel_rate: float,
    no_show_rate: float,
) -> tuple[str, int]:
    """Its status and when it was last updated: past bookings completed, cancelled or no-show
    (``no_show_rate`` is cumulative over ``cancel_rate``); future ones mostly pending or
    confirmed, a few cancelled already. Nothing is updated after now."""
    roll = draw()
    if end <= anchor:
        if roll < cancel_rate:
            status = "cancelled"
            updated = created + int(draw() * (scheduled - created))
        elif roll < no_show_rate:
            status = "no_show"
            updated = end + 1800
        else:
            status = "completed"
            updated = end + int(draw() * 900)
        return status, updated if updated <= anchor else anchor
    if roll < 0.05:  # cancelled before now, and before it starts
        limit = scheduled if scheduled < anchor else anchor
        return "cancelled", created + int(draw() * (limit - created))
    if roll < 0.65:
        wait = (scheduled - created) // 2
        updated = created + 300 + int(draw() * (wait if wait < DAY else DAY))
        return "confirmed", updated if updated <= anchor else anchor
    return "pending", created


class BookingRows:
    """The COPY text of a plan's bookings (``chunks``); their audit lines go to ``audit``."""

    def __init__(self, plan: Plan, timestamps: Timestamps) -> None:
        self.plan = plan
        self.look = _Lookups(plan, timestamps)
        self.audit = AuditWriter(plan.stream("audit"), plan.start.audit_events, timestamps)

    def chunks(
        self, counts: list[array[int]], client_choices: array[int], bar: Progress, task: TaskID
    ) -> Iterator[str]:
        plan = self.plan
        draw = plan.stream("bookings").random
        available_now: list[list[list[tuple[str, int]]]] = [[] for _ in plan.salons]
        booking_id = plan.start.bookings
        clients = iter(client_choices)
        lines: list[str] = []
        for day in range(plan.days):
            weekday = (plan.first_date + timedelta(days=day)).weekday()
            day_total = 0
            for salon_index, count in enumerate(counts[day]):
                salon = plan.salons[salon_index]
                if day == 0 or day in self.look.changes[salon_index]:
                    available_now[salon_index] = available(plan, salon, day)
                if not count:
                    continue
                day_total += count
                for line in self._salon_day(
                    draw, salon_index, day, weekday, count, available_now[salon_index], clients,
                    booking_id,
                ):  # fmt: skip
                    lines.append(line)
                booking_id += count
                if len(lines) >= COPY_BATCH:
                    yield "".join(lines)
                    lines.clear()
            if day_total:
                bar.advance(task, day_total)
        if lines:
            yield "".join(lines)

    def _salon_day(
        self,
        draw: Draw,
        salon_index: int,
        day: int,
        weekday: int,
        count: int,
        by_category: list[list[tuple[str, int]]],
        clients: Iterator[int],
        last_id: int,
    ) -> Iterator[str]:
        """The ``count`` bookings of one salon on one day, ids after ``last_id``."""
        look, salon, anchor = self.look, self.plan.salons[salon_index], self.plan.anchor
        local_midnight = look.day_starts[salon.timezone][day]
        # A closed weekday only gets bookings in a tiny all-closed period (see plan_volume);
        # those follow Tuesday's hours, when every salon is open.
        slots = look.slot_tables[salon_index][weekday] or look.slot_tables[salon_index][1]
        assert slots is not None
        opens, closes = salon.hours[weekday] or salon.hours[1] or (9 * 60, 19 * 60)
        salon_text = f"\t{salon.id}\t"
        services, running = look.services[salon_index], look.service_cumulative[salon_index]
        no_show_rate = salon.cancel_rate + salon.no_show_rate
        booking_id = last_id
        for minute in _start_minutes(draw, count, slots, opens, closes):
            booking_id += 1
            scheduled = local_midnight + minute * 60
            service_text, category, price, price_text, duration = services[
                bisect.bisect_right(running, draw() * running[-1])
            ]
            pros = by_category[category]
            professional_text, professional_user = pros[int(draw() * len(pros))]
            client = next(clients)
            created = _created_at(draw, scheduled, anchor, look.signups[client])
            if draw() < DISCOUNT_RATE:
                price = int(price * (0.7 + 0.2 * draw())) // 50 * 50
                price_text = str(price)
            status, updated = _status(
                draw, scheduled, created, scheduled + duration, anchor, salon.cancel_rate,
                no_show_rate,
            )  # fmt: skip
            updated_text = look.text(updated)
            if status == "completed":
                tail = f"{updated_text}\t{updated_text}\t\\N\n"
            elif status == "cancelled":
                tail = f"{updated_text}\t\\N\t{updated_text}\n"
            else:
                tail = f"{updated_text}\t\\N\t\\N\n"
            yield (
                f"{booking_id}{salon_text}{look.client_texts[client]}\t{professional_text}"
                f"\t{service_text}\t{look.text(scheduled)}\t{status}\t{price_text}"
                f"\t{look.text(created)}\t{tail}"
            )
            if draw() < AUDITED_BOOKING_RATE:
                self.audit.booking(
                    booking_id,
                    salon.id,
                    status,
                    price,
                    scheduled,
                    created,
                    updated,
                    look.client_ids[client],
                    professional_user,
                    look.owner_ids[salon_index],
                )
