"""Tenant isolation under concurrency: no response ever carries another tenant's numbers.

Owners of different salons and an admin ask for the same reports with the same parameters at
the same time, through two app instances sharing one Redis (two workers): on a cold cache, on
a warm one, and while an external writer (plain SQL from psycopg) inserts, updates and deletes
bookings of those salons. Every body must belong to the tenant that asked.

The data is built so that numbers name their salon, even while the writer moves them:

- every price in salon number ``n`` is ``k * BASE + n``, so a report's revenue modulo ``BASE``
  equals its completed bookings times ``n`` — summing another salon's rows breaks that;
- salon ``n`` has about ``SPACING * n`` bookings in the period and the writer never moves a
  salon by more than ``DRIFT``, so booking counts fall in disjoint ranges;
- services, categories and professionals are the salon's own (ids and names).

Once the writer has stopped and both listeners have settled, every tenant's response (served
from the cache or computed afresh) must equal the naive baseline (``benchmarks/naive.py``)
computed from the database, and the platform-wide totals the sum over the salons.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg
import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session

from benchmarks.naive import naive_bookings, naive_dashboard, naive_professionals
from service.config import Settings
from service.reports.params import STATUSES, BookingFilters, Period, Scope
from service.reports.schemas import (
    BookingsReport,
    DashboardReport,
    ProfessionalsReport,
    ReportMeta,
)
from tests.conftest import Api, RunningApi, app_settings
from tests.support import SqlCounter, redis_client

PREFIX = "/api/v1/optimized-reports"
BASE = 10_000  # prices are k * BASE + the salon's number
SPACING = 25  # salon n has SPACING * n bookings in the period to start with
DRIFT = 10  # the writer keeps every salon within ±DRIFT bookings of its start
TIMEZONES = (
    "UTC",
    "Europe/Lisbon",
    "America/New_York",
    "Asia/Tokyo",
    "Australia/Sydney",
    "America/Sao_Paulo",
)
CLIENTS = 12
WAVES = 8  # storms while the writer runs
TODAY = datetime.now(UTC).date()
PERIOD = Period(TODAY - timedelta(days=59), TODAY)
# Bookings live two days inside the period on both sides, in every time zone above, so that
# the salons' local periods and the platform's UTC period hold the same bookings.
SAFE_FROM = datetime.combine(PERIOD.start + timedelta(days=2), datetime.min.time(), UTC)
SAFE_DAYS = PERIOD.days - 4

# The same parameters for every tenant: (report path, query parameters).
ASKS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("dashboard", {}),
    ("bookings", {"granularity": "week"}),
    ("bookings", {"granularity": "month", "status": "completed"}),
    ("professionals", {"limit": 50}),
)


@dataclass(frozen=True)
class Tenant:
    """One salon and what identifies its numbers."""

    salon_id: int
    number: int  # the residue of its prices modulo BASE
    timezone: str
    services: frozenset[int]
    categories: frozenset[str]
    professionals: frozenset[int]
    bookings: int  # in the period, before any write

    @property
    def lowest(self) -> int:
        return self.bookings - DRIFT

    @property
    def highest(self) -> int:
        return self.bookings + DRIFT


def price(rng: random.Random, number: int) -> int:
    return rng.randint(1, 9) * BASE + number


def moment(rng: random.Random) -> datetime:
    return SAFE_FROM + timedelta(minutes=rng.randrange(SAFE_DAYS * 24 * 60))


def build_tenants(db: psycopg.Connection, count: int) -> list[Tenant]:
    """``count`` salons whose figures identify them (see the module docstring)."""
    rng = random.Random(20261126)
    clients = [
        int(row[0])
        for row in db.execute(
            "INSERT INTO users (role, email) SELECT 'client', 'client' || i || '@example.test'"
            " FROM generate_series(1, %s) AS i RETURNING id",
            (CLIENTS,),
        )
    ]
    tenants = []
    for number in range(1, count + 1):
        timezone = TIMEZONES[(number - 1) % len(TIMEZONES)]
        row = db.execute(
            "INSERT INTO salons (name, timezone) VALUES (%s, %s) RETURNING id",
            (f"Salon {number}", timezone),
        ).fetchone()
        assert row is not None
        salon = int(row[0])
        services = {}
        for kind in ("a", "b"):
            category = f"category-{number}-{kind}"
            row = db.execute(
                "INSERT INTO services (salon_id, category, name, price_cents, duration_min)"
                " VALUES (%s, %s, %s, %s, 30) RETURNING id",
                (salon, category, f"service-{number}-{kind}", BASE + number),
            ).fetchone()
            assert row is not None
            services[int(row[0])] = category
        professionals = []
        for index in range(3):
            row = db.execute(
                "INSERT INTO professionals (salon_id, name) VALUES (%s, %s) RETURNING id",
                (salon, f"pro-{number}-{index}"),
            ).fetchone()
            assert row is not None
            professionals.append(int(row[0]))
        in_period = SPACING * number
        rows = []
        for index in range(in_period):
            rows.append(
                (
                    salon,
                    rng.choice(clients),
                    rng.choice(professionals),
                    rng.choice(list(services)),
                    moment(rng),
                    STATUSES[index % 5],
                    price(rng, number),
                )
            )
        for _ in range(3):  # before the period: some clients are returning ones
            rows.append(
                (
                    salon,
                    rng.choice(clients),
                    rng.choice(professionals),
                    rng.choice(list(services)),
                    SAFE_FROM - timedelta(days=90 + rng.randrange(30)),
                    "completed",
                    price(rng, number),
                )
            )
        with db.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO bookings (salon_id, client_id, professional_id, service_id,"
                " scheduled_at, status, price_cents) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                rows,
            )
        tenants.append(
            Tenant(
                salon,
                number,
                timezone,
                frozenset(services),
                frozenset(services.values()),
                frozenset(professionals),
                in_period,
            )
        )
    for one, other in itertools.pairwise(tenants):
        assert one.highest < other.lowest  # booking counts cannot be confused
    assert max(t.highest * t.number for t in tenants) < BASE  # nor residues overflow
    return tenants


# -- the external writer ------------------------------------------------------------------


@dataclass
class Writer:
    """Plain-SQL writes to the tenants' bookings from a thread, as another service would."""

    dsn: str
    tenants: list[Tenant]
    clients: list[int]
    writes: Counter[str] = field(default_factory=Counter)
    error: BaseException | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="isolation-writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop writing (and wait for the last statement); re-raise what the thread hit."""
        self._stop.set()
        assert self._thread is not None
        self._thread.join(10)
        assert not self._thread.is_alive()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as connection:
                self._write(connection)
        except BaseException as error:  # handed to the test by stop()
            self.error = error

    def _write(self, db: psycopg.Connection) -> None:
        rng = random.Random(7)
        drift = dict.fromkeys((t.salon_id for t in self.tenants), 0)
        pick = (
            "SELECT id FROM bookings WHERE salon_id = %s AND scheduled_at >= %s"
            " ORDER BY random() LIMIT 1"
        )
        while not self._stop.is_set():
            tenant = rng.choice(self.tenants)
            salon = tenant.salon_id
            action = rng.choice(("insert", "update", "delete", "update-two"))
            if action == "insert" and drift[salon] < DRIFT:
                status = rng.choice(STATUSES)
                db.execute(
                    "INSERT INTO bookings (salon_id, client_id, professional_id, service_id,"
                    " scheduled_at, status, price_cents)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    (
                        salon,
                        rng.choice(self.clients),
                        rng.choice(sorted(tenant.professionals)),
                        rng.choice(sorted(tenant.services)),
                        moment(rng),
                        status,
                        price(rng, tenant.number),
                    ),
                )
                drift[salon] += 1
            elif action == "delete" and drift[salon] > -DRIFT:
                db.execute(f"DELETE FROM bookings WHERE id = ({pick})", (salon, SAFE_FROM))
                drift[salon] -= 1
            elif action == "update":
                db.execute(
                    "UPDATE bookings SET status = %s, price_cents = %s, updated_at = now()"
                    f" WHERE id = ({pick})",
                    (rng.choice(STATUSES), price(rng, tenant.number), salon, SAFE_FROM),
                )
            elif action == "update-two":  # one statement, two salons: one notification
                other = rng.choice([t for t in self.tenants if t is not tenant])
                db.execute(
                    "UPDATE bookings SET price_cents = price_cents %% %s + %s, updated_at = now()"
                    f" WHERE id IN (({pick}), ({pick}))",
                    (BASE, BASE * rng.randint(1, 9), salon, SAFE_FROM, other.salon_id, SAFE_FROM),
                )
            else:
                continue
            self.writes[action] += 1
            time.sleep(rng.uniform(0.003, 0.015))


