"""Query benchmark (``make bench``): the optimised report SQL against the naive ORM baseline.

On the benchmark dataset (``benchmarks.dataset``: 1 M bookings, 200 salons, 400 days), every
report runs over four windows ending on the dataset's "today": the busiest salon over 30 and
365 days, and the whole platform over 30 and 365 days (``realtime`` has one window, today, per
salon and platform-wide). For each cell:

- optimised: ``service.reports.queries`` as the service calls it (one async connection, the
  service's engine settings), 2 warm-up calls, then up to ``--runs`` (20) timed calls within a
  per-cell time budget; the statements it sent are captured and run once more under
  ``EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)`` for the plan's top node, the node where most of
  the time goes (exclusive time), the execution time and any JIT time;
- naive: ``benchmarks.naive`` (sync ORM ``Session``, a fresh one per run) in a child process
  with a time budget per cell: up to 5 runs on the per-salon 30-day windows; on the others it
  stops when the budget is spent, and a first run still going when it runs out is killed and
  reported as a lower bound ("> budget") — platform-wide naive runs take minutes each.

Timings are wall-clock in the client, warm caches (the dataset fits in memory), no concurrent
load from this process. Results: a table, and JSON in ``benchmarks/results/queries-*.json``.

    python -m benchmarks.queries [--runs 20] [--no-naive] [--reports dashboard,bookings]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date, timedelta
from multiprocessing.connection import Connection
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import create_engine, event, text
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.orm import Session

from benchmarks import naive
from benchmarks.dataset import Dataset, ensure_dataset
from benchmarks.stats import machine, summary_ms, write_results
from service.db import async_engine
from service.reports import queries
from service.reports.params import BookingFilters, Period, Scope

REPORTS = ("dashboard", "bookings", "professionals", "realtime")
TARGET_P95_MS = 100.0
TARGET_SPEEDUP = 10.0
PROFESSIONALS_PAGE = 50
MIN_RUNS = 5  # optimised runs per cell even past the time budget


@dataclass(frozen=True, slots=True)
class Window:
    name: str
    salon: bool  # one salon (the busiest) or the whole platform
    days: int  # 0: today only (realtime)
    naive_runs: int
    naive_budget_s: float  # naive time budget for this cell


WINDOWS = (
    Window("salon-30d", True, 30, 5, 12.0),
    Window("salon-365d", True, 365, 3, 20.0),
    Window("platform-30d", False, 30, 1, 15.0),
    Window("platform-365d", False, 365, 1, 20.0),
)
REALTIME_WINDOWS = (
    Window("salon-today", True, 0, 5, 5.0),
    Window("platform-today", False, 0, 5, 10.0),
)


@dataclass(frozen=True, slots=True)
class Cell:
    report: str
    window: Window
    scope: Scope
    period: Period


def _cells(reports: tuple[str, ...], salon: Scope, today: date) -> list[Cell]:
    cells = []
    for report in reports:
        for window in REALTIME_WINDOWS if report == "realtime" else WINDOWS:
            scope = salon if window.salon else Scope(salon_id=None)
            start = today - timedelta(days=max(window.days, 1) - 1)
            cells.append(Cell(report, window, scope, Period(start, today)))
    return cells


# -- optimised --------------------------------------------------------------------------------


def _optimised_call(cell: Cell) -> Callable[[AsyncConnection], Awaitable[Any]]:
    scope, period = cell.scope, cell.period
    if cell.report == "dashboard":
        return lambda conn: queries.dashboard_metrics(conn, scope, period)
    if cell.report == "bookings":
        return lambda conn: queries.booking_metrics(conn, scope, period, "day", BookingFilters())
    if cell.report == "professionals":
        return lambda conn: queries.professional_performance(
            conn, scope, period, limit=PROFESSIONALS_PAGE, after_id=None
        )
    if cell.report == "realtime":
        return lambda conn: queries.realtime_metrics(conn, scope, period.end)
    raise ValueError(cell.report)


def _plan_nodes(node: dict[str, Any], depth: int = 0) -> list[tuple[int, dict[str, Any]]]:
    nodes = [(depth, node)]
    for child in node.get("Plans", []):
        nodes += _plan_nodes(child, depth + 1)
    return nodes


def _node_label(node: dict[str, Any]) -> str:
    label = str(node.get("Node Type", "?"))
    if node.get("Strategy") and node["Node Type"] == "Aggregate":
        label = f"{node['Strategy']} {label}"
    if node.get("Index Name"):
        label += f" using {node['Index Name']}"
    elif node.get("Relation Name"):
        label += f" on {node['Relation Name']}"
    elif node.get("CTE Name"):
        label += f" on CTE {node['CTE Name']}"
    return label


def _inclusive_ms(node: dict[str, Any]) -> float:
    return float(node.get("Actual Total Time", 0.0)) * float(node.get("Actual Loops", 1))


def plan_summary(explain: list[dict[str, Any]]) -> dict[str, Any]:
    """The top node, the node with the most exclusive time, bookings scans, timings, JIT."""
    root = explain[0]
    top = root["Plan"]
    nodes = _plan_nodes(top)
    hottest: tuple[float, dict[str, Any]] | None = None
    scans = []
    for _, node in nodes:
        exclusive = _inclusive_ms(node) - sum(_inclusive_ms(c) for c in node.get("Plans", []))
        if hottest is None or exclusive > hottest[0]:
            hottest = (exclusive, node)
        if node.get("Relation Name") == "bookings":
            scans.append(
                {
                    "node": _node_label(node),
                    "rows": node.get("Actual Rows"),
                    "loops": node.get("Actual Loops"),
                    "heap_fetches": node.get("Heap Fetches"),
                    "ms": round(_inclusive_ms(node), 2),
                }
            )
    jit = root.get("JIT") or {}
    return {
        "top_node": _node_label(top),
        "top_total_cost": top.get("Total Cost"),
        "top_plan_rows": top.get("Plan Rows"),
        "execution_ms": round(float(root.get("Execution Time", 0.0)), 2),
        "planning_ms": round(float(root.get("Planning Time", 0.0)), 2),
        "hottest_node": None if hottest is None else _node_label(hottest[1]),
        "hottest_exclusive_ms": None if hottest is None else round(max(hottest[0], 0.0), 2),
        "bookings_scans": scans,
        "jit_ms": round(float(jit.get("Timing", {}).get("Total", 0.0)), 2) if jit else 0.0,
        "shared_hit_blocks": top.get("Shared Hit Blocks"),
        "shared_read_blocks": top.get("Shared Read Blocks"),
    }


async def _optimised(
    dataset: Dataset, cells: list[Cell], runs: int, budget_s: float, console: Console
) -> dict[tuple[str, str], dict[str, Any]]:
    engine = async_engine(
        dataset.url,
        pool_size=1,
        max_overflow=0,
        statement_timeout_ms=120_000,
        application_name="salon-reports-bench",
    )
    captured: list[tuple[str, Any]] = []
    capturing = False

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if capturing:
            captured.append((statement, parameters))

    event.listen(engine.sync_engine, "before_cursor_execute", capture)
    results: dict[tuple[str, str], dict[str, Any]] = {}
    try:
        async with engine.connect() as conn:
            for cell in cells:
                call = _optimised_call(cell)
                capturing = True
                captured.clear()
                warm_up_started = time.perf_counter()
                await call(conn)  # warm-up 1, statements captured
                capturing = False
                await conn.rollback()
                if time.perf_counter() - warm_up_started < 1.0:
                    await call(conn)  # warm-up 2, unless one slow call already warmed it
                    await conn.rollback()
                timings: list[float] = []
                cell_started = time.perf_counter()
                while len(timings) < runs and (
                    len(timings) < MIN_RUNS or time.perf_counter() - cell_started < budget_s
                ):
                    started = time.perf_counter()
                    await call(conn)
                    timings.append(time.perf_counter() - started)
                    await conn.rollback()
                plans = []
                for statement, parameters in captured:
                    explained = await conn.exec_driver_sql(
                        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement, parameters
                    )
                    plans.append(plan_summary(explained.scalar_one()))
                    await conn.rollback()
                summary = summary_ms(timings)
                results[(cell.report, cell.window.name)] = {
                    **summary,
                    "runs_requested": runs,
                    "budget_limited": summary["n"] < runs,
                    "statements": len(captured),
                    "plans": plans,
                }
                console.log(
                    f"optimised {cell.report:<13} {cell.window.name:<15}"
                    f" n={summary['n']:<3} p50={summary['p50_ms']} ms p95={summary['p95_ms']} ms"
                )
    finally:
        await engine.dispose()
    return results


# -- naive ------------------------------------------------------------------------------------


def _naive_call(report: str) -> Callable[[Session, Scope, Period], Any]:
    if report == "dashboard":
        return naive.naive_dashboard
    if report == "bookings":
        return lambda s, scope, period: naive.naive_bookings(
            s, scope, period, "day", BookingFilters()
        )
    if report == "professionals":
        return naive.naive_professionals
    if report == "realtime":
        return lambda s, scope, period: naive.naive_realtime(s, scope, period.end)
    raise ValueError(report)


def _naive_worker(
    url: str, report: str, scope: Scope, period: Period, runs: int, pipe: Connection
) -> None:
    """Child process: time ``runs`` naive computations, sending each timing as it ends."""
    engine = create_engine(url, connect_args={"application_name": "salon-reports-bench-naive"})
    call = _naive_call(report)
    for _ in range(runs):
        with Session(engine) as session:
            started = time.perf_counter()
            call(session, scope, period)
            pipe.send(time.perf_counter() - started)
    pipe.send(None)


def _naive(dataset: Dataset, cell: Cell, scale: float) -> dict[str, Any]:
    """Naive timings within the cell's budget; a run cut short gives a lower bound."""
    budget = cell.window.naive_budget_s * scale
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(
        target=_naive_worker,
        args=(dataset.url, cell.report, cell.scope, cell.period, cell.window.naive_runs, sender),
        daemon=True,
    )
    started = time.perf_counter()
    process.start()
    sender.close()
    timings: list[float] = []
    finished = False
    try:
        while True:
            remaining = budget - (time.perf_counter() - started)
            if remaining <= 0 or not receiver.poll(remaining):
                break
            message = receiver.recv()
            if message is None:
                finished = True
                break
            timings.append(float(message))
            # Another run would not fit in the budget: stop here rather than cut it short.
            if time.perf_counter() - started + float(message) > budget:
                break
    except EOFError:
        finished = False
    finally:
        if process.is_alive():
            process.terminate()
        process.join(5)
        receiver.close()
    elapsed = time.perf_counter() - started
    summary = summary_ms(timings)
    return {
        **summary,
        "runs_requested": cell.window.naive_runs,
        "budget_s": budget,
        "completed_all": finished,
        # No run finished: the naive time is only known to exceed the time spent waiting.
        "lower_bound_ms": None if timings else round(elapsed * 1000, 0),
        "exit_code": process.exitcode,
    }


