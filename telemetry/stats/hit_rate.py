"""The cache hit rate, defined once (``telemetry/README.md``, "Cache hit rate").

A cache lookup ends as one of ``CACHE_RESULTS``. The hit rate over a window is

    (hit + stale) / (hit + stale + miss + error)

``stale`` is a hit (the client got a cached answer without waiting for PostgreSQL); ``error``
(Redis failed, the answer came from PostgreSQL) is a lookup the cache did not serve, like a
miss; ``bypass`` (the cache was not consulted: untrusted, circuit open, no Redis) is no lookup.
The window is the last 5 minutes; the hit rate is judged (the alert, the page's banner) only
once the window holds at least ``HIT_RATE_MIN_LOOKUPS`` lookups (0.2 a second), and it is low
under ``HIT_RATE_MIN``. The stats, the Prometheus rule, the Grafana panel and the performance
page all follow this; ``tests/telemetry/test_hit_rate.py`` holds them to it.
"""

from __future__ import annotations

from collections.abc import Sequence

CACHE_RESULTS = ("hit", "miss", "stale", "error", "bypass")
CACHE_INDEX = {result: index for index, result in enumerate(CACHE_RESULTS)}
HIT, MISS, STALE, ERROR, BYPASS = range(len(CACHE_RESULTS))

HIT_RATE_WINDOW_SECONDS = 300.0
HIT_RATE_MIN = 0.70
HIT_RATE_MIN_LOOKUPS = 60  # 0.2 lookups a second over the window


def cache_hit_rate(hits: int, stale: int, misses: int, errors: int) -> float | None:
    """(hit + stale) / (hit + stale + miss + error); ``None`` without any lookup."""
    lookups = hits + stale + misses + errors
    return (hits + stale) / lookups if lookups else None


def cache_lookups(by_result: Sequence[int]) -> int:
    """Every lookup of counts indexed like ``CACHE_RESULTS``: all but bypass."""
    return by_result[HIT] + by_result[STALE] + by_result[MISS] + by_result[ERROR]


def cache_hit_rate_of(by_result: Sequence[int]) -> float | None:
    """The hit rate of counts indexed like ``CACHE_RESULTS``."""
    return cache_hit_rate(by_result[HIT], by_result[STALE], by_result[MISS], by_result[ERROR])