async def stop_soon(writer: Writer) -> None:
    await asyncio.sleep(0.02)
    await asyncio.to_thread(writer.stop)


# -- what a body may contain ----------------------------------------------------------------


def check_salon_body(report: str, params: dict[str, Any], body: Any, tenant: Tenant) -> None:
    """Everything in ``body`` is ``tenant``'s, even if its exact numbers are moving."""
    meta = body["meta"]
    assert meta["salon_id"] == tenant.salon_id
    assert meta["timezone"] == tenant.timezone
    assert (meta["start"], meta["end"]) == (PERIOD.start.isoformat(), PERIOD.end.isoformat())
    if report == "dashboard":
        total, completed = body["bookings_total"], body["by_status"]["completed"]
        revenue = body["revenue_cents"]
        assert sum(body["by_status"].values()) == total
        assert sum(day["bookings"] for day in body["daily"]) == total
        assert {s["service_id"] for s in body["top_services"]} <= tenant.services
    elif report == "bookings":
        series = body["series"]
        total = sum(point["bookings"] for point in series)
        completed = sum(point["completed"] for point in series)
        revenue = sum(point["revenue_cents"] for point in series)
        assert {c["category"] for c in body["by_category"]} <= tenant.categories
        assert sum(c["revenue_cents"] for c in body["by_category"]) == revenue
        assert sum(h["bookings"] for h in body["by_hour"]) == total
    else:
        items = body["items"]
        assert {item["professional_id"] for item in items} == tenant.professionals
        assert all(item["name"].startswith(f"pro-{tenant.number}-") for item in items)
        total = sum(item["bookings"] for item in items)
        completed = sum(item["completed"] for item in items)
        revenue = sum(item["revenue_cents"] for item in items)
    if params.get("status") == "completed":
        assert total == completed  # a subset of the bookings: no range to hold it to
    else:
        assert tenant.lowest <= total <= tenant.highest, (tenant.number, total)
    # the residue of the revenue names whose rows were summed
    assert revenue % BASE == completed * tenant.number, (tenant.number, revenue, completed)


