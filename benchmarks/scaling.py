"""Scaling benchmark (``make bench-scaling``): do the cold report queries stay flat as data grows?

For each dataset size (default 1 M and 5 M bookings, 200 salons, 400 days; each in its own
database, see ``benchmarks.dataset``), every report that reads a period (dashboard, bookings,
professionals) is asked, for the busiest salon and for the whole platform, over **five
different 365-day windows** (ending on the dataset's "today" and the four days before it: each
window is a distinct report-cache key, so each would be a cold request to the service). The
figure per cell is the **median of the five windows**; rounds (``--rounds``, default 3) repeat
the five windows with the datasets interleaved round by round, and the table shows the median
of the rounds' medians with their range, and the p95 over every sample against the cold-path
target (p95 <= 20 ms at 1 M, <= 25 ms at 5 M).

The time measured is the database time of the report as ``benchmarks.queries`` measures it:
the wall clock of ``service.reports.queries`` on one connection of the service's own engine
(the statement's round trip: planning, execution, the JSON result), not the HTTP request.
Beside it, when the database server runs on this machine, the **CPU time of the connection's
backend process** for the statement (``/proc/<pid>/schedstat``, nanoseconds on a CPU): the
work the statement costs the server, which other processes competing for the cores do not
inflate as they inflate the wall clock (on a shared machine, compare those).
Before its windows, each cell runs once on a 30-day window so that the connection and the
statement are warm; the database's buffers are warm too (each dataset fits in memory), so
"cold" means "not in the report cache", as a cold request to the service is.

A dataset that is missing or stale is built first by ``python -m benchmarks.dataset`` with
``BENCH_BOOKINGS`` / ``BENCH_DATABASE`` set (5 M bookings: several minutes of CPU, once).

    python -m benchmarks.scaling [--rounds 3] [--reports dashboard,bookings,professionals]
        [--scales 1000000:salon_reports_bench,5000000:salon_reports_bench5m]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from benchmarks.queries import busiest_salon
from benchmarks.stats import machine, percentile, write_results
from service.config import get_settings
from service.db import async_engine, with_database
from service.reports import queries
from service.reports.params import BookingFilters, Period, Scope

REPORTS = ("dashboard", "bookings", "professionals")
DEFAULT_SCALES = "1000000:salon_reports_bench,5000000:salon_reports_bench5m"
WINDOW_DAYS = 365
WINDOWS = 5  # distinct 365-day windows per cell and round
WARM_UP_DAYS = 30
PROFESSIONALS_PAGE = 50
# The cold-path target of issue 16: p95 <= 20 ms at 1 M bookings, <= 25 ms at 5 M.
TARGET_P95_MS = {1_000_000: 20.0, 5_000_000: 25.0}


@dataclass(frozen=True, slots=True)
class Scale:
    bookings: int
    database: str

    @property
    def label(self) -> str:
        millions = self.bookings / 1_000_000
        return f"{millions:g} M" if self.bookings >= 1_000_000 else f"{self.bookings:,}"


@dataclass(slots=True)
class Prepared:
    """A dataset ready to measure: its URL, its "today", its busiest salon."""

    scale: Scale
    url: str
    today: date
    salon: Scope
    salon_bookings: int
    dataset: dict[str, Any]


def parse_scales(value: str) -> list[Scale]:
    scales = []
    for item in value.split(","):
        bookings, _, database = item.partition(":")
        if not database:
            raise argparse.ArgumentTypeError(f"expected BOOKINGS:DATABASE, got {item!r}")
        scales.append(Scale(int(bookings), database))
    return scales


def ensure(scale: Scale, console: Console) -> dict[str, Any]:
    """``python -m benchmarks.dataset`` for this scale (built when missing); its summary."""
    env = {**os.environ, "BENCH_BOOKINGS": str(scale.bookings), "BENCH_DATABASE": scale.database}
    console.log(f"dataset {scale.database} ({scale.bookings:,} bookings): ensuring")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.dataset"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    # The summary is the JSON object that ends the output (a build logs before it).
    start = result.stdout.rindex("\n{") + 1 if "\n{" in result.stdout else result.stdout.index("{")
    summary: dict[str, Any] = json.loads(result.stdout[start:])
    return summary


def prepare(scale: Scale, console: Console) -> Prepared:
    summary = ensure(scale, console)
    url = with_database(get_settings().database_url, scale.database)
    salon, salon_bookings = busiest_salon(url)
    return Prepared(
        scale, url, date.fromisoformat(summary["seeded_on"]), salon, salon_bookings, summary
    )


def report_call(
    report: str, scope: Scope, period: Period
) -> Callable[[AsyncConnection], Awaitable[Any]]:
    if report == "dashboard":
        return lambda conn: queries.dashboard_metrics(conn, scope, period)
    if report == "bookings":
        return lambda conn: queries.booking_metrics(conn, scope, period, "day", BookingFilters())
    if report == "professionals":
        return lambda conn: queries.professional_performance(
            conn, scope, period, limit=PROFESSIONALS_PAGE, after_id=None
        )
    raise ValueError(report)


def windows(today: date, days: int = WINDOW_DAYS, count: int = WINDOWS) -> list[Period]:
    """``count`` distinct ``days``-day windows ending on ``today`` and the days before it."""
    return [
        Period(today - timedelta(days=back + days - 1), today - timedelta(days=back))
        for back in range(count)
    ]


def backend_cpu_ns(pid: int | None) -> int | None:
    """CPU time so far of a local server process (``/proc/<pid>/schedstat``), or None."""
    if pid is None:
        return None
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


async def backend_pid(conn: AsyncConnection) -> int | None:
    """The connection's backend process id, when that process is on this machine."""
    pid = int((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())
    await conn.rollback()
    return pid if backend_cpu_ns(pid) is not None else None


async def measure_cell(
    conn: AsyncConnection, report: str, scope: Scope, today: date, pid: int | None
) -> tuple[list[float], list[float]]:
    """Wall-clock and backend CPU milliseconds of each of the five windows, after one warm-up
    on a 30-day window (no CPU times when the server is not local)."""
    warm_up = Period(today - timedelta(days=WARM_UP_DAYS - 1), today)
    await report_call(report, scope, warm_up)(conn)
    await conn.rollback()
    timings, cpu = [], []
    for period in windows(today):
        call = report_call(report, scope, period)
        cpu_before = backend_cpu_ns(pid)
        started = time.perf_counter()
        await call(conn)
        timings.append((time.perf_counter() - started) * 1000)
        cpu_after = backend_cpu_ns(pid)
        if cpu_before is not None and cpu_after is not None:
            cpu.append((cpu_after - cpu_before) / 1e6)
        await conn.rollback()
    return timings, cpu


def _engine(url: str) -> AsyncEngine:
    return async_engine(
        url,
        pool_size=1,
        max_overflow=0,
        statement_timeout_ms=120_000,
        application_name="salon-reports-bench-scaling",
    )


Samples = dict[tuple[int, str, str], list[tuple[list[float], list[float]]]]


async def run(
    prepared: list[Prepared], reports: tuple[str, ...], rounds: int, console: Console
) -> Samples:
    """Per (bookings, report, scope): the five windows' wall and CPU timings of each round."""
    samples: Samples = {}
    engines = {p.scale.database: _engine(p.url) for p in prepared}
    try:
        for round_number in range(1, rounds + 1):
            for p in prepared:  # the datasets interleaved round by round: same noise for each
                async with engines[p.scale.database].connect() as conn:
                    pid = await backend_pid(conn)
                    for report in reports:
                        for scope_name, scope in (("salon", p.salon), ("platform", Scope(None))):
                            timings, cpu = await measure_cell(conn, report, scope, p.today, pid)
                            key = (p.scale.bookings, report, scope_name)
                            samples.setdefault(key, []).append((timings, cpu))
                            cpu_text = f", CPU {statistics.median(cpu):6.1f} ms" if cpu else ""
                            console.log(
                                f"round {round_number} {p.scale.label:>5} {report:<13}"
                                f" {scope_name:<8} median {statistics.median(timings):6.1f} ms"
                                f"{cpu_text} (windows: {', '.join(f'{t:.1f}' for t in timings)})"
                            )
    finally:
        for engine in engines.values():
            await engine.dispose()
    return samples


def summarise(
    rounds: list[tuple[list[float], list[float]]], target_ms: float | None
) -> dict[str, Any]:
    medians = [statistics.median(timings) for timings, _ in rounds]
    every = [t for timings, _ in rounds for t in timings]
    cpu_medians = [statistics.median(cpu) for _, cpu in rounds if cpu]
    cpu_every = [t for _, cpu in rounds for t in cpu]
    p95 = percentile(every, 0.95)
    return {
        "median_ms": round(statistics.median(medians), 1),
        "round_medians_ms": [round(m, 1) for m in medians],
        "p95_ms": round(p95, 1),
        "max_ms": round(max(every), 1),
        "cpu_median_ms": round(statistics.median(cpu_medians), 1) if cpu_medians else None,
        "cpu_p95_ms": round(percentile(cpu_every, 0.95), 1) if cpu_every else None,
        "samples": len(every),
        "target_p95_ms": target_ms,
        "meets_target": None if target_ms is None else p95 <= target_ms,
    }


def _cell_text(cell: dict[str, Any]) -> str:
    low, high = min(cell["round_medians_ms"]), max(cell["round_medians_ms"])
    spread = f" ({low:.1f} to {high:.1f})" if len(cell["round_medians_ms"]) > 1 else ""
    verdict = ""
    if cell["meets_target"] is not None:
        verdict = " ✓" if cell["meets_target"] else " ✗"
    cpu = ""
    if cell["cpu_median_ms"] is not None:
        cpu = f"; CPU {cell['cpu_median_ms']:.1f}, p95 {cell['cpu_p95_ms']:.1f}"
    return f"{cell['median_ms']:.1f}{spread}; p95 {cell['p95_ms']:.1f}{verdict}{cpu}"


def table(prepared: list[Prepared], rows: list[dict[str, Any]]) -> Table:
    result = Table(
        title=(
            "Cold report queries as data grows: database time, median of 5 cold 365-day windows"
            " (ms; range of the rounds' medians; p95 of every sample vs the target; the"
            " backend's CPU time, median and p95)"
        )
    )
    result.add_column("report")
    for p in prepared:
        result.add_column(f"{p.scale.label} bookings, {p.dataset['params']['salons']} salons")
    for row in rows:
        cells = (_cell_text(row["cells"][p.scale.bookings]) for p in prepared)
        result.add_row(row["label"], *cells)
    return result


def markdown(prepared: list[Prepared], rows: list[dict[str, Any]]) -> str:
    header = "| report | " + " | ".join(f"{p.scale.label} bookings" for p in prepared) + " |"
    lines = [header, "|---|" + "--:|" * len(prepared)]
    for row in rows:
        cells = " | ".join(_cell_text(row["cells"][p.scale.bookings]) for p in prepared)
        lines.append(f"| {row['label']} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="Scaling benchmark (make bench-scaling).")
    parser.add_argument("--scales", type=parse_scales, default=parse_scales(DEFAULT_SCALES))
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the five windows")
    parser.add_argument("--reports", default=",".join(REPORTS))
    args = parser.parse_args()
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    started = time.perf_counter()
    reports = tuple(name for name in args.reports.split(",") if name)

    prepared = [prepare(scale, console) for scale in args.scales]
    for p in prepared:
        console.log(
            f"{p.scale.label}: {p.scale.database}, today {p.today}, busiest salon"
            f" {p.salon.salon_id} ({p.salon.timezone}, {p.salon_bookings:,} bookings)"
        )
    samples = asyncio.run(run(prepared, reports, args.rounds, console))

    rows = []
    for report in reports:
        for scope_name in ("salon", "platform"):
            label = f"{report}, {'busiest salon' if scope_name == 'salon' else 'platform'}"
            cells = {
                p.scale.bookings: summarise(
                    samples[(p.scale.bookings, report, scope_name)],
                    TARGET_P95_MS.get(p.scale.bookings),
                )
                for p in prepared
            }
            rows.append({"report": report, "scope": scope_name, "label": label, "cells": cells})

    console.print(table(prepared, rows))
    console.print(markdown(prepared, rows))
    misses = [
        f"{row['label']} at {bookings:,}: p95 {cell['p95_ms']} ms > {cell['target_p95_ms']} ms"
        for row in rows
        for bookings, cell in row["cells"].items()
        if cell["meets_target"] is False
    ]
    console.print(f"cold-path p95 target missed by: {'; '.join(misses) or 'none'}")
    elapsed = time.perf_counter() - started
    payload = {
        "kind": "scaling",
        "command": "make bench-scaling  (python -m benchmarks.scaling)",
        "args": {"scales": [vars_of(s) for s in args.scales], "rounds": args.rounds},
        "machine": machine(),
        "datasets": [
            {
                **p.dataset,
                "salon": {
                    "id": p.salon.salon_id,
                    "timezone": p.salon.timezone,
                    "bookings": p.salon_bookings,
                },
                "windows": [
                    {"start": w.start.isoformat(), "end": w.end.isoformat()}
                    for w in windows(p.today)
                ],
            }
            for p in prepared
        ],
        "rows": [
            {**row, "cells": {str(key): value for key, value in row["cells"].items()}}
            for row in rows
        ],
        "target_misses": misses,
        "elapsed_s": round(elapsed, 1),
    }
    path = write_results("scaling", payload)
    console.print(f"wrote {path} in {elapsed:.0f} s")


def vars_of(scale: Scale) -> dict[str, Any]:
    return {"bookings": scale.bookings, "database": scale.database}


if __name__ == "__main__":
    main()
