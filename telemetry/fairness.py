"""What the fair share between tenants does, as metrics and as a stats snapshot.

``service/fairness.py`` keeps a ``FairnessCounts`` up to date; this module reads it. Emits
(observed at collection, like the cache counter: a dict increment on the request path):

- ``reports.fairness.admitted`` (counter, {request}): computations let through, by
  ``tenant_class`` (``owner``: one salon's owners; ``admin``: the admin back office and
  platform-wide reports);
- ``reports.fairness.queued`` (counter, {request}): of those and of the throttled, how many had
  to wait for their tenant's turn first, by ``tenant_class``;
- ``reports.fairness.throttled`` (counter, {request}): answered 429, by ``tenant_class`` and
  ``reason`` (``queue_full``: the tenant already had its whole queue waiting;
  ``queue_timeout``: its turn did not come within the queue's wait);
- ``reports.fairness.waiting`` / ``reports.fairness.running`` (gauges, {request}): waiting for
  a turn / computing now, by ``tenant_class``;
- ``reports.fairness.degraded`` (counter, {request}): computations admitted on this worker's
  share alone because the shared (Redis) count could not be read;
- ``reports.fairness.delayed`` (counter, {request}): of the throttled, those answered only
  after the repeat refusal's delay (``REPORTS_TENANT_REPEAT_REFUSAL_DELAY``).

Labels are classes, never salon ids: one series per salon would grow without bound. Which
salons wait or were throttled is in the stats snapshot (``/performance/stats``, admin and ops
only), not in the metrics.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation

TENANT_CLASS = "tenant_class"
THROTTLE_REASON = "reason"
TENANT_CLASSES = ("owner", "admin")
THROTTLE_REASONS = ("queue_full", "queue_timeout")
WINDOW_SECONDS = 300.0
_SLOT_SECONDS = 10.0
RECENT_TENANTS = 20  # tenants listed in the stats: waiting or throttled first, then busiest
# "Throttling persists": more than 0.1 throttled requests a second over 5 minutes (30 in the
# window). The stats' ``tenant_throttling`` alert and the rule SalonReportsTenantThrottled
# (which also asks for 10 minutes of it) use this; telemetry/README.md defines it.
THROTTLED_PER_SECOND_MAX = 0.1
_ADMITTED, _QUEUED, _THROTTLED = 1, 2, 3  # columns of a slot: [start, admitted, queued, throttled]


@dataclass
class _Tenant:
    tenant_class: str
    salon_id: int | None
    running: int = 0
    waiting: int = 0
    slots: deque[list[float]] = field(default_factory=deque)  # 10-second slots, oldest first
    last_throttled_at: float = 0.0


@dataclass
class FairnessCounts:
    """Counters by class, and per tenant what it does now and did in the last 5 minutes.

    Only tenants with something running, waiting or recorded in the window are kept, so the
    memory follows the number of active salons, not of all salons.
    """

    clock: Callable[[], float] = time.time
    admitted: Counter[str] = field(default_factory=Counter)
    queued: Counter[str] = field(default_factory=Counter)
    throttled: Counter[tuple[str, str]] = field(default_factory=Counter)
    degraded: int = 0
    delayed: int = 0  # refusals answered after the repeat refusal's delay
    settings: dict[str, Any] = field(default_factory=dict)  # the limits, shown in the stats
    _tenants: dict[str, _Tenant] = field(default_factory=dict)

    def _tenant(self, key: str, tenant_class: str, salon_id: int | None) -> _Tenant:
        tenant = self._tenants.get(key)
        if tenant is None:
            tenant = self._tenants[key] = _Tenant(tenant_class, salon_id)
        return tenant

    def change(
        self,
        key: str,
        tenant_class: str,
        salon_id: int | None,
        *,
        running: int = 0,
        waiting: int = 0,
    ) -> None:
        """Add to what a tenant has running and waiting now."""
        tenant = self._tenant(key, tenant_class, salon_id)
        tenant.running += running
        tenant.waiting += waiting
        self._forget_if_idle(key, tenant)

    def record_admitted(self, key: str, tenant_class: str, salon_id: int | None) -> None:
        self.admitted[tenant_class] += 1
        self._count(self._tenant(key, tenant_class, salon_id), _ADMITTED)

    def record_queued(self, key: str, tenant_class: str, salon_id: int | None) -> None:
        self.queued[tenant_class] += 1
        self._count(self._tenant(key, tenant_class, salon_id), _QUEUED)

    def record_throttle(
        self, key: str, tenant_class: str, salon_id: int | None, reason: str
    ) -> None:
        self.throttled[(tenant_class, reason)] += 1
        tenant = self._tenant(key, tenant_class, salon_id)
        tenant.last_throttled_at = self._count(tenant, _THROTTLED)

    def _count(self, tenant: _Tenant, column: int) -> float:
        at = self.clock()
        slot = at - at % _SLOT_SECONDS
        if not tenant.slots or tenant.slots[-1][0] != slot:
            tenant.slots.append([slot, 0, 0, 0])
        tenant.slots[-1][column] += 1
        self._prune(tenant, at)
        return at

    @staticmethod
    def _prune(tenant: _Tenant, at: float) -> None:
        while tenant.slots and tenant.slots[0][0] <= at - WINDOW_SECONDS:
            tenant.slots.popleft()

    def _forget_if_idle(self, key: str, tenant: _Tenant) -> None:
        self._prune(tenant, self.clock())
        if tenant.running <= 0 and tenant.waiting <= 0 and not tenant.slots:
            self._tenants.pop(key, None)

    def by_class(self, field_name: str) -> dict[str, int]:
        """Running or waiting now, summed per class."""
        totals = dict.fromkeys(TENANT_CLASSES, 0)
        for tenant in self._tenants.values():
            totals[tenant.tenant_class] = totals.get(tenant.tenant_class, 0) + getattr(
                tenant, field_name
            )
        return totals

    def snapshot(self) -> dict[str, Any]:
        """This worker's figures, JSON-serialisable, for ``merge_fairness``."""
        at = self.clock()
        tenants = []
        for key, tenant in list(self._tenants.items()):
            self._forget_if_idle(key, tenant)
            if key not in self._tenants:
                continue
            tenants.append(
                {
                    "tenant": key,
                    "class": tenant.tenant_class,
                    "salon_id": tenant.salon_id,
                    "running": tenant.running,
                    "waiting": tenant.waiting,
                    "admitted_last_5m": int(sum(slot[_ADMITTED] for slot in tenant.slots)),
                    "queued_last_5m": int(sum(slot[_QUEUED] for slot in tenant.slots)),
                    "throttled_last_5m": int(sum(slot[_THROTTLED] for slot in tenant.slots)),
                    "last_throttled_at": _iso(tenant.last_throttled_at),
                }
            )
        tenants.sort(key=_busiest)
        return {
            "taken_at": at,
            "settings": dict(self.settings),
            "admitted": dict(self.admitted),
            "queued": dict(self.queued),
            "throttled": [
                {"class": tenant_class, "reason": reason, "count": count}
                for (tenant_class, reason), count in self.throttled.items()
            ],
            "degraded": self.degraded,
            "delayed": self.delayed,
            "tenants": tenants[: RECENT_TENANTS * 5],
        }


