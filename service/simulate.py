"""``salon-reports simulate``: light, bounded traffic against the service on this machine.

So that the performance page, the traces and the cache invalidation have something to show:

- report requests at ``rps``, open loop (one starts every ``1/rps`` seconds whether or not the
  earlier ones have answered, at most ``MAX_IN_FLIGHT`` at once), in a Zipf mix — a few salons,
  date windows and reports get most of the traffic, as with real clients — plus a few
  platform-wide ones, with an admin token signed with this configuration's secret;
- booking writes straight into PostgreSQL at ``writes_per_min`` (new bookings, and pending or
  confirmed ones confirmed or cancelled) in the salons the traffic favours: any writer fires
  the ``bookings`` triggers, so these invalidate the cached reports of their salon.

It runs ``duration`` seconds (Ctrl-C ends it early), then returns a summary: requests, status
codes, the hit ratio seen in ``X-Cache``, client-side latency and the writes. It only talks to a
loopback address and to the database of the configuration it is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit

import click
import httpx
import psycopg

from service.auth import issue_token
from service.config import Settings, get_settings
from service.db import libpq_url
from service.paths import API_PREFIX
from service.reports.names import ReportName

# Ranked by popularity; the Zipf weights make the first of each list the most requested.
REPORTS = tuple(ReportName)
# (days, ending this many days ago)
WINDOWS = ((30, 0), (7, 0), (90, 0), (365, 0), (30, 30), (14, 0), (180, 0), (7, 7))
ZIPF_EXPONENT = 1.1
PLATFORM_SHARE = 0.03  # platform-wide requests: the slow, year-long queries
MAX_IN_FLIGHT = 64
REQUEST_TIMEOUT_SECONDS = 10.0
DRAIN_SECONDS = 5.0
PROGRESS_EVERY_SECONDS = 10.0
CLIENT_SAMPLE = 2000

T = TypeVar("T")


class SimulationError(click.ClickException):
    """Nothing to simulate against: the command says why and exits 1 without a traceback."""


@dataclass(frozen=True, slots=True)
class Salon:
    id: int
    professionals: tuple[int, ...]
    services: tuple[tuple[int, int], ...]  # (service id, price in cents)


@dataclass
class Tally:
    """What happened, for the summary."""

    sent: int = 0
    skipped: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    cache: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    inserts: int = 0
    updates: int = 0
    write_errors: int = 0
    salons_written: set[int] = field(default_factory=set)

    @property
    def answered(self) -> int:
        return sum(count for status, count in self.statuses.items() if status.isdigit())

    @property
    def failed(self) -> int:
        return sum(count for status, count in self.statuses.items() if not status.isdigit())

    @property
    def hit_ratio(self) -> float | None:
        """(HIT + STALE) / (HIT + STALE + MISS), as the service counts it; BYPASS is outside."""
        hits = self.cache["HIT"] + self.cache["STALE"]
        lookups = hits + self.cache["MISS"]
        return hits / lookups if lookups else None


@dataclass
class SimulationResult:
    url: str
    seconds: float
    salons: int
    tally: Tally
    interrupted: bool = False

    def summary(self) -> str:
        tally = self.tally
        statuses = ", ".join(f"{status}: {n}" for status, n in sorted(tally.statuses.items()))
        cache = ", ".join(
            f"{name} {tally.cache[name]}" for name in ("HIT", "MISS", "STALE", "BYPASS")
        )
        ratio = tally.hit_ratio
        latencies = sorted(tally.latencies_ms)
        lines = [
            f"simulated {self.seconds:.1f} s against {self.url}"
            f"{' (interrupted)' if self.interrupted else ''}: Zipf mix over {self.salons} salons,"
            f" {len(WINDOWS)} date windows, {len(REPORTS)} reports",
            f"requests: {tally.sent} sent, {tally.answered} answered, {tally.failed} failed,"
            f" {tally.skipped} not sent ({MAX_IN_FLIGHT} already in flight)",
            f"status: {statuses or 'none'}",
            f"X-Cache: {cache} -> hit ratio "
            f"{'n/a' if ratio is None else f'{ratio:.1%}'} ((HIT+STALE) / (HIT+STALE+MISS))",
        ]
        if latencies:
            lines.append(
                f"latency: p50 {_quantile(latencies, 0.5):.1f} ms,"
                f" p95 {_quantile(latencies, 0.95):.1f} ms, max {latencies[-1]:.1f} ms"
            )
        lines.append(
            f"writes: {tally.inserts + tally.updates} ({tally.inserts} new bookings,"
            f" {tally.updates} status changes, {tally.write_errors} failed)"
            f" in {len(tally.salons_written)} salons"
        )
        lines.append(f"watch it at {self.url.rstrip('/')}/performance")
        return "\n".join(lines)


def _quantile(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def zipf_weights(count: int, exponent: float = ZIPF_EXPONENT) -> list[float]:
    """Weight of rank k (from 1) proportional to 1 / k**exponent."""
    return [1.0 / rank**exponent for rank in range(1, count + 1)]


class ZipfChoice:
    """Draws from ``items`` with Zipf weights by rank (the first item the most often)."""

    def __init__(self, items: Sequence[T], rng: random.Random) -> None:
        self.items = list(items)
        self.rng = rng
        weights = zipf_weights(len(self.items))
        total, self.cumulative = 0.0, []
        for weight in weights:
            total += weight
            self.cumulative.append(total)

    def __call__(self) -> Any:
        return self.rng.choices(self.items, cum_weights=self.cumulative)[0]


def check_loopback(url: str) -> None:
    """Refuse any URL whose host is not a loopback address: this tool exercises this machine."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SimulationError(f"--url must be an http(s) URL, got {url!r}")
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 80, proto=socket.IPPROTO_TCP)
    except OSError as error:
        raise SimulationError(f"cannot resolve {parts.hostname!r}: {error}") from None
    addresses = {str(info[4][0]).split("%")[0] for info in infos}
    if not all(ipaddress.ip_address(address).is_loopback for address in addresses):
        raise SimulationError(
            f"{parts.hostname} is not a loopback address: simulate only exercises a service"
            " on this machine (e.g. http://127.0.0.1:8000)"
        )


