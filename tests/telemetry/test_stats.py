"""StatsAggregator against ground truth: scripted workloads, a fake clock, several workers."""

from __future__ import annotations

import itertools
import json
import math
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from telemetry.nplusone import RequestQueryTracker, statement_fingerprint
from telemetry.sketch import LatencySketch
from telemetry.stats import (
    OTHER_SERIES,
    StatsAggregator,
    Thresholds,
    cache_hit_rate,
    merge_snapshots,
    render,
)

DASHBOARD = "GET /api/v1/optimized-reports/dashboard"
BOOKINGS = "GET /api/v1/optimized-reports/bookings"
POOL_IDLE = {"size": 5, "in_use": 1, "waiting": 0, "timeouts": 0}
MEMORY_LOW = {"rss_bytes": 100, "limit_bytes": 1000}


class FakeClock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def aggregator(clock: FakeClock, **options: Any) -> StatsAggregator:
    options.setdefault("worker_id", "w1")
    options.setdefault("host", "host-a")
    return StatsAggregator(clock=clock, wall_clock=clock, **options)


def body(*aggregators: StatsAggregator, **snapshot_options: Any) -> dict[str, Any]:
    snapshots = [agg.snapshot(**snapshot_options) for agg in aggregators]
    return render(merge_snapshots(snapshots), aggregators[0].thresholds)


