"""Report traffic: a Zipf mix of report requests, open loop, against a loopback address."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit

import click
import httpx

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

T = TypeVar("T")


class SimulationError(click.ClickException):
    """Nothing to simulate against: the command says why and exits 1 without a traceback."""


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
        """(HIT + STALE) / (HIT + STALE + MISS) as a client sees it. A Redis error reaches a
        client as BYPASS, so while Redis fails this reads higher than the service's hit rate
        (telemetry/README.md, "Cache hit rate"), which counts errors as lookups."""
        hits = self.cache["HIT"] + self.cache["STALE"]
        lookups = hits + self.cache["MISS"]
        return hits / lookups if lookups else None


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


async def sleep_until(deadline: float, stop: asyncio.Event) -> bool:
    """Sleep until ``deadline`` (loop time); True when asked to stop meanwhile."""
    delay = deadline - asyncio.get_running_loop().time()
    if delay > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
    return stop.is_set()


def next_request(
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


async def _onenext_request(
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


async def request_loop(
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
            if await sleep_until(next_at, stop):
                break
            next_at += 1.0 / rps
            if len(in_flight) >= MAX_IN_FLIGHT:
                tally.skipped += 1
                continue
            path, params = choose()
            task = asyncio.create_task(_onenext_request(http, path, params, tally))
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