# -- the two loops ------------------------------------------------------------------------------


async def _sleep_until(deadline: float, stop: asyncio.Event) -> bool:
    """Sleep until ``deadline`` (loop time); True when asked to stop meanwhile."""
    delay = deadline - asyncio.get_running_loop().time()
    if delay > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
    return stop.is_set()


def _request(
    salons: ZipfChoice, windows: ZipfChoice, reports: ZipfChoice, rng: random.Random
) -> tuple[str, dict[str, str]]:
    report: str = reports()
    params: dict[str, str] = {}
    if rng.random() >= PLATFORM_SHARE:
        params["salon_id"] = str(salons())
    if report != ReportName.REALTIME:
        days, ago = windows()
        end = datetime.now(UTC).date() - timedelta(days=ago)
        params["start"] = (end - timedelta(days=days - 1)).isoformat()
        params["end"] = end.isoformat()
    return f"{API_PREFIX}/{report}", params


async def _one_request(
    http: httpx.AsyncClient, path: str, params: dict[str, str], tally: Tally
) -> None:
    started = time.perf_counter()
    try:
        response = await http.get(path, params=params)
    except httpx.HTTPError as error:
        tally.statuses[f"error:{type(error).__name__}"] += 1
        return
    tally.latencies_ms.append((time.perf_counter() - started) * 1000)
    tally.statuses[str(response.status_code)] += 1
    if "x-cache" in response.headers:
        tally.cache[response.headers["x-cache"].upper()] += 1


async def _request_loop(
    http: httpx.AsyncClient,
    rps: float,
    deadline: float,
    stop: asyncio.Event,
    choose: Callable[[], tuple[str, dict[str, str]]],
    tally: Tally,
) -> None:
    loop = asyncio.get_running_loop()
    in_flight: set[asyncio.Task[None]] = set()
    next_at = loop.time()
    try:
        while next_at < deadline:
            if await _sleep_until(next_at, stop):
                break
            next_at += 1.0 / rps
            if len(in_flight) >= MAX_IN_FLIGHT:
                tally.skipped += 1
                continue
            path, params = choose()
            task = asyncio.create_task(_one_request(http, path, params, tally))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            tally.sent += 1
        if in_flight:
            await asyncio.wait(set(in_flight), timeout=DRAIN_SECONDS)
    finally:
        for task in list(in_flight):
            task.cancel()
        for task in list(in_flight):
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if task.cancelled():
                tally.statuses["error:unfinished"] += 1


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