def _iso(seconds: float) -> str | None:
    if not seconds:
        return None
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")


def _busiest(row: Mapping[str, Any]) -> tuple[int, ...]:
    """Waiting now first, then throttled, queued, running, computed."""
    return (
        -row["waiting"],
        -row["throttled_last_5m"],
        -row["queued_last_5m"],
        -row["running"],
        -row["admitted_last_5m"],
    )


_ROW_COUNTS = ("running", "waiting", "admitted_last_5m", "queued_last_5m", "throttled_last_5m")


def merge_fairness(snapshots: Sequence[Mapping[str, Any] | None]) -> dict[str, Any]:
    """Every worker's fairness figures as one view (the ``fairness`` of the stats)."""
    admitted: Counter[str] = Counter()
    queued: Counter[str] = Counter()
    throttled: Counter[str] = Counter()
    throttled_by_reason: Counter[str] = Counter()
    degraded = delayed = 0
    settings: dict[str, Any] = {}
    tenants: dict[str, dict[str, Any]] = {}
    for snapshot in snapshots:
        if not snapshot:
            continue
        settings = settings or dict(snapshot.get("settings", {}))
        admitted.update(snapshot.get("admitted", {}))
        queued.update(snapshot.get("queued", {}))
        for row in snapshot.get("throttled", []):
            throttled[str(row["class"])] += int(row["count"])
            throttled_by_reason[str(row["reason"])] += int(row["count"])
        degraded += int(snapshot.get("degraded", 0))
        delayed += int(snapshot.get("delayed", 0))
        for row in snapshot.get("tenants", []):
            merged = tenants.setdefault(
                str(row["tenant"]),
                {
                    "tenant": row["tenant"],
                    "class": row["class"],
                    "salon_id": row["salon_id"],
                    **dict.fromkeys(_ROW_COUNTS, 0),
                    "last_throttled_at": None,
                },
            )
            for name in _ROW_COUNTS:
                merged[name] += int(row[name])
            last = row.get("last_throttled_at")
            if last is not None and (merged["last_throttled_at"] or "") < last:
                merged["last_throttled_at"] = last
    rows = sorted(tenants.values(), key=_busiest)
    return {
        "settings": settings,
        "since_start": {
            "admitted": {name: admitted.get(name, 0) for name in TENANT_CLASSES},
            "queued": {name: queued.get(name, 0) for name in TENANT_CLASSES},
            "throttled": {name: throttled.get(name, 0) for name in TENANT_CLASSES},
            "throttled_by_reason": {
                name: throttled_by_reason.get(name, 0) for name in THROTTLE_REASONS
            },
            "degraded": degraded,
            "delayed": delayed,
        },
        "now": {
            name: {
                tenant_class: sum(row[name] for row in rows if row["class"] == tenant_class)
                for tenant_class in TENANT_CLASSES
            }
            for name in ("running", "waiting")
        },
        "tenants": rows[:RECENT_TENANTS],
        "alert": throttling_alert(sum(row["throttled_last_5m"] for row in rows)),
    }


