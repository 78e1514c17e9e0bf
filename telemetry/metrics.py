"""Every metric instrument of the service (see telemetry/README.md for the full list).

Emits: ``http.server.request.duration``, ``db.client.operation.duration``,
``db.client.response.returned_rows``, ``db.client.connection.count`` / ``.max`` /
``.pending_requests`` / ``.timeouts``, ``reports.cache.requests``, ``process.memory.usage``,
``reports.memory.limit``, ``reports.freshness.lag``, the fair share's ``reports.fairness.*``
(``telemetry/fairness.py``) and the change stream's
``reports.change_stream.backlog`` / ``.retained_wal`` / ``.lost`` / ``.consumer``.
"""

from __future__ import annotations

import os
import resource
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from telemetry import attributes as attr
from telemetry.fairness import FairnessCounts, register_fairness

DURATION_BUCKETS_SECONDS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)
ROW_BUCKETS = (0, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 5000, 10000)
FRESHNESS_BUCKETS_SECONDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


@dataclass
class StreamGauges:
    """The change stream as this worker last saw it, read when metrics are collected."""

    state: str = "uninitialised"  # current | uninitialised | lost
    reason: str | None = None
    lost: bool = False
    backlog_bytes: int = 0  # WAL not yet acknowledged by the consumer
    retained_wal_bytes: int = 0  # WAL the slot keeps on the server's disk
    consumer: bool = False  # this worker is the one that folds the stream

    def as_dict(self) -> dict[str, object]:
        return {
            "state": self.state,
            "reason": self.reason,
            "backlog_bytes": self.backlog_bytes,
            "retained_wal_bytes": self.retained_wal_bytes,
            "consumer": self.consumer,
        }


@dataclass(frozen=True, slots=True)
class PoolStatus:
    size: int  # connections currently open
    in_use: int
    max: int
    waiting: int
    timeouts: int


@dataclass
class PoolGauges:
    """Live figures of one connection pool, read when metrics are collected."""

    name: str
    status: Callable[[], tuple[int, int, int]]  # (checked in, checked out, max)
    waiting: int = 0
    timeouts: int = 0
    instruments: Instruments | None = None

    def read(self) -> PoolStatus:
        idle, used, maximum = self.status()
        return PoolStatus(idle + used, used, maximum, self.waiting, self.timeouts)

    def _record(self, histogram: str, seconds: float) -> None:
        if self.instruments is not None:
            getattr(self.instruments, histogram).record(
                seconds, {"db.client.connection.pool.name": self.name}
            )

    def record_wait(self, seconds: float) -> None:
        """db.client.connection.wait_time: from asking for a connection to having one."""
        self._record("connection_wait_time", seconds)

    def record_use(self, seconds: float) -> None:
        """db.client.connection.use_time: from having a connection to giving it back."""
        self._record("connection_use_time", seconds)

    def record_create(self, seconds: float) -> None:
        """db.client.connection.create_time: opening a new connection."""
        self._record("connection_create_time", seconds)


def rss_bytes() -> int:
    """Resident set size of this process."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_limit_bytes() -> int:
    """The cgroup memory limit where there is one, else physical memory."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < physical:
            return int(text)
    return physical


REPLICA_WAIT_OUTCOMES = ("acknowledged", "timeout", "no_replica")  # service/cache/durability.py


