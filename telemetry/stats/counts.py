"""The counting cells: everything counted in one time slot, in the since-start archive, or in a
merged view, and its JSON form (what a snapshot carries between workers)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from telemetry.sketch import DEFAULT_RELATIVE_ACCURACY, LatencySketch
from telemetry.stats.hit_rate import CACHE_RESULTS

INF = math.inf
NEVER = -(2**62)  # epoch of a slot that has never been used


class Endpoint:
    __slots__ = ("client_errors", "errors", "latency")

    def __init__(self, accuracy: float) -> None:
        self.latency = LatencySketch(accuracy)
        self.errors = 0
        self.client_errors = 0


class Query:
    __slots__ = ("latency", "rows", "slow_calls")

    def __init__(self, accuracy: float) -> None:
        self.latency = LatencySketch(accuracy)
        self.rows = 0
        self.slow_calls = 0


class Counts:
    """Everything counted in one time slot, in the since-start archive, or in a merged view."""

    __slots__ = (
        "accuracy",
        "cache",
        "end",
        "endpoints",
        "epoch",
        "freshness",
        "n_plus_one",
        "pool_timeouts",
        "queries",
        "start",
    )

    def __init__(self, accuracy: float, epoch: int = NEVER, slot_seconds: float = 0.0) -> None:
        self.accuracy = accuracy
        self.endpoints: dict[str, Endpoint] = {}
        self.queries: dict[str, Query] = {}
        self.cache: dict[str, list[int]] = {}
        self.freshness = LatencySketch(accuracy)  # commit -> applied, in ms
        self.n_plus_one = 0
        self.pool_timeouts = 0
        self.epoch = epoch
        # [start, end) of the slot in clock time; an empty range for the archive.
        self.start = epoch * slot_seconds if epoch != NEVER else INF
        self.end = self.start + slot_seconds if epoch != NEVER else -INF

    def absorb(self, other: Counts) -> None:
        for route, theirs in other.endpoints.items():
            endpoint = self.endpoints.get(route)
            if endpoint is None:
                endpoint = self.endpoints[route] = Endpoint(theirs.latency.relative_accuracy)
            endpoint.latency.merge(theirs.latency)
            endpoint.errors += theirs.errors
            endpoint.client_errors += theirs.client_errors
        for name, their_query in other.queries.items():
            query = self.queries.get(name)
            if query is None:
                query = self.queries[name] = Query(their_query.latency.relative_accuracy)
            query.latency.merge(their_query.latency)
            query.rows += their_query.rows
            query.slow_calls += their_query.slow_calls
        for report, their_counts in other.cache.items():
            counts = self.cache.get(report)
            if counts is None:
                counts = self.cache[report] = [0] * len(CACHE_RESULTS)
            for index, value in enumerate(their_counts):
                counts[index] += value
        self.freshness.merge(other.freshness)
        self.n_plus_one += other.n_plus_one
        self.pool_timeouts += other.pool_timeouts

    def to_dict(self) -> dict[str, Any]:
        return {
            "endpoints": {
                route: {
                    "errors": endpoint.errors,
                    "client_errors": endpoint.client_errors,
                    "latency": endpoint.latency.to_dict(),
                }
                for route, endpoint in sorted(self.endpoints.items())
            },
            "queries": {
                name: {
                    "rows": query.rows,
                    "slow_calls": query.slow_calls,
                    "latency": query.latency.to_dict(),
                }
                for name, query in sorted(self.queries.items())
            },
            "cache": {
                report: dict(zip(CACHE_RESULTS, counts, strict=True))
                for report, counts in sorted(self.cache.items())
            },
            "freshness": self.freshness.to_dict(),
            "n_plus_one": self.n_plus_one,
            "pool_timeouts": self.pool_timeouts,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Counts:
        counts = cls(DEFAULT_RELATIVE_ACCURACY)
        for route, entry in data["endpoints"].items():
            latency = LatencySketch.from_dict(entry["latency"])
            endpoint = counts.endpoints[str(route)] = Endpoint(latency.relative_accuracy)
            endpoint.latency = latency
            endpoint.errors = count(entry["errors"])
            endpoint.client_errors = count(entry["client_errors"])
        for name, entry in data["queries"].items():
            latency = LatencySketch.from_dict(entry["latency"])
            query = counts.queries[str(name)] = Query(latency.relative_accuracy)
            query.latency = latency
            query.rows = count(entry["rows"])
            query.slow_calls = count(entry["slow_calls"])
        for report, by_result in data["cache"].items():
            counts.cache[str(report)] = [count(by_result[result]) for result in CACHE_RESULTS]
        if "freshness" in data:
            counts.freshness = LatencySketch.from_dict(data["freshness"])
        counts.n_plus_one = count(data["n_plus_one"])
        counts.pool_timeouts = count(data["pool_timeouts"])
        return counts


def count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    return value


def timestamp(seconds: float) -> str:
    """ISO 8601 UTC with milliseconds; fixed width, so these strings sort chronologically."""
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat(timespec="milliseconds")


def rounded_ms(value: float | None) -> float | None:
    """Milliseconds as rendered: to the microsecond."""
    return None if value is None else round(value, 3)


def ms_to_seconds(milliseconds: float | None) -> float | None:
    """Seconds as rendered, from milliseconds: to the 0.1 ms."""
    return None if milliseconds is None else round(milliseconds / 1000, 4)
