"""The report cache (Redis cache-aside, never wrong) and its invalidation listener.

One feature per module: ``keys`` (what goes into a key), ``entry`` (the stored value, its ETag,
what a fetch served), ``breaker`` (the circuit breaker in front of Redis), ``local`` (the
in-process tier), ``flight`` (single flight in a process), ``scripts`` (the Lua),
``invalidation`` (announced changes and the clears), ``store`` (``ReportCache``: fetch, the
cross-process lock, stale-while-revalidate) and ``listener`` (``LISTEN`` for changes). The cache
knows no report: the app tells it which reports it caches and which errors mean the database is
down.
"""

from service.cache.breaker import CircuitBreaker
from service.cache.entry import CacheEntry, CacheResult, Outcome
from service.cache.keys import NAMESPACE, PLATFORM_TAG, CacheKey, build_key, scope_tag
from service.cache.local import LocalTier
from service.cache.store import ReportCache

__all__ = [
    "NAMESPACE",
    "PLATFORM_TAG",
    "CacheEntry",
    "CacheKey",
    "CacheResult",
    "CircuitBreaker",
    "LocalTier",
    "Outcome",
    "ReportCache",
    "build_key",
    "scope_tag",
]
