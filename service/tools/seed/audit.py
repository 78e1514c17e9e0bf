"""The audit trail as COPY text: each audited booking's history, and other events
(professionals leaving, price changes). Payloads carry ids, statuses and amounts, never emails.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from service.tools.seed.catalog import COPY_BATCH, DAY
from service.tools.seed.entities import Timestamps
from service.tools.seed.plan import Plan


class AuditWriter:
    """Audit event rows as COPY text; payloads carry ids, statuses and amounts, never emails."""

    CHANNELS = ("app", "app", "web", "phone")
    REASONS = ("client_request", "rescheduled", "illness", "salon_unavailable")

    def __init__(self, rng: random.Random, last_id: int, timestamps: Timestamps) -> None:
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


def other_audit_lines(plan: Plan, last_id: int, timestamps: Timestamps) -> Iterator[str]:
    """Professionals leaving and price changes, for the audit trail to be varied."""
    rng = plan.stream("audit-other")
    writer = AuditWriter(rng, last_id, timestamps)
    for salon in plan.salons:
        owner = plan.users[salon.owner].id
        for professional in salon.professionals:
            if professional.end_day < plan.days:
                at = plan.first_epoch + professional.end_day * DAY - rng.randrange(3600, DAY)
                writer.event(
                    "professional",
                    professional.id,
                    "professional.deactivated",
                    owner,
                    f'{{"salon_id": {salon.id}, "reason": "left"}}',
                    at,
                )
        for service in salon.services:
            if plan.today_index and rng.random() < 0.1:
                at = plan.first_epoch + rng.randrange(plan.today_index) * DAY
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
