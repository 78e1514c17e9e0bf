"""Booking writes straight into PostgreSQL, in the salons the traffic favours: new bookings,
confirmations and cancellations, which the change stream folds and the cache drops."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from service.tools.simulate.traffic import Tally, ZipfChoice, sleep_until

CLIENT_SAMPLE = 2000


@dataclass(frozen=True, slots=True)
class Salon:
    id: int
    professionals: tuple[int, ...]
    services: tuple[tuple[int, int], ...]  # (service id, price in cents)


INSERT_BOOKING = """
INSERT INTO bookings (salon_id, client_id, professional_id, service_id, scheduled_at, status,
                      price_cents, completed_at, cancelled_at)
VALUES (%(salon)s, %(client)s, %(professional)s, %(service)s, %(at)s, %(status)s, %(price)s,
        CASE WHEN %(status)s = 'completed' THEN %(at)s::timestamptz END,
        CASE WHEN %(status)s = 'cancelled' THEN %(at)s::timestamptz END)
"""

# A pending booking gets confirmed, a confirmed one cancelled (the covering index on
# (salon_id, scheduled_at) finds them).
CHANGE_STATUS = """
WITH target AS (
    SELECT id, status FROM bookings
    WHERE salon_id = %(salon)s AND scheduled_at >= now() - interval '1 day'
      AND status IN ('pending', 'confirmed')
    ORDER BY scheduled_at LIMIT 1 OFFSET %(offset)s
)
UPDATE bookings AS b
SET status = CASE WHEN target.status = 'pending' THEN 'confirmed' ELSE 'cancelled' END,
    cancelled_at = CASE WHEN target.status = 'pending' THEN NULL ELSE now() END,
    updated_at = now()
FROM target WHERE b.id = target.id
RETURNING b.id
"""


def _new_booking(salon: Salon, client: int, rng: random.Random) -> dict[str, Any]:
    now = datetime.now(UTC)
    at = now + timedelta(minutes=15 * rng.randint(-20 * 96, 7 * 96))
    service, price = rng.choice(salon.services)
    if at > now:
        status = rng.choice(("pending", "confirmed"))
    else:
        status = rng.choices(("completed", "cancelled", "no_show"), weights=(87, 10, 3))[0]
    return {
        "salon": salon.id,
        "client": client,
        "professional": rng.choice(salon.professionals),
        "service": service,
        "at": at,
        "status": status,
        "price": price,
    }


async def write_loop(
    connection: psycopg.AsyncConnection[Any],
    writes_per_min: float,
    deadline: float,
    stop: asyncio.Event,
    salons: ZipfChoice,
    clients: ZipfChoice,
    rng: random.Random,
    tally: Tally,
) -> None:
    loop = asyncio.get_running_loop()
    interval = 60.0 / writes_per_min
    next_at = loop.time() + interval / 2
    while next_at < deadline:
        if await sleep_until(next_at, stop):
            return
        next_at += interval
        salon: Salon = salons()
        try:
            if rng.random() < 0.5:
                cursor = await connection.execute(
                    CHANGE_STATUS, {"salon": salon.id, "offset": rng.randint(0, 20)}
                )
                if await cursor.fetchone() is not None:
                    tally.updates += 1
                    tally.salons_written.add(salon.id)
                    continue
            await connection.execute(INSERT_BOOKING, _new_booking(salon, clients(), rng))
            tally.inserts += 1
            tally.salons_written.add(salon.id)
        except psycopg.Error:
            tally.write_errors += 1


async def load_salons(connection: psycopg.AsyncConnection[Any]) -> tuple[list[Salon], list[int]]:
    """Salons (by id), their active professionals and services; a sample of clients."""
    professionals: dict[int, list[int]] = {}
    services: dict[int, list[tuple[int, int]]] = {}
    cursor = await connection.execute(
        "SELECT salon_id, id FROM professionals WHERE is_active ORDER BY salon_id, id"
    )
    for salon_id, professional_id in await cursor.fetchall():
        professionals.setdefault(salon_id, []).append(professional_id)
    cursor = await connection.execute(
        "SELECT salon_id, id, price_cents FROM services ORDER BY salon_id, id"
    )
    for salon_id, service_id, price in await cursor.fetchall():
        services.setdefault(salon_id, []).append((service_id, price))
    cursor = await connection.execute("SELECT id FROM salons ORDER BY id")
    salons = [
        Salon(row[0], tuple(professionals.get(row[0], ())), tuple(services.get(row[0], ())))
        for row in await cursor.fetchall()
    ]
    cursor = await connection.execute(
        "SELECT id FROM users WHERE role = 'client' ORDER BY random() LIMIT %s", (CLIENT_SAMPLE,)
    )
    clients = [row[0] for row in await cursor.fetchall()]
    return salons, clients