@dataclass
class Instruments:
    """The instruments, created once per meter provider."""

    meter: Meter
    pools: list[PoolGauges] = field(default_factory=list)
    stream: StreamGauges | None = None
    fairness: FairnessCounts = field(default_factory=FairnessCounts)
    # The invalidations' WAITs for a replica, by outcome (service/cache/durability.py).
    replica_waits: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        meter = self.meter
        register_fairness(meter, self.fairness)
        self.request_duration = meter.create_histogram(
            "http.server.request.duration",
            unit="s",
            description="Duration of HTTP server requests.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS_SECONDS,
        )
        self.db_duration = meter.create_histogram(
            "db.client.operation.duration",
            unit="s",
            description="Duration of database statements, by query name.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS_SECONDS,
        )
        self.db_rows = meter.create_histogram(
            "db.client.response.returned_rows",
            unit="{row}",
            description="Rows returned by database statements, by query name.",
            explicit_bucket_boundaries_advisory=ROW_BUCKETS,
        )
        self.connection_wait_time = meter.create_histogram(
            "db.client.connection.wait_time",
            unit="s",
            description="Time a request waited for a connection of the pool.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS_SECONDS,
        )
        self.connection_use_time = meter.create_histogram(
            "db.client.connection.use_time",
            unit="s",
            description="Time a connection was held before it went back to the pool.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS_SECONDS,
        )
        self.connection_create_time = meter.create_histogram(
            "db.client.connection.create_time",
            unit="s",
            description="Time it took to open a new connection.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS_SECONDS,
        )
        # Counted in a plain dict and observed at collection: exact at every scrape, and a
        # dict increment on the request path instead of an SDK measurement.
        self.cache_counts: Counter[tuple[str, str]] = Counter()
        meter.create_observable_counter(
            "reports.cache.requests",
            callbacks=[self._cache_requests],
            unit="{request}",
            description="Report cache lookups by report and result.",
        )
        meter.create_observable_counter(
            "reports.cache.invalidation.replica_waits",
            callbacks=[self._replica_waits],
            unit="{wait}",
            description="WAITs for a Redis replica after an invalidation, by outcome"
            " (acknowledged, timeout, no_replica).",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.count",
            callbacks=[self._connection_count],
            unit="{connection}",
            description="Open connections by state.",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.max",
            callbacks=[self._connection_max],
            unit="{connection}",
            description="The most connections the pool may open.",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.pending_requests",
            callbacks=[self._pending],
            unit="{request}",
            description="Requests waiting for a connection.",
        )
        meter.create_observable_counter(
            "db.client.connection.timeouts",
            callbacks=[self._timeouts],
            unit="{timeout}",
            description="Connection requests that timed out waiting.",
        )
        self.freshness_lag = meter.create_histogram(
            "reports.freshness.lag",
            unit="s",
            description="From a write's commit to its being applied to the derived data (and"
            " the cache invalidated), per transaction.",
            explicit_bucket_boundaries_advisory=FRESHNESS_BUCKETS_SECONDS,
        )
        for name, unit, description, read in (
            (
                "reports.change_stream.backlog",
                "By",
                "WAL written since the consumer's position (not yet applied).",
                lambda stream: stream.backlog_bytes,
            ),
            (
                "reports.change_stream.retained_wal",
                "By",
                "WAL the change stream's replication slot keeps on the server.",
                lambda stream: stream.retained_wal_bytes,
            ),
            (
                "reports.change_stream.lost",
                "{state}",
                "1 while the change stream's position is lost (derived data not current).",
                lambda stream: int(stream.lost),
            ),
            (
                "reports.change_stream.consumer",
                "{consumer}",
                "1 on the worker that folds the change stream, 0 on the others.",
                lambda stream: int(stream.consumer),
            ),
        ):
            meter.create_observable_gauge(
                name, callbacks=[self._stream_callback(read)], unit=unit, description=description
            )
        meter.create_observable_gauge(
            "process.memory.usage",
            callbacks=[self._memory],
            unit="By",
            description="Resident memory of this process.",
        )
        meter.create_observable_gauge(
            "reports.memory.limit",
            callbacks=[self._memory_limit],
            unit="By",
            description="Memory available to the process (cgroup limit, else physical).",
        )

    def count_cache(self, report: str, result: str) -> None:
        self.cache_counts[(report, result)] += 1

    def _cache_requests(self, _: CallbackOptions) -> Iterable[Observation]:
        for (report, result), count in list(self.cache_counts.items()):
            yield Observation(count, {attr.REPORT_NAME: report, attr.CACHE_RESULT: result})

    def _replica_waits(self, _: CallbackOptions) -> Iterable[Observation]:
        # Every outcome from the start (at 0): a rate of timeouts needs the series before the
        # first one.
        for outcome in REPLICA_WAIT_OUTCOMES:
            yield Observation(self.replica_waits.get(outcome, 0), {"outcome": outcome})

    def _connection_count(self, _: CallbackOptions) -> Iterable[Observation]:
        for pool in self.pools:
            status = pool.read()
            name = {attr.DB_CLIENT_CONNECTION_POOL_NAME: pool.name}
            yield Observation(
                status.size - status.in_use, {**name, attr.DB_CLIENT_CONNECTION_STATE: "idle"}
            )
            yield Observation(status.in_use, {**name, attr.DB_CLIENT_CONNECTION_STATE: "used"})

    def _per_pool(self, value: Callable[[PoolGauges], int]) -> Iterable[Observation]:
        for pool in self.pools:
            yield Observation(value(pool), {attr.DB_CLIENT_CONNECTION_POOL_NAME: pool.name})

    def _connection_max(self, _: CallbackOptions) -> Iterable[Observation]:
        return self._per_pool(lambda pool: pool.read().max)

    def _pending(self, _: CallbackOptions) -> Iterable[Observation]:
        return self._per_pool(lambda pool: pool.waiting)

    def _timeouts(self, _: CallbackOptions) -> Iterable[Observation]:
        return self._per_pool(lambda pool: pool.timeouts)

    def _stream_callback(
        self, read: Callable[[StreamGauges], int]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_: CallbackOptions) -> Iterable[Observation]:
            if self.stream is not None:
                yield Observation(read(self.stream))

        return observe

    @staticmethod
    def _memory(_: CallbackOptions) -> Iterable[Observation]:
        yield Observation(rss_bytes())

    @staticmethod
    def _memory_limit(_: CallbackOptions) -> Iterable[Observation]:
        yield Observation(memory_limit_bytes())
