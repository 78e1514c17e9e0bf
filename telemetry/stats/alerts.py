"""The alerts of ``/performance/stats``, evaluated in process on the last window.

The thresholds are those of ``telemetry/README.md`` (the same as the Prometheus rules):

- ``query_p95``: the worst per-query p95 is > 500 ms (sketch estimate, within 1 %);
- ``cache_hit_rate``: the hit rate (``hit_rate.py``) is < 0.70, once the window holds at least
  ``HIT_RATE_MIN_LOOKUPS`` lookups;
- ``pool_exhaustion``: some worker has ``waiting > 0`` or ``in_use >= size``, or a pool checkout
  timed out within the window;
- ``memory``: resident memory > 80 % of the limit (workers on one host share its limit, so their
  RSS is summed per host; the worst host counts);
- ``freshness``: the change stream's lag p99 > 5 s, a slot retaining over 1 GiB, or the stream
  not current.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from telemetry.stats.counts import Counts, ms_to_seconds, rounded_ms
from telemetry.stats.hit_rate import (
    CACHE_RESULTS,
    HIT_RATE_MIN,
    HIT_RATE_MIN_LOOKUPS,
    cache_hit_rate_of,
    cache_lookups,
)


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Alert thresholds (``telemetry/README.md``); each says which comparison breaches it."""

    query_p95_ms: float = 500.0  # breached when the worst query p95 > this
    cache_hit_rate_min: float = HIT_RATE_MIN  # breached when hit rate < this ...
    cache_min_lookups: int = HIT_RATE_MIN_LOOKUPS  # ... and the window has this many lookups
    pool_max_waiting: int = 0  # breached when a worker's waiting > this
    pool_max_timeouts_in_window: int = 0  # or checkout timeouts in the window > this
    pool_in_use_ratio: float = 1.0  # or a worker's in_use >= this * size
    memory_ratio_max: float = 0.80  # breached when rss / limit > this
    freshness_p99_seconds: float = 5.0  # breached when the window's lag p99 > this ...
    retained_wal_bytes: int = 1024**3  # ... or a slot retains more WAL, or the stream is lost


def freshness_alert(
    window: Counts, stream: Mapping[str, Any] | None, thresholds: Thresholds
) -> dict[str, Any]:
    reasons = []
    p99 = window.freshness.quantile(0.99)
    if p99 is not None and p99 / 1000 > thresholds.freshness_p99_seconds:
        reasons.append(f"lag p99 {p99 / 1000:.2f} s over the window")
    if stream is not None:
        if stream["state"] != "current":
            reasons.append(f"change stream {stream['state']}: {stream['reason']}")
        if stream["retained_wal_bytes"] > thresholds.retained_wal_bytes:
            reasons.append(f"the slot retains {stream['retained_wal_bytes']} bytes of WAL")
    return {
        "name": "freshness",
        "breached": bool(reasons),
        "value": {
            "p99_s": ms_to_seconds(p99),
            "state": None if stream is None else stream["state"],
            "retained_wal_bytes": None if stream is None else stream["retained_wal_bytes"],
        },
        "threshold": {
            "p99_s": thresholds.freshness_p99_seconds,
            "retained_wal_bytes": thresholds.retained_wal_bytes,
        },
        "detail": "; ".join(reasons) or None,
    }


def memory_ratio(memory: Mapping[str, Any]) -> float | None:
    ratios = [
        host["rss_bytes"] / host["limit_bytes"] for host in memory["hosts"] if host["limit_bytes"]
    ]
    return max(ratios) if ratios else None


def evaluate_alerts(
    window: Counts,
    pool: Mapping[str, Any] | None,
    memory: Mapping[str, Any] | None,
    thresholds: Thresholds,
) -> list[dict[str, Any]]:
    """The thresholds against the last window and the current gauges."""
    alerts = []

    worst_name, worst_p95 = None, None
    for name, query in sorted(window.queries.items()):
        p95 = query.latency.quantile(0.95)
        if p95 is not None and (worst_p95 is None or p95 > worst_p95):
            worst_name, worst_p95 = name, p95
    alerts.append(
        {
            "name": "query_p95",
            "breached": worst_p95 is not None and worst_p95 > thresholds.query_p95_ms,
            "value": rounded_ms(worst_p95),
            "threshold": thresholds.query_p95_ms,
            "detail": None if worst_name is None else f"slowest query: {worst_name}",
        }
    )

    totals = [
        sum(by_result[index] for by_result in window.cache.values())
        for index in range(len(CACHE_RESULTS))
    ]
    lookups = cache_lookups(totals)
    hit_rate = cache_hit_rate_of(totals)
    alerts.append(
        {
            "name": "cache_hit_rate",
            "breached": hit_rate is not None
            and lookups >= thresholds.cache_min_lookups
            and hit_rate < thresholds.cache_hit_rate_min,
            "value": hit_rate,
            "threshold": thresholds.cache_hit_rate_min,
            "detail": f"{lookups} lookups in the window "
            f"(evaluated from {thresholds.cache_min_lookups})",
        }
    )

    alerts.append(pool_alert(window, pool, thresholds))

    ratio = None if memory is None else memory_ratio(memory)
    alerts.append(
        {
            "name": "memory",
            "breached": ratio is not None and ratio > thresholds.memory_ratio_max,
            "value": ratio,
            "threshold": thresholds.memory_ratio_max,
            "detail": None if ratio is not None else "no memory limit reported",
        }
    )
    return alerts


def pool_alert(
    window: Counts, pool: Mapping[str, Any] | None, thresholds: Thresholds
) -> dict[str, Any]:
    threshold = {
        "waiting": thresholds.pool_max_waiting,
        "timeouts_in_window": thresholds.pool_max_timeouts_in_window,
        "in_use_ratio": thresholds.pool_in_use_ratio,
    }
    reasons = []
    if window.pool_timeouts > thresholds.pool_max_timeouts_in_window:
        reasons.append(f"{window.pool_timeouts} checkout timeouts in the window")
    value = None
    if pool is not None:
        value = {key: pool[key] for key in ("size", "in_use", "waiting")}
        for worker in pool["workers"]:
            if worker["waiting"] > thresholds.pool_max_waiting:
                reasons.append(f"worker {worker['worker']}: {worker['waiting']} waiting")
            if (
                worker["size"] > 0
                and worker["in_use"] >= thresholds.pool_in_use_ratio * worker["size"]
            ):
                reasons.append(
                    f"worker {worker['worker']}: {worker['in_use']} of {worker['size']} in use"
                )
    value = {**(value or {}), "timeouts_in_window": window.pool_timeouts}
    return {
        "name": "pool_exhaustion",
        "breached": bool(reasons),
        "value": value,
        "threshold": threshold,
        "detail": "; ".join(reasons) or None,
    }