def check_platform_body(report: str, body: Any, tenants: list[Tenant]) -> None:
    assert body["meta"]["salon_id"] is None
    assert body["meta"]["timezone"] == "UTC"
    if report == "dashboard":
        lowest = sum(t.lowest for t in tenants)
        highest = sum(t.highest for t in tenants)
        assert lowest <= body["bookings_total"] <= highest
    elif report == "professionals":
        everyone = frozenset().union(*(t.professionals for t in tenants))
        assert {item["professional_id"] for item in body["items"]} == everyone


# -- the load -----------------------------------------------------------------------------


@dataclass
class Ask:
    """One request: who asks which report for which salon, and what the answer must be."""

    token: str
    report: str
    params: dict[str, Any]
    salon: int | None
    tenant: Tenant | None  # whose data the answer must carry; None for platform-wide
    allowed: bool


@dataclass
class Tally:
    """What one phase saw."""

    requests: int = 0
    forbidden: int = 0
    cache: Counter[str] = field(default_factory=Counter)


class Crowd:
    """Owners of every salon, an owner of two, and an admin, against two app instances."""

    def __init__(self, workers: list[Api], tenants: list[Tenant]) -> None:
        self.workers = workers
        self.tenants = tenants
        first = workers[0]
        self.admin = first.token("admin")
        self.owners = {t.salon_id: first.token("owner", [t.salon_id]) for t in tenants}
        self.pair = first.token("owner", [tenants[0].salon_id, tenants[1].salon_id])
        self.rng = random.Random(3)

    def round(self) -> list[Ask]:
        """Every tenant asks every report with the same parameters; owners also try others'."""
        asks = []
        tenants = self.tenants
        for report, params in ASKS:
            for index, tenant in enumerate(tenants):
                salon = tenant.salon_id
                owner = self.owners[salon]
                asks.append(Ask(owner, report, params, salon, tenant, True))
                asks.append(Ask(self.admin, report, params, salon, tenant, True))
                neighbour = tenants[(index + 1) % len(tenants)].salon_id
                asks.append(Ask(owner, report, params, neighbour, None, False))
                asks.append(Ask(owner, report, params, None, None, False))
            for tenant in tenants[:2]:
                asks.append(Ask(self.pair, report, params, tenant.salon_id, tenant, True))
            asks.append(Ask(self.pair, report, params, tenants[2].salon_id, None, False))
            asks.append(Ask(self.admin, report, params, None, None, True))
        self.rng.shuffle(asks)
        return asks

    async def send(self, ask: Ask, worker: Api) -> tuple[str, Any]:
        params = dict(ask.params, start=PERIOD.start.isoformat(), end=PERIOD.end.isoformat())
        if ask.salon is not None:
            params["salon_id"] = ask.salon
        response = await worker.report(ask.report, ask.token, **params)
        if not ask.allowed:
            assert response.status_code == 403, response.text
            assert response.json()["error"]["code"] == "forbidden"
            return "forbidden", None
        assert response.status_code == 200, response.text
        body = response.json()
        if ask.tenant is not None:
            check_salon_body(ask.report, ask.params, body, ask.tenant)
        else:
            check_platform_body(ask.report, body, self.tenants)
        return response.headers["x-cache"], body

    async def storm(self, rounds: int, tally: Tally) -> None:
        """``rounds`` rounds at once, each request on a randomly chosen worker."""
        asks = [ask for _ in range(rounds) for ask in self.round()]
        results = await asyncio.gather(
            *[self.send(ask, self.rng.choice(self.workers)) for ask in asks]
        )
        tally.requests += len(results)
        for result, _ in results:
            if result == "forbidden":
                tally.forbidden += 1
            else:
                tally.cache[result] += 1