def throttling_alert(throttled_in_window: int) -> dict[str, Any]:
    """The stats' ``tenant_throttling`` entry: throttles of the last 5 minutes against the rule."""
    threshold = THROTTLED_PER_SECOND_MAX * WINDOW_SECONDS
    return {
        "name": "tenant_throttling",
        "breached": throttled_in_window > threshold,
        "value": throttled_in_window,
        "threshold": threshold,
        "detail": f"requests answered 429 in the last {int(WINDOW_SECONDS)} s",
    }


def register_fairness(meter: Meter, counts: FairnessCounts) -> None:
    """The ``reports.fairness.*`` instruments, reading ``counts`` at collection."""

    def admitted(_: CallbackOptions) -> Iterable[Observation]:
        for name in TENANT_CLASSES:
            yield Observation(counts.admitted.get(name, 0), {TENANT_CLASS: name})

    def queued(_: CallbackOptions) -> Iterable[Observation]:
        for name in TENANT_CLASSES:
            yield Observation(counts.queued.get(name, 0), {TENANT_CLASS: name})

    def throttled(_: CallbackOptions) -> Iterable[Observation]:
        for name in TENANT_CLASSES:
            for reason in THROTTLE_REASONS:
                yield Observation(
                    counts.throttled.get((name, reason), 0),
                    {TENANT_CLASS: name, THROTTLE_REASON: reason},
                )

    def now(field_name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_: CallbackOptions) -> Iterable[Observation]:
            for name, value in counts.by_class(field_name).items():
                yield Observation(value, {TENANT_CLASS: name})

        return observe

    def degraded(_: CallbackOptions) -> Iterable[Observation]:
        yield Observation(counts.degraded)

    def delayed(_: CallbackOptions) -> Iterable[Observation]:
        yield Observation(counts.delayed)

    meter.create_observable_counter(
        "reports.fairness.admitted",
        callbacks=[admitted],
        unit="{request}",
        description="Report computations let through by the per-tenant share, by tenant class.",
    )
    meter.create_observable_counter(
        "reports.fairness.queued",
        callbacks=[queued],
        unit="{request}",
        description="Report computations that waited for their tenant's turn, by tenant class.",
    )
    meter.create_observable_counter(
        "reports.fairness.throttled",
        callbacks=[throttled],
        unit="{request}",
        description="Requests answered 429: over the tenant's share, by tenant class and reason.",
    )
    meter.create_observable_gauge(
        "reports.fairness.waiting",
        callbacks=[now("waiting")],
        unit="{request}",
        description="Report computations waiting for their tenant's turn now, by tenant class.",
    )
    meter.create_observable_gauge(
        "reports.fairness.running",
        callbacks=[now("running")],
        unit="{request}",
        description="Report computations holding a tenant's share now, by tenant class.",
    )
    meter.create_observable_counter(
        "reports.fairness.degraded",
        callbacks=[degraded],
        unit="{request}",
        description="Computations admitted on this worker's share alone (shared count unreadable).",
    )
    meter.create_observable_counter(
        "reports.fairness.delayed",
        callbacks=[delayed],
        unit="{request}",
        description="Refusals answered after the repeat refusal's delay (same tenant and worker).",
    )