# -- report -----------------------------------------------------------------------------------


def busiest_salon(url: str) -> tuple[Scope, int]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                text(
                    "SELECT b.salon_id, s.timezone, count(*) AS n FROM bookings b"
                    " JOIN salons s ON s.id = b.salon_id"
                    " GROUP BY b.salon_id, s.timezone ORDER BY n DESC, b.salon_id LIMIT 1"
                )
            ).one()
    finally:
        engine.dispose()
    return Scope(salon_id=int(row.salon_id), timezone=str(row.timezone)), int(row.n)


def _rows_in(url: str, cells: list[Cell]) -> dict[tuple[str, str], int]:
    engine = create_engine(url)
    counts: dict[tuple[str, str], int] = {}
    try:
        with engine.connect() as conn:
            for cell in cells:
                lower, upper = cell.period.bounds(cell.scope.timezone)
                where = "scheduled_at >= :lower AND scheduled_at < :upper"
                params: dict[str, Any] = {"lower": lower, "upper": upper}
                if cell.scope.salon_id is not None:
                    where += " AND salon_id = :salon_id"
                    params["salon_id"] = cell.scope.salon_id
                counts[(cell.report, cell.window.name)] = int(
                    conn.execute(
                        text(f"SELECT count(*) FROM bookings WHERE {where}"), params
                    ).scalar_one()
                )
    finally:
        engine.dispose()
    return counts


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="Report queries: optimised SQL vs naive ORM (ms, wall clock)")
    for header in (
        "report",
        "window",
        "rows",
        "opt n",
        "opt p50",
        "opt p95",
        "opt max",
        "p95<100",
        "naive n",
        "naive p50",
        "naive p95",
        "speed-up",
        "plan: top node / hottest node (exclusive ms) / JIT ms",
    ):
        table.add_column(header, overflow="fold")
    for row in rows:
        opt, nai = row["optimised"], row["naive"]
        if nai is None:
            naive_n, naive_p50, naive_p95 = "skipped", "—", "—"
        elif nai["n"] == 0:
            naive_n, naive_p50, naive_p95 = "0", f"> {_fmt(nai['lower_bound_ms'])}", "—"
        else:
            naive_n = str(nai["n"])
            naive_p50, naive_p95 = _fmt(nai["p50_ms"]), _fmt(nai["p95_ms"])
        speedup = row["speedup"]
        speed_text = (
            "—"
            if speedup is None
            else (f"≥ {speedup:,.0f}x" if row["speedup_is_lower_bound"] else f"{speedup:,.0f}x")
        )
        plan = opt["plans"][0] if opt["plans"] else {}
        plan_text = (
            f"{plan.get('top_node', '—')} / {plan.get('hottest_node', '—')}"
            f" ({_fmt(plan.get('hottest_exclusive_ms'))}) / {plan.get('jit_ms', 0):.0f}"
        )
        table.add_row(
            row["report"],
            row["window"],
            f"{row['bookings_in_window']:,}",
            str(opt["n"]),
            _fmt(opt["p50_ms"]),
            _fmt(opt["p95_ms"]),
            _fmt(opt["max_ms"]),
            "yes" if row["meets_p95_target"] else "NO",
            naive_n,
            naive_p50,
            naive_p95,
            speed_text,
            plan_text,
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description="Report query benchmark (make bench).")
    parser.add_argument("--runs", type=int, default=20, help="optimised runs per cell")
    parser.add_argument(
        "--budget", type=float, default=8.0, help="optimised seconds per cell (at least 5 runs)"
    )
    parser.add_argument(
        "--naive-scale", type=float, default=1.0, help="multiply every naive time budget"
    )
    parser.add_argument("--no-naive", action="store_true", help="skip the naive baseline")
    parser.add_argument("--reports", default=",".join(REPORTS))
    args = parser.parse_args()
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # the table is wide; logs and CI have no terminal width
    started = time.perf_counter()

    dataset = ensure_dataset(log=console.log)
    console.log(f"dataset: {dataset.as_dict()}")
    salon, salon_total = busiest_salon(dataset.url)
    reports = tuple(name for name in args.reports.split(",") if name)
    cells = _cells(reports, salon, dataset.seeded_on)
    rows_in = _rows_in(dataset.url, cells)

    optimised = asyncio.run(_optimised(dataset, cells, args.runs, args.budget, console))
    naive_results: dict[tuple[str, str], dict[str, Any] | None] = {}
    for cell in cells:
        if args.no_naive:
            naive_results[(cell.report, cell.window.name)] = None
            continue
        result = _naive(dataset, cell, args.naive_scale)
        naive_results[(cell.report, cell.window.name)] = result
        shown = result["p50_ms"] if result["n"] else f"> {result['lower_bound_ms']}"
        console.log(
            f"naive     {cell.report:<13} {cell.window.name:<15} n={result['n']:<3} p50={shown} ms"
        )

    rows: list[dict[str, Any]] = []
    for cell in cells:
        key = (cell.report, cell.window.name)
        opt, nai = optimised[key], naive_results[key]
        speedup: float | None = None
        lower_bound = False
        if nai is not None and opt["p50_ms"]:
            if nai["n"]:
                speedup = nai["p50_ms"] / opt["p50_ms"]
            elif nai["lower_bound_ms"]:
                speedup, lower_bound = nai["lower_bound_ms"] / opt["p50_ms"], True
        rows.append(
            {
                "report": cell.report,
                "window": cell.window.name,
                "salon_id": cell.scope.salon_id,
                "timezone": cell.scope.timezone,
                "start": cell.period.start.isoformat(),
                "end": cell.period.end.isoformat(),
                "bookings_in_window": rows_in[key],
                "optimised": opt,
                "naive": nai,
                "meets_p95_target": opt["p95_ms"] is not None and opt["p95_ms"] < TARGET_P95_MS,
                "speedup": None if speedup is None else round(speedup, 1),
                "speedup_is_lower_bound": lower_bound,
                # A lower bound under the target says nothing: the naive run was cut short.
                "meets_speedup_target": None
                if speedup is None or (lower_bound and speedup < TARGET_SPEEDUP)
                else speedup >= TARGET_SPEEDUP,
            }
        )

    console.print(_table(rows))
    misses = [
        f"{r['report']}/{r['window']} p95 {r['optimised']['p95_ms']} ms"
        for r in rows
        if not r["meets_p95_target"]
    ]
    slow_speedups = [
        f"{r['report']}/{r['window']} {r['speedup']}x"
        for r in rows
        if r["meets_speedup_target"] is False
    ]
    inconclusive = [
        f"{r['report']}/{r['window']} ≥ {r['speedup']}x"
        for r in rows
        if r["speedup"] is not None and r["meets_speedup_target"] is None
    ]
    elapsed = time.perf_counter() - started
    payload = {
        "kind": "queries",
        "command": "make bench  (python -m benchmarks.queries)",
        "args": vars(args),
        "machine": machine(),
        "dataset": dataset.as_dict(),
        "salon": {"id": salon.salon_id, "timezone": salon.timezone, "bookings": salon_total},
        "targets": {
            "p95_ms_below": TARGET_P95_MS,
            "speedup_at_least": TARGET_SPEEDUP,
            "p95_misses": misses,
            "speedup_misses": slow_speedups,
            "speedup_inconclusive": inconclusive,
        },
        "rows": rows,
        "elapsed_s": round(elapsed, 1),
    }
    path = write_results("queries", payload)
    console.print(
        f"busiest salon {salon.salon_id} ({salon.timezone}, {salon_total:,} bookings);"
        f" windows end {dataset.seeded_on} (the dataset's today)"
    )
    console.print(f"p95 < {TARGET_P95_MS:.0f} ms missed by: {', '.join(misses) or 'none'}")
    console.print(f"speed-up < {TARGET_SPEEDUP:.0f}x: {', '.join(slow_speedups) or 'none'}")
    if inconclusive:
        console.print(
            "naive cut short, lower bound under the target (inconclusive): "
            + ", ".join(inconclusive)
        )
    console.print(f"wrote {path} in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