# -- fixtures and helpers -------------------------------------------------------------------


class Clock:
    """Seconds spent per phase, for the summary line."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.monotonic()

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.laps[name] = round(now - self._last, 1)
        self._last = now


@pytest.fixture
def sync_engine(database_url: str) -> Iterator[Engine]:
    engine = create_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
async def workers(
    base_settings: Settings, database_url: str, clean_db: str, redis_url: str
) -> AsyncIterator[list[Api]]:
    """Two app instances on one database and one Redis: two workers of one deployment."""
    # A shared CI machine is slow at times: waiting for a pooled connection must not turn
    # into a 503 in a test that is about whose data is served.
    settings = app_settings(base_settings, database_url, redis_url, pool_timeout=15.0)
    async with RunningApi(settings) as one, RunningApi(settings) as two:
        yield [one, two]


async def settle(workers: list[Api]) -> None:
    """Every notification sent so far has been applied by every worker's listener."""
    for worker in workers:
        listener = worker.resources.listener
        assert listener is not None
        await listener.settle()


def make_cold(workers: list[Api]) -> None:
    """Empty Redis and every worker's in-process tier (nothing may be in flight)."""
    client = redis_client(workers[0].settings.redis_url)
    client.flushdb()
    client.close()
    for worker in workers:
        worker.resources.cache.local.drop()


def expected_body(
    engine: Engine, report: str, params: dict[str, Any], tenant: Tenant | None
) -> Any:
    """The response a fresh computation from the database gives (the naive baseline)."""
    scope = Scope(None) if tenant is None else Scope(tenant.salon_id, tenant.timezone)
    meta = ReportMeta(
        salon_id=scope.salon_id, timezone=scope.timezone, start=PERIOD.start, end=PERIOD.end
    )
    with Session(engine) as session:
        if report == "dashboard":
            model: Any = DashboardReport(meta=meta, **naive_dashboard(session, scope, PERIOD))
        elif report == "bookings":
            filters = BookingFilters(status=params.get("status"))
            data = naive_bookings(session, scope, PERIOD, params["granularity"], filters)
            model = BookingsReport(meta=meta, **data)
        else:
            items = naive_professionals(session, scope, PERIOD)
            model = ProfessionalsReport(meta=meta, items=items, next_cursor=None)
    return orjson.loads(orjson.dumps(model.model_dump()))


# -- the test -----------------------------------------------------------------------------


