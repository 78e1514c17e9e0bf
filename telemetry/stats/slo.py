"""The two SLOs and their error budgets, in process (docs/slo.md; ``alerts/slo.rules.yml``).

The definition is the recording rules' (``tests/telemetry/test_slo.py`` holds this module and
``alerts/slo.rules.yml`` to the same routes, objectives, latency bucket and windows):

- **report requests**: any method on the four report routes (``SLO_ROUTE``), whatever their
  status; ``/metrics``, ``/performance/*``, the health checks and the cache clearing are not;
- **availability**, objective 99.9 %: a request is bad when it is answered 5xx;
- **latency**, objective 99 %: of the requests answered without a 5xx, a request is bad when it
  took more than 100 ms (the histogram's ``le="0.1"`` bucket counts the good ones);
- **burn rate** over a window = the share of bad requests in it / the error budget
  (1 - objective); **budget left** = 1 - the burn rate over the 30 days. No report request in a
  window: no ratio there (``None``), as the rules' 0 / 0.

``SloCounter`` counts every report request of this worker into one-minute buckets (three
integers each: requests, 5xx, answered but slow): ``record`` is O(1) under one lock. The stats
publisher takes what was counted since its last turn (``take``) and adds it to the shared
buckets in Redis (``service/error_budget.py``), which hold every worker's and host's counts
for 30 days; the counter also keeps this worker's own history (minutes for the last 2 hours,
hours for 30 days), the answer when Redis cannot be read. ``render_budget`` turns buckets into
the ``slo`` section of ``/performance/stats``.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from telemetry.stats.counts import timestamp

# The recording rules' http_route matcher, verbatim (anchored, as PromQL's =~ is).
SLO_ROUTE_PATTERN = r"/api/v1/optimized-reports/(dashboard|bookings|professionals|realtime)"
SLO_ROUTE = re.compile(SLO_ROUTE_PATTERN)
LATENCY_THRESHOLD_SECONDS = 0.1  # le="0.1": at most this is good
PERIOD_DAYS = 30


@dataclass(frozen=True, slots=True)
class Objective:
    name: str
    objective: float

    @property
    def error_budget(self) -> float:
        return round(1.0 - self.objective, 12)


AVAILABILITY = Objective("availability", 0.999)
LATENCY = Objective("latency", 0.99)
OBJECTIVES = (AVAILABILITY, LATENCY)

MINUTE = 60
HOUR = 3600
# The rules' windows. Up to an hour they are counted in minutes, beyond in hours; either way
# the bucket now filling is included, so "5m" is the current minute and the 4 before it.
MINUTE_WINDOWS = {"5m": 5, "30m": 30, "1h": 60}
HOUR_WINDOWS = {"6h": 6, "3d": 72, "30d": PERIOD_DAYS * 24}
WINDOWS = (*MINUTE_WINDOWS, *HOUR_WINDOWS)
KEEP_MINUTES = 120  # minute buckets kept (here and in Redis) beyond the 1 h window's needs

REQUESTS, ERRORS, SLOW = range(3)
Cells = list[int]  # [requests, answered 5xx, answered without a 5xx but slow]


def is_report_route(route: str) -> bool:
    return SLO_ROUTE.fullmatch(route) is not None


def add(into: dict[int, Cells], bucket: int, cells: Iterable[int]) -> None:
    mine = into.get(bucket)
    if mine is None:
        into[bucket] = list(cells)
    else:
        for index, value in enumerate(cells):
            mine[index] += value


@dataclass(slots=True)
class Batch:
    """What a worker counted since the publisher's last turn, by minute (epoch minutes)."""

    minutes: dict[int, Cells]

    def hours(self) -> dict[int, Cells]:
        by_hour: dict[int, Cells] = {}
        for minute, cells in self.minutes.items():
            add(by_hour, minute // 60, cells)
        return by_hour


class SloCounter:
    """This worker's report requests by minute: pending for Redis, and its own history."""

    def __init__(self, wall_clock: Callable[[], float] = time.time) -> None:
        self._clock = wall_clock
        self._lock = threading.Lock()
        self._pending: dict[int, Cells] = {}
        self._minutes: dict[int, Cells] = {}  # history: taken minutes, the last KEEP_MINUTES
        self._hours: dict[int, Cells] = {}  # history: taken hours, the last 30 days
        self.started_at = wall_clock()
        self._compacted = int(self.started_at // MINUTE)
        self._routes: dict[str, bool] = {}  # route template -> is a report route

    def record(self, route: str, status_code: int, seconds: float) -> None:
        """Count one request if it is a report request (the middleware calls it for all)."""
        report = self._routes.get(route)
        if report is None:
            report = SLO_ROUTE.fullmatch(route) is not None
            if len(self._routes) < 1000:  # route templates: a handful
                self._routes[route] = report
        if not report:
            return
        minute = int(self._clock() // MINUTE)
        error = status_code >= 500
        slow = not error and seconds > LATENCY_THRESHOLD_SECONDS
        lock = self._lock
        lock.acquire()
        try:
            cells = self._pending.get(minute)
            if cells is None:
                if minute - self._compacted >= 60:
                    self._compact(minute)
                cells = self._pending[minute] = [0, 0, 0]
            cells[REQUESTS] += 1
            if error:
                cells[ERRORS] += 1
            elif slow:
                cells[SLOW] += 1
        finally:
            lock.release()

    def take(self) -> Batch:
        """What was counted since the last ``take``, moved into this worker's history."""
        with self._lock:
            pending, self._pending = self._pending, {}
            for minute, cells in pending.items():
                add(self._minutes, minute, cells)
                add(self._hours, minute // 60, cells)
            self._prune()
        return Batch(pending)

    def give_back(self, batch: Batch) -> None:
        """A batch Redis did not take: it goes out again with the next one (and is moved back
        out of the history, which the next ``take`` adds it to again)."""
        with self._lock:
            oldest = int(self._clock() // MINUTE) - PERIOD_DAYS * 24 * 60
            for minute, cells in batch.minutes.items():
                negative = [-value for value in cells]
                if minute in self._minutes:
                    add(self._minutes, minute, negative)
                if minute // 60 in self._hours:
                    add(self._hours, minute // 60, negative)
                if minute > oldest:
                    add(self._pending, minute, cells)

    def pending(self) -> Batch:
        """A copy of what ``take`` has not taken yet."""
        with self._lock:
            return Batch({minute: list(cells) for minute, cells in self._pending.items()})

    def history(self) -> tuple[dict[int, Cells], dict[int, Cells]]:
        """This worker's own buckets since it started (taken and pending): minutes, hours."""
        with self._lock:
            minutes = {minute: list(cells) for minute, cells in self._minutes.items()}
            hours = {hour: list(cells) for hour, cells in self._hours.items()}
            for minute, cells in self._pending.items():
                add(minutes, minute, cells)
                add(hours, minute // 60, cells)
        return minutes, hours

    def _compact(self, now_minute: int) -> None:
        """Bound what waits for a publisher that cannot publish (Redis down or not configured):
        minutes older than ``KEEP_MINUTES`` are only read by the hour, so they are folded into
        their hour's first minute, and those older than 30 days dropped. Called with the lock
        held, at most once an hour."""
        self._compacted = now_minute
        oldest = now_minute - PERIOD_DAYS * 24 * 60
        for minute in [m for m in self._pending if m <= now_minute - KEEP_MINUTES]:
            cells = self._pending.pop(minute)
            if minute > oldest:
                add(self._pending, minute - minute % 60, cells)

    def _prune(self) -> None:
        now_minute = int(self._clock() // MINUTE)
        for minute in [m for m in self._minutes if m <= now_minute - KEEP_MINUTES]:
            del self._minutes[minute]
        oldest_hour = now_minute // 60 - PERIOD_DAYS * 24
        for hour in [h for h in self._hours if h <= oldest_hour]:
            del self._hours[hour]


def _sum(buckets: Mapping[int, Cells], newest: int, count: int) -> Cells:
    total = [0, 0, 0]
    for bucket in range(newest - count + 1, newest + 1):
        cells = buckets.get(bucket)
        if cells is not None:
            for index in range(3):
                total[index] += cells[index]
    return total


def _ratio(bad: int, of: int) -> float | None:
    return None if of == 0 else bad / of


def render_budget(
    minutes: Mapping[int, Cells],
    hours: Mapping[int, Cells],
    now: float,
    *,
    source: str,
    partial: bool,
    since: float | None = None,
) -> dict[str, Any]:
    """The ``slo`` section of ``/performance/stats`` from buckets (epoch minutes and hours).

    ``since``: when the counts begin (a worker's start); by default the start of the oldest
    hour of the 30 days that holds a request.
    """
    now_minute = int(now // MINUTE)
    now_hour = int(now // HOUR)
    totals: dict[str, Cells] = {}
    for window, count in MINUTE_WINDOWS.items():
        totals[window] = _sum(minutes, now_minute, count)
    for window, count in HOUR_WINDOWS.items():
        totals[window] = _sum(hours, now_hour, count)
    objectives: dict[str, Any] = {}
    for slo in OBJECTIVES:
        windows: dict[str, Any] = {}
        for window, cells in totals.items():
            if slo is AVAILABILITY:
                of, bad = cells[REQUESTS], cells[ERRORS]
            else:
                of, bad = cells[REQUESTS] - cells[ERRORS], cells[SLOW]
            ratio = _ratio(bad, of)
            windows[window] = {
                "requests": of,
                "bad": bad,
                "error_ratio": ratio,
                "burn_rate": None if ratio is None else ratio / slo.error_budget,
            }
        burn_30d = windows["30d"]["burn_rate"]
        objectives[slo.name] = {
            "objective": slo.objective,
            "error_budget": slo.error_budget,
            "budget_left": None if burn_30d is None else 1.0 - burn_30d,
            "windows": windows,
        }
    if since is None:
        oldest = now_hour - HOUR_WINDOWS["30d"]
        counted = [hour for hour, cells in hours.items() if cells[REQUESTS] and hour > oldest]
        since = min(counted) * HOUR if counted else None
    return {
        "source": source,
        "partial": partial,
        "since": None if since is None else timestamp(since),
        "period_days": PERIOD_DAYS,
        "latency_threshold_ms": LATENCY_THRESHOLD_SECONDS * 1000,
        "objectives": objectives,
    }


# The page alerts of alerts/slo.rules.yml (SalonReportsErrorBudgetBurn): a burn rate over both
# windows of a pair.
PAGE_BURNS = ((14.4, "1h", "5m"), (6.0, "6h", "30m"))


def budget_alert(budget: Mapping[str, Any]) -> dict[str, Any]:
    """The ``error_budget_burn`` entry of the stats' ``alerts``: breached while an SLO burns
    its budget as fast as ``SalonReportsErrorBudgetBurn`` pages for (14.4x over 1 h and 5 min,
    or 6x over 6 h and 30 min; now, without the rule's ``for``)."""
    reasons = []
    value: dict[str, Any] = {}
    for name, objective in budget["objectives"].items():
        windows = objective["windows"]
        value[name] = {window: windows[window]["burn_rate"] for window in ("5m", "1h", "30m", "6h")}
        for rate, long, short in PAGE_BURNS:
            burns = (windows[long]["burn_rate"], windows[short]["burn_rate"])
            if all(burn is not None and burn > rate for burn in burns):
                reasons.append(
                    f"{name}: {burns[0]:.1f}x over {long} and {burns[1]:.1f}x over {short}"
                    f" (> {rate:g}x)"
                )
                break
    return {
        "name": "error_budget_burn",
        "breached": bool(reasons),
        "value": value,
        "threshold": {f"{long}+{short}": rate for rate, long, short in PAGE_BURNS},
        "detail": "; ".join(reasons) or None,
    }
