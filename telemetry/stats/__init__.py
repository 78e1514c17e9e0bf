"""In-process aggregator behind ``GET /api/v1/optimized-reports/performance/stats``.

The service feeds one ``StatsAggregator`` per worker from its instrumentation — for **every**
request and query, whatever the trace sampler decides — and answers the endpoint with::

    snapshots = [aggregator.snapshot(pool=..., memory=...)] + other_workers_snapshots
    body = render(merge_snapshots(snapshots, partial=...), aggregator.thresholds)

A snapshot is a JSON-serialisable dict (latency sketches included), so workers can publish
theirs through Redis and any worker can merge them all; with Redis down, a worker renders its
own snapshot with ``partial=True``.

One concern per module: ``window`` (the aggregator: recording and the sliding window),
``counts`` (the counting cells and their JSON form), ``merge`` (several workers), ``render``
(the response body), ``alerts`` (the thresholds evaluated in process) and ``hit_rate`` (the
cache hit rate, defined once). Percentiles come from ``telemetry.sketch.LatencySketch``
(relative error <= 1 %). This package emits no metric, span or log line itself: the caller
records into it from its own instrumentation.
"""

from telemetry.stats.alerts import Thresholds
from telemetry.stats.hit_rate import CACHE_RESULTS, cache_hit_rate
from telemetry.stats.merge import merge_snapshots
from telemetry.stats.render import render
from telemetry.stats.window import OTHER_SERIES, SNAPSHOT_VERSION, StatsAggregator

__all__ = [
    "CACHE_RESULTS",
    "OTHER_SERIES",
    "SNAPSHOT_VERSION",
    "StatsAggregator",
    "Thresholds",
    "cache_hit_rate",
    "merge_snapshots",
    "render",
]
