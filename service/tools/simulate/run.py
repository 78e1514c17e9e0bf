"""The whole run: traffic and writes for ``duration`` seconds, progress, the summary."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import httpx
import psycopg

from service.auth import issue_token
from service.config import Settings, get_settings
from service.db import libpq_url
from service.tools.simulate.traffic import (
    MAX_IN_FLIGHT,
    REPORTS,
    REQUEST_TIMEOUT_SECONDS,
    WINDOWS,
    SimulationError,
    Tally,
    ZipfChoice,
    check_loopback,
    next_request,
    request_loop,
    sleep_until,
)
from service.tools.simulate.writes import load_salons, write_loop

PROGRESS_EVERY_SECONDS = 10.0


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
        salons, clients = await load_salons(connection)
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
            return next_request(salon_ids, windows, reports, rng)

        writable = [salon for salon in salons if salon.professionals and salon.services]
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        started = loop.time()
        deadline = started + duration
        with _stop_on_interrupt(loop, stop):
            tasks = [
                asyncio.create_task(request_loop(http, rps, deadline, stop, choose, tally)),
                asyncio.create_task(_report_progress(deadline, stop, started, tally, progress)),
            ]
            if writes_per_min > 0 and writable and clients:
                tasks.append(
                    asyncio.create_task(
                        write_loop(
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
        if await sleep_until(next_at, stop):
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