async def _write_loop(
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
        if await _sleep_until(next_at, stop):
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


# -- the whole run ------------------------------------------------------------------------------


async def _load_salons(connection: psycopg.AsyncConnection[Any]) -> tuple[list[Salon], list[int]]:
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


async def run_simulation(
    *,
    url: str,
    rps: float,
    writes_per_min: float,
    duration: float,
    settings: Settings,
    transport: httpx.AsyncBaseTransport | None = None,
    seed: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> SimulationResult:
    """Run the traffic; ``transport`` (tests) replaces the network, skipping the loopback check."""
    if rps <= 0 or writes_per_min < 0 or duration <= 0:
        raise SimulationError("need rps > 0, writes-per-min >= 0 and duration > 0")
    if transport is None:
        check_loopback(url)
    rng = random.Random(seed)
    token = issue_token(
        settings.jwt_secret,
        role="admin",
        ttl_seconds=int(duration) + 120,
        subject="simulate",
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
    )
    tally = Tally()
    async with (
        await psycopg.AsyncConnection.connect(
            libpq_url(settings.database_url), autocommit=True
        ) as connection,
        httpx.AsyncClient(
            base_url=url,
            transport=transport,
            headers={"Authorization": f"Bearer {token}", "User-Agent": "salon-reports-simulate"},
            timeout=REQUEST_TIMEOUT_SECONDS,
            limits=httpx.Limits(max_connections=MAX_IN_FLIGHT),
        ) as http,
    ):
        salons, clients = await _load_salons(connection)
        if not salons:
            raise SimulationError("the database has no salons: run `salon-reports seed` first")
        try:
            (await http.get("/healthz")).raise_for_status()
        except httpx.HTTPError as error:
            raise SimulationError(
                f"no service answering at {url} ({error}); start it with `make run`"
            ) from None
        salon_ids = ZipfChoice([salon.id for salon in salons], rng)
        windows, reports = ZipfChoice(WINDOWS, rng), ZipfChoice(REPORTS, rng)

        def choose() -> tuple[str, dict[str, str]]:
            return _request(salon_ids, windows, reports, rng)

        writable = [salon for salon in salons if salon.professionals and salon.services]
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        started = loop.time()
        deadline = started + duration
        with _stop_on_interrupt(loop, stop):
            tasks = [
                asyncio.create_task(_request_loop(http, rps, deadline, stop, choose, tally)),
                asyncio.create_task(_report_progress(deadline, stop, started, tally, progress)),
            ]
            if writes_per_min > 0 and writable and clients:
                tasks.append(
                    asyncio.create_task(
                        _write_loop(
                            connection,
                            writes_per_min,
                            deadline,
                            stop,
                            ZipfChoice(writable, rng),
                            ZipfChoice(clients, rng),
                            rng,
                            tally,
                        )
                    )
                )
            await asyncio.gather(*tasks)
        return SimulationResult(
            url=url,
            seconds=loop.time() - started,
            salons=len(salons),
            tally=tally,
            interrupted=stop.is_set(),
        )


async def _report_progress(
    deadline: float,
    stop: asyncio.Event,
    started: float,
    tally: Tally,
    progress: Callable[[str], None] | None,
) -> None:
    if progress is None:
        return
    next_at = started + PROGRESS_EVERY_SECONDS
    while next_at < deadline:
        if await _sleep_until(next_at, stop):
            return
        ratio = tally.hit_ratio
        progress(
            f"{next_at - started:5.0f} s: {tally.sent} requests, {tally.answered} answered,"
            f" hit ratio {'n/a' if ratio is None else f'{ratio:.0%}'},"
            f" {tally.inserts + tally.updates} writes"
        )
        next_at += PROGRESS_EVERY_SECONDS


@contextlib.contextmanager
def _stop_on_interrupt(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> Iterator[None]:
    """Ctrl-C stops the loops early so that the summary still prints."""
    try:
        loop.add_signal_handler(signal.SIGINT, stop.set)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or Windows
        yield
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def simulate(
    *,
    url: str,
    rps: float,
    writes_per_min: float,
    duration: float,
    settings: Settings | None = None,
    seed: int | None = None,
) -> str:
    """Run the simulation (see the module doc) and return its summary."""
    check_loopback(url)
    settings = settings or get_settings()
    _to_stderr(
        f"simulating {duration:g} s against {url}: {rps:g} requests/s,"
        f" {writes_per_min:g} booking writes/min (Ctrl-C stops early)"
    )
    result = asyncio.run(
        run_simulation(
            url=url,
            rps=rps,
            writes_per_min=writes_per_min,
            duration=duration,
            settings=settings,
            seed=seed,
            progress=_to_stderr,
        )
    )
    return result.summary()


__all__ = ["SimulationError", "SimulationResult", "check_loopback", "run_simulation", "simulate"]