async def test_tenants_only_ever_see_their_own_numbers(
    workers: list[Api], db: psycopg.Connection, sync_engine: Engine, dsn: str
) -> None:
    clock = Clock()
    tenants = build_tenants(db, 6)
    clients = [int(row[0]) for row in db.execute("SELECT id FROM users ORDER BY id")]
    await settle(workers)  # the set-up's own notifications are behind us
    crowd = Crowd(workers, tenants)
    keys = len(ASKS) * (2 * len(tenants) + 1)  # owner and admin per salon, plus platform

    # Cold: every key computed once across both workers, however many ask at once.
    make_cold(workers)
    cold = Tally()
    counters = [SqlCounter(worker) for worker in workers]
    await crowd.storm(3, cold)
    for counter in counters:
        counter.close()
    assert sum(counter.count for counter in counters) == keys
    assert cold.cache["MISS"] >= 1
    assert set(cold.cache) <= {"MISS", "HIT"}

    clock.lap("cold")

    # Warm: all hits, still each tenant's own.
    warm = Tally()
    await crowd.storm(3, warm)
    assert set(warm.cache) == {"HIT"}

    clock.lap("warm")

    # While an external writer changes the bookings of every salon; the admin clears the cache
    # now and then, so cold misses race the writes too.
    busy = Tally()
    writer = Writer(dsn, tenants, clients)
    writer.start()
    try:
        for wave in range(WAVES):
            if wave == WAVES - 1:  # the last writes land while this storm is in flight
                await asyncio.gather(crowd.storm(2, busy), stop_soon(writer))
                break
            await crowd.storm(2, busy)
            if wave % 3 == 2:
                response = await workers[wave % 2].http.post(
                    f"{PREFIX}/cache/clear", headers={"Authorization": f"Bearer {crowd.admin}"}
                )
                assert response.status_code == 200, response.text
            await asyncio.sleep(0.1)
    finally:
        writer.stop()
    assert sum(writer.writes.values()) >= 50, writer.writes
    assert set(writer.writes) == {"insert", "update", "delete", "update-two"}
    assert busy.cache["MISS"] >= 1  # the writes did invalidate
    assert busy.cache["HIT"] >= 1

    clock.lap("writes")

    # Settled: whatever each worker serves now — left over from the storm, a hit, or computed
    # afresh on an empty cache — is exactly what the database says.
    await settle(workers)
    final = Tally()
    expectations = {
        (index, None if tenant is None else tenant.salon_id): expected_body(
            sync_engine, report, params, tenant
        )
        for index, (report, params) in enumerate(ASKS)
        for tenant in [*tenants, None]
    }
    for attempt in ("as left", "again", "cold", "warm"):
        if attempt == "cold":
            make_cold(workers)
        asks = crowd.round()
        results = await asyncio.gather(
            *[crowd.send(ask, workers[n % 2]) for n, ask in enumerate(asks)]
        )
        for ask, (result, body) in zip(asks, results, strict=True):
            final.requests += 1
            if result == "forbidden":
                final.forbidden += 1
                continue
            final.cache[result] += 1
            index = ASKS.index((ask.report, ask.params))
            assert body == expectations[index, ask.salon], (attempt, ask.report, ask.salon)
        served = Counter(r for r, _ in results if r != "forbidden")
        if attempt == "again":
            assert served["HIT"] > 0
        elif attempt == "warm":  # nothing was written since the cold attempt filled every key
            assert set(served) == {"HIT"}
    assert final.cache["MISS"] >= keys  # the cold attempt computed every key afresh

    clock.lap("settled")

    # Platform-wide totals are the sum over the salons (the responses equal these bodies).
    for index, (report, _) in enumerate(ASKS):
        platform = expectations[index, None]
        salons = [expectations[index, t.salon_id] for t in tenants]
        if report == "dashboard":
            for name in ("bookings_total", "revenue_cents"):
                assert platform[name] == sum(body[name] for body in salons)
            for status in STATUSES:
                assert platform["by_status"][status] == sum(
                    body["by_status"][status] for body in salons
                )
        elif report == "bookings":
            for name in ("bookings", "completed", "cancelled", "no_show", "revenue_cents"):
                assert sum(p[name] for p in platform["series"]) == sum(
                    p[name] for body in salons for p in body["series"]
                )
        else:
            ranked = "revenue_rank"  # ranks span the scope, so they differ; the rest adds up
            assert [{k: v for k, v in i.items() if k != ranked} for i in platform["items"]] == [
                {k: v for k, v in i.items() if k != ranked}
                for i in sorted(
                    (i for body in salons for i in body["items"]),
                    key=lambda i: i["professional_id"],
                )
            ]

    # Every owner's attempt at another salon, or at the platform, was refused.
    # (per report: each owner at its neighbour and at the platform, the pair owner at a third)
    refused = len(ASKS) * (2 * len(tenants) + 1)
    for tally, rounds in ((cold, 3), (warm, 3), (busy, 2 * WAVES), (final, 4)):
        assert tally.forbidden == refused * rounds
    total = sum(t.requests for t in (cold, warm, busy, final))
    print(
        f"isolation: {len(tenants)} salons, {total} requests "
        f"({sum(t.forbidden for t in (cold, warm, busy, final))} refused), "
        f"{sum(writer.writes.values())} writes {dict(writer.writes)}, "
        f"cache cold={dict(cold.cache)} warm={dict(warm.cache)} busy={dict(busy.cache)} "
        f"final={dict(final.cache)}; seconds {clock.laps}"
    )
