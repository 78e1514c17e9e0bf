"""The ``/performance/stats`` response body, from a ``merge_snapshots`` result."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from telemetry.sketch import LatencySketch
from telemetry.stats.alerts import Thresholds, evaluate_alerts, freshness_alert, memory_ratio
from telemetry.stats.counts import Counts, ms_to_seconds, rounded_ms
from telemetry.stats.hit_rate import (
    BYPASS,
    CACHE_RESULTS,
    ERROR,
    HIT,
    MISS,
    STALE,
    cache_hit_rate_of,
    cache_lookups,
)
from telemetry.stats.window import POOL_KEYS

QUANTILES = (0.5, 0.95, 0.99)


def render(merged: Mapping[str, Any], thresholds: Thresholds | None = None) -> dict[str, Any]:
    """The ``/performance/stats`` response body from a ``merge_snapshots`` result."""
    thresholds = thresholds if thresholds is not None else Thresholds()
    since_start = Counts.from_dict(merged["since_start"])
    window = Counts.from_dict(merged["last_window"])
    pool = merged["pool"]
    memory = merged["memory"]
    return {
        "workers": merged["workers"],
        "worker_ids": list(merged["worker_ids"]),
        "partial": merged["partial"],
        "taken_at": merged["taken_at"],
        "window_seconds": merged["window_seconds"],
        "since_start": _render_counts(since_start),
        "last_5m": _render_counts(window),
        "pool": None
        if pool is None
        else {
            **{key: pool[key] for key in POOL_KEYS},
            "timeouts_last_5m": window.pool_timeouts,
            "workers": pool["workers"],
        },
        "memory": None if memory is None else {**memory, "usage_ratio": memory_ratio(memory)},
        "freshness": {
            "since_start": _render_freshness(since_start.freshness),
            "last_5m": _render_freshness(window.freshness),
            "change_stream": merged.get("change_stream"),
        },
        "recent_slow_queries": list(merged["recent_slow_queries"]),
        "n_plus_one": {
            "total": merged["n_plus_one"]["total"],
            "last_5m": window.n_plus_one,
            "recent": list(merged["n_plus_one"]["recent"]),
        },
        "alerts": [
            *evaluate_alerts(window, pool, memory, thresholds),
            freshness_alert(window, merged.get("change_stream"), thresholds),
        ],
    }


def _render_freshness(lags: LatencySketch) -> dict[str, Any]:
    """Commit -> applied to the derived data, in seconds."""
    p50, p99 = lags.quantiles((0.5, 0.99))
    return {
        "applied": lags.count,
        "p50_s": ms_to_seconds(p50),
        "p99_s": ms_to_seconds(p99),
        "max_s": ms_to_seconds(lags.max),
    }


def _render_counts(counts: Counts) -> dict[str, Any]:
    endpoints: dict[str, dict[str, Any]] = {}
    for route, endpoint in sorted(counts.endpoints.items()):
        p50, p95, p99 = endpoint.latency.quantiles(QUANTILES)
        endpoints[route] = {
            "count": endpoint.latency.count,
            "errors": endpoint.errors,
            "client_errors": endpoint.client_errors,
            "p50_ms": rounded_ms(p50),
            "p95_ms": rounded_ms(p95),
            "p99_ms": rounded_ms(p99),
            "max_ms": rounded_ms(endpoint.latency.max),
        }
    queries = {
        name: {
            "calls": query.latency.count,
            "mean_ms": rounded_ms(query.latency.mean),
            "p95_ms": rounded_ms(query.latency.quantile(0.95)),
            "max_ms": rounded_ms(query.latency.max),
            "rows": query.rows,
            "slow_calls": query.slow_calls,
        }
        for name, query in sorted(counts.queries.items())
    }
    totals = [0] * len(CACHE_RESULTS)
    by_report: dict[str, dict[str, Any]] = {}
    for report, by_result in sorted(counts.cache.items()):
        by_report[report] = _render_cache(by_result)
        for index, value in enumerate(by_result):
            totals[index] += value
    return {
        "endpoints": endpoints,
        "queries": queries,
        "cache": {**_render_cache(totals), "by_report": by_report},
    }


def _render_cache(by_result: Sequence[int]) -> dict[str, Any]:
    return {
        "hits": by_result[HIT],
        "misses": by_result[MISS],
        "stale": by_result[STALE],
        "errors": by_result[ERROR],
        "bypass": by_result[BYPASS],
        "lookups": cache_lookups(by_result),
        "hit_rate": cache_hit_rate_of(by_result),
    }