def alert(response: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [entry for entry in response["alerts"] if entry["name"] == name]
    assert len(found) == 1
    return found[0]


def run_scripted_workload(stats: StatsAggregator) -> None:
    """40 dashboard requests (3 fail with 5xx, 2 with 4xx), 40 lookups with 7 misses, ..."""
    for index in range(40):
        status = 500 if index < 3 else 404 if index < 5 else 200
        stats.record_request(DASHBOARD, status, float(index + 1))  # 1 .. 40 ms
    for index in range(40):
        result = "miss" if index < 7 else "stale" if index < 10 else "hit"
        stats.record_cache("dashboard", result)
    for _ in range(2):
        stats.record_cache("dashboard", "error")
    for _ in range(5):
        stats.record_cache("realtime", "bypass")
    for index in range(10):
        trace = f"{index:032x}"
        stats.record_query("report.dashboard", 100.0 * (index + 1), 30, trace, DASHBOARD)


# -- ground truth ---------------------------------------------------------------------------


def test_scripted_workload_gives_exactly_its_counts(clock: FakeClock) -> None:
    stats = aggregator(clock)
    run_scripted_workload(stats)
    response = body(stats)

    for window in ("since_start", "last_5m"):
        endpoint = response[window]["endpoints"][DASHBOARD]
        assert (endpoint["count"], endpoint["errors"], endpoint["client_errors"]) == (40, 3, 2)
        assert endpoint["max_ms"] == 40.0
        # exact ranks: floor(q * 39) of 1..40 -> 20, 38, 39 ms
        assert endpoint["p50_ms"] == pytest.approx(20.0, rel=0.01)
        assert endpoint["p95_ms"] == pytest.approx(38.0, rel=0.01)
        assert endpoint["p99_ms"] == pytest.approx(39.0, rel=0.01)

        cache = response[window]["cache"]
        assert (cache["hits"], cache["misses"], cache["stale"]) == (30, 7, 3)
        assert (cache["errors"], cache["bypass"], cache["lookups"]) == (2, 5, 42)
        assert cache["hit_rate"] == 33 / 42
        assert cache["by_report"]["dashboard"]["hit_rate"] == 33 / 42
        assert cache["by_report"]["dashboard"]["errors"] == 2
        assert cache["by_report"]["realtime"] == {
            "hits": 0,
            "misses": 0,
            "stale": 0,
            "errors": 0,
            "bypass": 5,
            "lookups": 0,
            "hit_rate": None,
        }

        query = response[window]["queries"]["report.dashboard"]
        assert query == {
            "calls": 10,
            "mean_ms": 550.0,
            "p95_ms": pytest.approx(900.0, rel=0.01),  # rank floor(0.95 * 9) = 8
            "max_ms": 1000.0,
            "rows": 300,
            "slow_calls": 6,  # 500, 600, ..., 1000 ms: the threshold itself is slow
        }

    slow = response["recent_slow_queries"]
    assert [entry["duration_ms"] for entry in slow] == [1000.0, 900.0, 800.0, 700.0, 600.0, 500.0]
    assert slow[0] == {
        "name": "report.dashboard",
        "duration_ms": 1000.0,
        "rows": 30,
        "trace_id": f"{9:032x}",
        "route": DASHBOARD,
        "timestamp": "1970-01-01T00:16:40.000+00:00",
        "worker": "w1",
    }


def test_response_shape(clock: FakeClock) -> None:
    stats = aggregator(clock)
    run_scripted_workload(stats)
    response = body(stats, pool=POOL_IDLE, memory=MEMORY_LOW)
    assert {
        "workers",
        "partial",
        "since_start",
        "last_5m",
        "pool",
        "memory",
        "recent_slow_queries",
        "n_plus_one",
        "freshness",
        "alerts",
    } <= set(response)
    assert (response["workers"], response["partial"]) == (1, False)
    assert set(response["last_5m"]) == {"endpoints", "queries", "cache"}
    assert set(response["last_5m"]["endpoints"][DASHBOARD]) == {
        "count",
        "errors",
        "client_errors",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "max_ms",
    }
    assert [entry["name"] for entry in response["alerts"]] == [
        "query_p95",
        "cache_hit_rate",
        "pool_exhaustion",
        "memory",
        "freshness",
    ]
    for entry in response["alerts"]:
        assert {"name", "breached", "value", "threshold"} <= set(entry)
    json.dumps(response)  # the body is JSON as it stands


def test_hit_rate_counts_stale_as_hit_error_as_not_served_and_leaves_out_bypass(
    clock: FakeClock,
) -> None:
    # telemetry/README.md, "Cache hit rate": (hit + stale) / (hit + stale + miss + error).
    assert cache_hit_rate(hits=6, stale=2, misses=2, errors=0) == 0.8
    assert cache_hit_rate(hits=6, stale=2, misses=2, errors=10) == 0.4
    assert cache_hit_rate(hits=0, stale=0, misses=0, errors=0) is None
    stats = aggregator(clock)
    for result in ["hit"] * 6 + ["stale"] * 2 + ["miss"] * 2:
        stats.record_cache("bookings", result)
    before = body(stats)["last_5m"]["cache"]["hit_rate"]
    for _ in range(50):
        stats.record_cache("bookings", "bypass")
    assert body(stats)["last_5m"]["cache"]["hit_rate"] == before == 0.8
    for _ in range(10):
        stats.record_cache("bookings", "error")
    after = body(stats)["last_5m"]["cache"]
    assert after["hit_rate"] == 0.4
    assert (after["bypass"], after["errors"], after["lookups"]) == (50, 10, 20)


def test_only_bypass_gives_no_hit_rate(clock: FakeClock) -> None:
    stats = aggregator(clock)
    stats.record_cache("dashboard", "bypass")
    response = body(stats)
    assert response["last_5m"]["cache"]["hit_rate"] is None
    assert alert(response, "cache_hit_rate")["breached"] is False
    stats.record_cache("dashboard", "error")  # a lookup the cache did not serve
    response = body(stats)
    assert response["last_5m"]["cache"]["hit_rate"] == 0.0
    assert alert(response, "cache_hit_rate")["breached"] is False  # one lookup: below the floor


def test_rejects_an_unknown_cache_result_without_counting_it(clock: FakeClock) -> None:
    stats = aggregator(clock)
    with pytest.raises(ValueError, match="cache result"):
        stats.record_cache("dashboard", "HIT")
    assert body(stats)["since_start"]["cache"]["by_report"] == {}


@pytest.mark.parametrize("duration", [-0.5, math.nan, math.inf])
def test_rejects_impossible_durations_without_counting_them(
    clock: FakeClock, duration: float
) -> None:
    stats = aggregator(clock)
    with pytest.raises(ValueError, match="duration_ms"):
        stats.record_request(DASHBOARD, 200, duration)
    with pytest.raises(ValueError, match="duration_ms"):
        stats.record_query("report.dashboard", duration, 1)
    response = body(stats)
    assert response["since_start"]["endpoints"] == {}
    assert response["since_start"]["queries"] == {}


def test_unknown_row_counts_count_as_zero(clock: FakeClock) -> None:
    stats = aggregator(clock)
    stats.record_query("report.bookings", 3.0, -1)
    assert body(stats)["since_start"]["queries"]["report.bookings"]["rows"] == 0


# -- the window ------------------------------------------------------------------------------


def test_an_event_leaves_the_window_when_its_slot_is_a_window_old(clock: FakeClock) -> None:
    stats = aggregator(clock, window_seconds=300, slot_seconds=10)
    clock.now = 1_000.0  # start of slot 100
    stats.record_request(DASHBOARD, 200, 5.0)
    clock.now = 1_009.9  # same slot
    stats.record_cache("dashboard", "miss")

    clock.now = 1_299.999
    response = body(stats)
    assert response["last_5m"]["endpoints"][DASHBOARD]["count"] == 1
    assert response["last_5m"]["cache"]["misses"] == 1

    clock.now = 1_300.0  # slot 130: slots 101..130 are the window
    response = body(stats)
    assert response["last_5m"]["endpoints"] == {}
    assert response["last_5m"]["cache"]["lookups"] == 0
    assert response["since_start"]["endpoints"][DASHBOARD]["count"] == 1
    assert response["since_start"]["cache"]["misses"] == 1


def test_a_reused_slot_keeps_its_old_events_in_since_start(clock: FakeClock) -> None:
    stats = aggregator(clock, window_seconds=300, slot_seconds=10)
    clock.now = 1_000.0
    stats.record_request(DASHBOARD, 200, 5.0)
    clock.now = 1_300.0  # slot 130 shares ring position 10 with slot 100
    stats.record_request(DASHBOARD, 500, 7.0)
    clock.now = 1_305.0
    stats.record_request(BOOKINGS, 200, 9.0)
    response = body(stats)
    assert response["last_5m"]["endpoints"][DASHBOARD]["count"] == 1
    assert response["last_5m"]["endpoints"][DASHBOARD]["errors"] == 1
    assert response["last_5m"]["endpoints"][BOOKINGS]["count"] == 1
    assert response["since_start"]["endpoints"][DASHBOARD]["count"] == 2
    assert response["since_start"]["endpoints"][DASHBOARD]["max_ms"] == 7.0


def test_after_a_long_idle_only_new_events_are_in_the_window(clock: FakeClock) -> None:
    stats = aggregator(clock)
    for second in range(0, 300, 3):
        clock.now = 1_000.0 + second
        stats.record_query("report.dashboard", 2.0, 1)
    clock.now = 1_000_000.0
    stats.record_query("report.dashboard", 4.0, 1)
    response = body(stats)
    assert response["last_5m"]["queries"]["report.dashboard"]["calls"] == 1
    assert response["since_start"]["queries"]["report.dashboard"]["calls"] == 101


def test_a_clock_going_back_counts_in_the_current_slot(clock: FakeClock) -> None:
    stats = aggregator(clock)
    clock.now = 2_000.0
    stats.record_request(DASHBOARD, 200, 1.0)
    clock.now = 1_500.0
    stats.record_request(DASHBOARD, 200, 1.0)
    clock.now = 2_000.0
    assert body(stats)["last_5m"]["endpoints"][DASHBOARD]["count"] == 2


events = st.lists(
    st.tuples(st.floats(min_value=0, max_value=50), st.sampled_from(["hit", "miss", "stale"])),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(gaps=events, read_gap=st.floats(min_value=0, max_value=120))
def test_windows_match_a_naive_model(gaps: list[tuple[float, str]], read_gap: float) -> None:
    """Any event timeline: since start holds everything, the window the events of the
    last `window / slot` slots (the documented slot-granular rule)."""
    clock = FakeClock(0.0)
    stats = aggregator(clock, window_seconds=60, slot_seconds=5)
    timeline = []
    for gap, result in gaps:
        clock.now += gap
        stats.record_cache("dashboard", result)
        timeline.append((clock.now, result))
    clock.now += read_gap
    newest = math.floor(clock.now / 5)
    in_window = [result for at, result in timeline if math.floor(at / 5) > newest - 12]
    cache = body(stats)
    for window, expected in (("since_start", [r for _, r in timeline]), ("last_5m", in_window)):
        counted = cache[window]["cache"]
        assert counted["hits"] == expected.count("hit")
        assert counted["misses"] == expected.count("miss")
        assert counted["stale"] == expected.count("stale")


def test_window_must_be_whole_slots(clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="whole number"):
        aggregator(clock, window_seconds=300, slot_seconds=7)
    with pytest.raises(ValueError, match="slot_seconds"):
        aggregator(clock, window_seconds=5, slot_seconds=10)


# -- several workers ---------------------------------------------------------------------------


def test_two_workers_add_up(clock: FakeClock) -> None:
    first = aggregator(clock, worker_id="w1", host="host-a")
    second = aggregator(clock, worker_id="w2", host="host-a")
    run_scripted_workload(first)
    for index in range(8):
        second.record_request(DASHBOARD, 502 if index == 0 else 200, 60.0)
        second.record_cache("dashboard", "miss")
        second.record_query("report.dashboard", 700.0, 5, "f" * 32, DASHBOARD)
    second.record_n_plus_one(DASHBOARD, "SELECT ? FROM services", 12, "e" * 32)
    first.record_pool_timeout()

    merged = merge_snapshots(
        [
            first.snapshot(
                pool={"size": 5, "in_use": 2, "waiting": 0, "timeouts": 1}, memory=MEMORY_LOW
            ),
            second.snapshot(
                pool={"size": 5, "in_use": 3, "waiting": 1, "timeouts": 2},
                memory={"rss_bytes": 300, "limit_bytes": 1000},
            ),
        ]
    )
    response = render(merged)

    assert (response["workers"], response["partial"]) == (2, False)
    endpoint = response["since_start"]["endpoints"][DASHBOARD]
    assert (endpoint["count"], endpoint["errors"], endpoint["client_errors"]) == (48, 4, 2)
    assert endpoint["max_ms"] == 60.0
    cache = response["last_5m"]["cache"]
    assert (cache["hits"], cache["misses"], cache["stale"], cache["lookups"]) == (30, 15, 3, 50)
    assert cache["hit_rate"] == 33 / 50  # the first worker's 2 errors are lookups too
    query = response["last_5m"]["queries"]["report.dashboard"]
    assert (query["calls"], query["rows"], query["slow_calls"]) == (18, 340, 14)
    assert query["mean_ms"] == pytest.approx((5_500.0 + 8 * 700.0) / 18)
    assert response["pool"]["size"] == 10
    assert response["pool"]["in_use"] == 5
    assert response["pool"]["waiting"] == 1
    assert response["pool"]["timeouts"] == 3
    assert response["pool"]["timeouts_last_5m"] == 1
    assert response["memory"]["rss_bytes"] == 400
    assert response["memory"]["limit_bytes"] == 1000  # one host, one shared limit
    assert [worker["rss_bytes"] for worker in response["memory"]["workers"]] == [100, 300]
    assert len(response["recent_slow_queries"]) == 14
    assert {entry["worker"] for entry in response["recent_slow_queries"]} == {"w1", "w2"}
    assert response["n_plus_one"]["total"] == 1
    assert response["n_plus_one"]["recent"][0]["worker"] == "w2"

    # The merged latency sketch is the sketch of every worker's values, bucket for bucket.
    expected = LatencySketch()
    for index in range(40):
        expected.add(float(index + 1))
    for _ in range(8):
        expected.add(60.0)
    assert LatencySketch.from_dict(merged["since_start"]["endpoints"][DASHBOARD]["latency"]) == (
        expected
    )


def test_snapshots_survive_a_json_round_trip(clock: FakeClock) -> None:
    stats = aggregator(clock)
    run_scripted_workload(stats)
    stats.record_n_plus_one(DASHBOARD, "SELECT ?", 6, None)
    snapshot = stats.snapshot(pool=POOL_IDLE, memory=MEMORY_LOW)
    travelled = json.loads(json.dumps(snapshot))
    assert travelled == snapshot
    assert render(merge_snapshots([travelled])) == render(merge_snapshots([snapshot]))
    merged = merge_snapshots([snapshot])
    assert json.loads(json.dumps(merged)) == merged


def test_partial_when_asked_when_workers_are_missing_or_unreadable(clock: FakeClock) -> None:
    snapshot = aggregator(clock).snapshot()
    assert merge_snapshots([snapshot])["partial"] is False
    assert merge_snapshots([snapshot], partial=True)["partial"] is True
    assert merge_snapshots([snapshot], expected_workers=2)["partial"] is True
    other_version = {**snapshot, "version": 999}
    merged = merge_snapshots([snapshot, other_version])
    assert (merged["workers"], merged["partial"]) == (1, True)
    with pytest.raises(ValueError, match="malformed"):
        merge_snapshots([{"version": 1, "worker": "w9"}])


def test_a_worker_counts_once_with_its_newest_snapshot(clock: FakeClock) -> None:
    stats = aggregator(clock)
    stats.record_request(DASHBOARD, 200, 1.0)
    older = stats.snapshot()  # what this worker published to Redis a moment ago
    clock.now += 1
    stats.record_request(DASHBOARD, 200, 1.0)
    fresh = stats.snapshot()
    for order in ([older, fresh], [fresh, older]):
        response = render(merge_snapshots(order))
        assert response["workers"] == 1
        assert response["since_start"]["endpoints"][DASHBOARD]["count"] == 2


def test_no_snapshot_renders_an_empty_body() -> None:
    response = render(merge_snapshots([], partial=True))
    assert (response["workers"], response["partial"]) == (0, True)
    assert response["last_5m"]["endpoints"] == {}
    assert not any(entry["breached"] for entry in response["alerts"])


def test_memory_limits_are_shared_per_host_and_the_worst_host_counts(clock: FakeClock) -> None:
    a1 = aggregator(clock, worker_id="a1", host="host-a")
    a2 = aggregator(clock, worker_id="a2", host="host-a")
    b1 = aggregator(clock, worker_id="b1", host="host-b")
    response = render(
        merge_snapshots(
            [
                a1.snapshot(memory={"rss_bytes": 500, "limit_bytes": 1000}),
                a2.snapshot(memory={"rss_bytes": 310, "limit_bytes": 1000}),
                b1.snapshot(memory={"rss_bytes": 100, "limit_bytes": 1000}),
            ]
        )
    )
    assert response["memory"]["rss_bytes"] == 910
    assert response["memory"]["limit_bytes"] == 2000
    assert response["memory"]["usage_ratio"] == 0.81
    assert alert(response, "memory")["breached"] is True


# -- alerts flip exactly at their thresholds ---------------------------------------------------


@pytest.mark.parametrize(("duration", "breached"), [(500.0, False), (500.001, True)])
def test_query_p95_alert_boundary(clock: FakeClock, duration: float, breached: bool) -> None:
    stats = aggregator(clock)
    for _ in range(30):
        stats.record_query("report.bookings", duration, 1)
    stats.record_query("report.dashboard", 3.0, 1)
    entry = alert(body(stats), "query_p95")
    assert entry["breached"] is breached
    assert entry["value"] == duration
    assert entry["threshold"] == 500.0
    assert "report.bookings" in entry["detail"]


@pytest.mark.parametrize(("slow_calls", "breached"), [(5, False), (6, True)])
def test_query_p95_alert_flips_at_the_95th_percentile_rank(
    clock: FakeClock, slow_calls: int, breached: bool
) -> None:
    stats = aggregator(clock)
    for index in range(100):
        stats.record_query("report.dashboard", 2_000.0 if index < slow_calls else 20.0, 1)
    # p95 is rank floor(0.95 * 99) = 94 of 100 sorted values: 6 slow calls reach it, 5 do not.
    assert alert(body(stats), "query_p95")["breached"] is breached


def test_query_p95_alert_reads_the_last_window_only(clock: FakeClock) -> None:
    stats = aggregator(clock)
    stats.record_query("report.dashboard", 5_000.0, 1)
    assert alert(body(stats), "query_p95")["breached"] is True
    clock.now += 300
    entry = alert(body(stats), "query_p95")
    assert (entry["breached"], entry["value"]) == (False, None)


@pytest.mark.parametrize(("hits", "breached"), [(42, False), (41, True)])
def test_hit_rate_alert_boundary(clock: FakeClock, hits: int, breached: bool) -> None:
    stats = aggregator(clock)
    for index in range(60):
        stats.record_cache("dashboard", "hit" if index < hits else "miss")
    entry = alert(body(stats), "cache_hit_rate")
    assert entry["value"] == hits / 60
    assert entry["threshold"] == 0.70
    assert entry["breached"] is breached


def test_hit_rate_alert_waits_for_its_minimum_sample(clock: FakeClock) -> None:
    stats = aggregator(clock)
    for _ in range(59):
        stats.record_cache("dashboard", "miss")
    for _ in range(30):
        stats.record_cache("dashboard", "bypass")  # not lookups: they do not make the sample
    entry = alert(body(stats), "cache_hit_rate")
    assert (entry["value"], entry["breached"]) == (0.0, False)
    stats.record_cache("dashboard", "miss")
    assert alert(body(stats), "cache_hit_rate")["breached"] is True


def test_hit_rate_minimum_sample_is_configurable(clock: FakeClock) -> None:
    stats = aggregator(clock, thresholds=Thresholds(cache_min_lookups=3))
    for _ in range(3):
        stats.record_cache("dashboard", "miss")
    assert alert(body(stats), "cache_hit_rate")["breached"] is True


@pytest.mark.parametrize(
    ("pool", "breached"),
    [
        ({"size": 5, "in_use": 4, "waiting": 0, "timeouts": 0}, False),
        ({"size": 5, "in_use": 5, "waiting": 0, "timeouts": 0}, True),
        ({"size": 5, "in_use": 1, "waiting": 1, "timeouts": 0}, True),
        ({"size": 0, "in_use": 0, "waiting": 0, "timeouts": 0}, False),
        # A cumulative timeout count alone says nothing about *now*: only dated timeouts do.
        ({"size": 5, "in_use": 1, "waiting": 0, "timeouts": 9}, False),
    ],
)
def test_pool_alert_boundary(clock: FakeClock, pool: dict[str, int], breached: bool) -> None:
    entry = alert(body(aggregator(clock), pool=pool), "pool_exhaustion")
    assert entry["breached"] is breached
    assert entry["value"]["in_use"] == pool["in_use"]


def test_pool_alert_is_per_worker(clock: FakeClock) -> None:
    # Together 5 of 10 in use, but one worker has used up its own pool.
    full = aggregator(clock, worker_id="w1").snapshot(
        pool={"size": 5, "in_use": 5, "waiting": 0, "timeouts": 0}
    )
    idle = aggregator(clock, worker_id="w2").snapshot(
        pool={"size": 5, "in_use": 0, "waiting": 0, "timeouts": 0}
    )
    entry = alert(render(merge_snapshots([full, idle])), "pool_exhaustion")
    assert entry["breached"] is True
    assert "w1" in entry["detail"]


def test_pool_timeouts_breach_while_in_the_window(clock: FakeClock) -> None:
    stats = aggregator(clock)
    stats.record_pool_timeout()
    entry = alert(body(stats, pool=POOL_IDLE), "pool_exhaustion")
    assert (entry["breached"], entry["value"]["timeouts_in_window"]) == (True, 1)
    clock.now += 300
    entry = alert(body(stats, pool=POOL_IDLE), "pool_exhaustion")
    assert (entry["breached"], entry["value"]["timeouts_in_window"]) == (False, 0)


@pytest.mark.parametrize(("rss", "breached"), [(800, False), (801, True)])
def test_memory_alert_boundary(clock: FakeClock, rss: int, breached: bool) -> None:
    memory = {"rss_bytes": rss, "limit_bytes": 1000}
    entry = alert(body(aggregator(clock), memory=memory), "memory")
    assert (entry["value"], entry["threshold"], entry["breached"]) == (rss / 1000, 0.8, breached)


def test_memory_without_a_limit_is_not_breached(clock: FakeClock) -> None:
    entry = alert(body(aggregator(clock), memory={"rss_bytes": 5, "limit_bytes": 0}), "memory")
    assert (entry["breached"], entry["value"]) == (False, None)


# -- recent lists, N+1 -------------------------------------------------------------------------


def test_recent_slow_queries_are_bounded_newest_first(clock: FakeClock) -> None:
    stats = aggregator(clock, recent_slow_limit=3, slow_query_ms=100)
    for index in range(10):
        clock.now += 1
        stats.record_query(f"q{index}", 99.999 if index == 9 else 150.0 + index, 1)
    slow = body(stats)["recent_slow_queries"]
    assert [entry["name"] for entry in slow] == ["q8", "q7", "q6"]
    assert body(stats)["since_start"]["queries"]["q9"]["slow_calls"] == 0


def test_n_plus_one_detections_are_counted_and_bounded(clock: FakeClock) -> None:
    stats = aggregator(clock, recent_n_plus_one_limit=2)
    for index in range(3):
        clock.now += 1
        stats.record_n_plus_one(BOOKINGS, "SELECT ? FROM professionals", 5 + index, f"{index}")
    clock.now += 300
    stats.record_n_plus_one(DASHBOARD, "SELECT ? FROM services", 40, "t")
    n_plus_one = body(stats)["n_plus_one"]
    assert (n_plus_one["total"], n_plus_one["last_5m"]) == (4, 1)
    assert [entry["count"] for entry in n_plus_one["recent"]] == [40, 7]
    assert n_plus_one["recent"][0]["route"] == DASHBOARD


def test_request_query_tracker_reports_statements_at_the_threshold() -> None:
    tracker = RequestQueryTracker()
    for _ in range(5):
        tracker.add("SELECT * FROM services WHERE id = %(id)s")
    for _ in range(4):
        tracker.add("SELECT * FROM professionals WHERE id = %(id)s")
    tracker.add("SELECT 1")
    assert tracker.total == 10
    assert tracker.detections() == {"SELECT * FROM services WHERE id = %(id)s": 5}
    assert tracker.detections(threshold=4) == {
        "SELECT * FROM services WHERE id = %(id)s": 5,
        "SELECT * FROM professionals WHERE id = %(id)s": 4,
    }


def test_statement_fingerprint_drops_values() -> None:
    first = statement_fingerprint(
        "/* traceparent='00-ab' */ SELECT name FROM users\n WHERE email = 'ana@example.com' "
        "AND id IN (1, 2, 3) AND score > -2.5 -- trailing"
    )
    second = statement_fingerprint(
        "SELECT name   FROM users WHERE email = 'o''brien@example.com' AND id IN (7) "
        "AND score > 4e3"
    )
    assert first == second == "SELECT name FROM users WHERE email = ? AND id IN (?) AND score > ?"
    kept = statement_fingerprint("SELECT t1.id FROM t1 WHERE id = %(id_1)s AND x = $2")
    assert kept == "SELECT t1.id FROM t1 WHERE id = %(id_1)s AND x = $2"


def test_unbounded_names_are_capped(clock: FakeClock) -> None:
    stats = aggregator(clock, max_series=2)
    for index in range(5):
        stats.record_request(f"GET /raw/path/{index}", 404, 1.0)
    clock.now += 10  # the cap holds across slots, not just within one
    stats.record_request("GET /raw/path/9", 404, 1.0)
    endpoints = body(stats)["since_start"]["endpoints"]
    assert set(endpoints) == {"GET /raw/path/0", "GET /raw/path/1", OTHER_SERIES}
    assert endpoints[OTHER_SERIES]["count"] == 4


# -- threads -----------------------------------------------------------------------------------


@pytest.fixture
def frequent_thread_switches() -> Iterator[None]:
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


@pytest.mark.usefixtures("frequent_thread_switches")
@pytest.mark.parametrize(
    ("tick", "window_seconds"),
    [
        (0.01, 60.0),  # a new slot every 100 events, the ring wraps now and then
        (1.0, 1.0),  # a one-slot ring and a new slot per event: folded into the archive at once
    ],
)
def test_concurrent_recording_loses_nothing(tick: float, window_seconds: float) -> None:
    ticks = itertools.count()
    lock = threading.Lock()

    def clock() -> float:  # advances on every call, so slots rotate under the threads
        with lock:
            return next(ticks) * tick

    stats = StatsAggregator(
        clock=clock, wall_clock=clock, window_seconds=window_seconds, slot_seconds=1
    )
    threads_count, per_thread = 8, 3_000
    start = threading.Barrier(threads_count + 1)
    errors: list[BaseException] = []

    def work(thread: int) -> None:
        start.wait()
        try:
            for index in range(per_thread):
                stats.record_request(DASHBOARD, 500 if index % 10 == 0 else 200, 1.0 + thread)
                stats.record_cache("dashboard", "miss" if index % 4 == 0 else "hit")
                stats.record_query("report.dashboard", 2.0, 3)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(number,)) for number in range(threads_count)]
    for thread in threads:
        thread.start()
    start.wait()
    for _ in range(20):  # snapshots taken while the threads record must not break anything
        stats.snapshot()
    for thread in threads:
        thread.join()
    assert errors == []

    response = render(merge_snapshots([stats.snapshot()]))["since_start"]
    total = threads_count * per_thread
    endpoint = response["endpoints"][DASHBOARD]
    assert (endpoint["count"], endpoint["errors"]) == (total, total // 10)
    assert endpoint["max_ms"] == float(threads_count)
    cache = response["cache"]
    assert (cache["misses"], cache["hits"]) == (total // 4, total - total // 4)
    query = response["queries"]["report.dashboard"]
    assert (query["calls"], query["rows"]) == (total, 3 * total)


# -- freshness of the derived data (the change stream) ---------------------------------------

STREAM_CURRENT = {
    "state": "current",
    "reason": None,
    "backlog_bytes": 100,
    "retained_wal_bytes": 4096,
    "consumer": True,
}


def _freshness_alert(response: dict[str, Any]) -> dict[str, Any]:
    return next(entry for entry in response["alerts"] if entry["name"] == "freshness")


def test_freshness_lags_add_up_across_workers_and_the_worst_stream_state_counts(
    clock: FakeClock,
) -> None:
    one, two = aggregator(clock, worker_id="a"), aggregator(clock, worker_id="b")
    for lag in (0.1, 0.2, 0.3):
        one.record_freshness(lag)
    two.record_freshness(4.0)
    lost = {**STREAM_CURRENT, "state": "lost", "reason": "slot gone", "consumer": False}
    response = render(
        merge_snapshots(
            [one.snapshot(change_stream=STREAM_CURRENT), two.snapshot(change_stream=lost)]
        ),
        one.thresholds,
    )
    freshness = response["freshness"]
    assert freshness["since_start"]["applied"] == 4
    assert freshness["last_5m"]["max_s"] == pytest.approx(4.0, rel=0.01)
    assert freshness["since_start"]["p50_s"] == pytest.approx(0.2, rel=0.01)
    assert freshness["change_stream"]["state"] == "lost"
    assert freshness["change_stream"]["consumers"] == 1
    alert = _freshness_alert(response)
    assert alert["breached"]
    assert "slot gone" in alert["detail"]


@pytest.mark.parametrize(
    ("lags", "retained", "breached"),
    [
        ([1.0] * 99 + [5.0], 1024**3, False),  # p99 at the threshold, retention at it
        ([1.0] * 98 + [5.2] * 2, 1024**3, True),  # p99 above 5 s
        ([0.1] * 10, 1024**3 + 1, True),  # the slot keeps more than 1 GiB
    ],
)
def test_the_freshness_alert_flips_at_its_thresholds(
    clock: FakeClock, lags: list[float], retained: int, breached: bool
) -> None:
    stats = aggregator(clock)
    for lag in lags:
        stats.record_freshness(lag)
    stream = {**STREAM_CURRENT, "retained_wal_bytes": retained}
    assert _freshness_alert(body(stats, change_stream=stream))["breached"] is breached


def test_freshness_leaves_the_window_after_five_minutes(clock: FakeClock) -> None:
    stats = aggregator(clock)
    stats.record_freshness(9.0)
    assert _freshness_alert(body(stats, change_stream=STREAM_CURRENT))["breached"]
    clock.now += 301
    response = body(stats, change_stream=STREAM_CURRENT)
    assert response["freshness"]["last_5m"]["applied"] == 0
    assert response["freshness"]["since_start"]["applied"] == 1
    assert not _freshness_alert(response)["breached"]
