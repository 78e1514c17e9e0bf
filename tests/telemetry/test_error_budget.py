"""The error budgets in process (telemetry/stats/slo.py, service/error_budget.py; docs/slo.md).

- the definition is the recording rules' (routes, objectives, the 100 ms bucket, the windows);
- a known number of bad requests gives the exact budget left and burn rate, window by window;
- two workers' deltas add up in Redis, a batch Redis refused is sent again (once);
- end to end: real report requests (fast, 4xx, one held slow by a table lock, one cut into a
  503), scraped from ``/metrics`` and read from ``/performance/stats``: the stats' ratios are
  the recording rules' evaluated by ``promtool`` on the scraped histogram;
- Redis down: the stats still answer, with this worker's own counts, ``partial``.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service.config import Settings
from service.error_budget import KEY_PREFIX, ErrorBudgetStore, read_buckets
from service.paths import API_PREFIX
from telemetry.stats.counts import timestamp
from telemetry.stats.slo import (
    AVAILABILITY,
    HOUR_WINDOWS,
    LATENCY,
    LATENCY_THRESHOLD_SECONDS,
    MINUTE_WINDOWS,
    OBJECTIVES,
    SLO_ROUTE_PATTERN,
    WINDOWS,
    SloCounter,
    budget_alert,
    render_budget,
)
from tests.conftest import Api, RunningApi, app_settings
from tests.ops.tools import ALERTS, require_tool
from tests.support import redis_client, redis_process

SLO_RULES = ALERTS / "slo.rules.yml"
STATS = f"{API_PREFIX}/performance/stats"
DASHBOARD = f"{API_PREFIX}/dashboard"
# A noon, far from any edge of an hour or a day, for the figures; the Redis tests run at the
# real time (their keys expire after it).
NOON = 1_780_000_000 - 1_780_000_000 % 86400 + 12 * 3600 + 30


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- one definition ---------------------------------------------------------------------------


def _recording_rules() -> list[dict[str, Any]]:
    rules = []
    for group in yaml.safe_load(SLO_RULES.read_text())["groups"]:
        rules += [rule for rule in group["rules"] if "record" in rule]
    return rules


def test_the_definition_is_the_recording_rules() -> None:
    rules = _recording_rules()
    objectives = {
        rule["labels"]["slo"]: float(re.fullmatch(r"vector\(([0-9.]+)\)", rule["expr"])[1])  # type: ignore[index]
        for rule in rules
        if rule["record"] == "slo:objective:ratio"
    }
    assert objectives == {slo.name: slo.objective for slo in OBJECTIVES}
    ratios = [rule for rule in rules if rule["record"].startswith("slo:sli_error:ratio_rate")]
    windows = {rule["record"].removeprefix("slo:sli_error:ratio_rate") for rule in ratios}
    assert windows == set(WINDOWS)
    for rule in ratios:
        expr = rule["expr"]
        routes = set(re.findall(r'http_route=~"([^"]+)"', expr))
        assert routes == {SLO_ROUTE_PATTERN}, rule
        window = rule["record"].removeprefix("slo:sli_error:ratio_rate")
        assert set(re.findall(r"\[(\w+)\]", expr)) == {window}
        if rule["labels"]["slo"] == AVAILABILITY.name:
            assert 'http_response_status_code=~"5.."' in expr
            assert "le=" not in expr
        else:
            assert rule["labels"]["slo"] == LATENCY.name
            assert set(re.findall(r'le="([^"]+)"', expr)) == {str(LATENCY_THRESHOLD_SECONDS)}
            assert expr.count('http_response_status_code!~"5.."') == 2
    # The routes are this service's: its prefix, its four reports.
    assert SLO_ROUTE_PATTERN.startswith(API_PREFIX + "/")


def test_only_report_routes_count() -> None:
    counter = SloCounter(Clock(NOON))
    for route in (
        DASHBOARD,
        f"{API_PREFIX}/bookings",
        f"{API_PREFIX}/professionals",
        f"{API_PREFIX}/realtime",
    ):
        counter.record(route, 200, 0.001)
    for route in (STATS, "/metrics", "/healthz", f"{API_PREFIX}/cache/clear", "unmatched"):
        counter.record(route, 500, 1.0)
    counter.record(f"{DASHBOARD}x", 500, 1.0)
    assert counter.take().minutes == {NOON // 60: [4, 0, 0]}


# -- exact figures -----------------------------------------------------------------------------


def test_known_bad_requests_give_the_exact_budget_and_burn_rates() -> None:
    clock = Clock(NOON - 10 * 86400)  # ten days ago: only the 30 days see these
    counter = SloCounter(clock)
    for _ in range(10_000):
        counter.record(DASHBOARD, 200, 0.01)
    clock.now = NOON - 2 * 3600  # two hours ago: 6 h, 3 d and 30 d see these
    for _ in range(980):
        counter.record(DASHBOARD, 200, 0.02)
    for _ in range(20):
        counter.record(DASHBOARD, 503, 0.001)
    clock.now = NOON - 600  # ten minutes ago: 30 min and longer
    for _ in range(90):
        counter.record(DASHBOARD, 200, 0.05)
    for _ in range(10):
        counter.record(DASHBOARD, 200, 0.5)  # slow
    clock.now = NOON  # now: every window
    for _ in range(97):
        counter.record(DASHBOARD, 404, 0.001)  # a 4xx is a good answer
    counter.record(DASHBOARD, 200, LATENCY_THRESHOLD_SECONDS)  # le="0.1": good
    counter.record(DASHBOARD, 500, 2.0)  # bad for availability only
    counter.record(DASHBOARD, 200, 0.2)  # slow

    minutes, hours = counter.history()
    budget = render_budget(minutes, hours, NOON, source="redis", partial=False)
    availability = budget["objectives"]["availability"]
    latency = budget["objectives"]["latency"]
    # (requests, 5xx) and (answered, slow) per window.
    expected = {
        "5m": ((100, 1), (99, 1)),
        "30m": ((200, 1), (199, 11)),
        "1h": ((200, 1), (199, 11)),
        "6h": ((1200, 21), (1179, 11)),
        "3d": ((1200, 21), (1179, 11)),
        "30d": ((11_200, 21), (11_179, 11)),
    }
    for window, ((requests, errors), (answered, slow)) in expected.items():
        assert availability["windows"][window] == {
            "requests": requests,
            "bad": errors,
            "error_ratio": pytest.approx(errors / requests),
            "burn_rate": pytest.approx(errors / requests / 0.001),
        }
        assert latency["windows"][window] == {
            "requests": answered,
            "bad": slow,
            "error_ratio": pytest.approx(slow / answered),
            "burn_rate": pytest.approx(slow / answered / 0.01),
        }
    assert availability["objective"] == 0.999
    assert availability["error_budget"] == 0.001
    assert availability["budget_left"] == pytest.approx(1 - 21 / 11_200 / 0.001)  # -0.875
    assert latency["budget_left"] == pytest.approx(1 - 11 / 11_179 / 0.01)  # 0.9016
    assert availability["windows"]["5m"]["burn_rate"] == pytest.approx(10.0)
    assert budget["since"] == timestamp((NOON - 10 * 86400) // 3600 * 3600)  # its oldest hour
    assert budget["period_days"] == 30
    assert (budget["source"], budget["partial"]) == ("redis", False)

    # Eleven minutes later the 5-minute window is empty (no ratio, as 0 / 0 in PromQL), and
    # thirty days after the first requests they have left the budget.
    later = render_budget(minutes, hours, NOON + 660, source="redis", partial=False)
    assert later["objectives"]["availability"]["windows"]["5m"] == {
        "requests": 0,
        "bad": 0,
        "error_ratio": None,
        "burn_rate": None,
    }
    assert later["objectives"]["availability"]["windows"]["30m"]["requests"] == 200
    month = render_budget(minutes, hours, NOON + 20 * 86400, source="redis", partial=False)
    assert month["objectives"]["availability"]["windows"]["30d"]["requests"] == 1200
    empty = render_budget({}, {}, NOON, source="worker", partial=True)
    assert empty["objectives"]["latency"]["budget_left"] is None


def test_what_no_publisher_takes_stays_bounded() -> None:
    clock = Clock(NOON - 40 * 86400)
    counter = SloCounter(clock)
    for minute in range(40 * 24 * 60):  # 40 days of one request a minute, never published
        clock.now = NOON - 40 * 86400 + minute * 60
        counter.record(DASHBOARD, 500 if minute % 100 == 0 else 200, 0.01)
    pending = counter.pending().minutes
    assert len(pending) <= 30 * 24 + 120 + 60
    minutes, hours = counter.history()
    budget = render_budget(minutes, hours, clock.now, source="worker", partial=True)
    availability = budget["objectives"]["availability"]["windows"]
    # Every minute of the last hour and the last 30 days, by the minute and by the hour.
    assert availability["1h"]["requests"] == 60
    assert availability["5m"]["requests"] == 5
    assert availability["30d"]["requests"] == 30 * 24 * 60
    assert availability["30d"]["bad"] == sum(
        1 for minute in range(10 * 24 * 60, 40 * 24 * 60) if minute % 100 == 0
    )


def test_the_stats_alert_fires_where_the_page_alert_would() -> None:
    clock = Clock(NOON - 1800)  # half an hour ago: the 1 h, 6 h windows, not 5 min or 30 min
    counter = SloCounter(clock)
    for _ in range(850):
        counter.record(DASHBOARD, 200, 0.01)
    for _ in range(150):
        counter.record(DASHBOARD, 200, 0.3)  # latency: 15 % slow, 15x its budget
    clock.now = NOON  # now: every window
    for _ in range(100):
        counter.record(DASHBOARD, 200, 0.01)
    minutes, hours = counter.history()

    quiet = budget_alert(render_budget(minutes, hours, NOON, source="redis", partial=False))
    # 1 h: 150 / 1100 slow = 13.6x; 5 min: 0x. Neither page pair burns.
    assert quiet["breached"] is False
    assert quiet["value"]["latency"]["1h"] == pytest.approx(150 / 1100 / 0.01)
    assert quiet["threshold"] == {"1h+5m": 14.4, "6h+30m": 6.0}

    for _ in range(20):
        counter.record(DASHBOARD, 200, 0.3)  # 5 min: 20 / 120 = 16.7x; 1 h: 170 / 1120 = 15.2x
    minutes, hours = counter.history()
    paging = budget_alert(render_budget(minutes, hours, NOON, source="redis", partial=False))
    assert paging["breached"] is True
    assert paging["detail"] == "latency: 15.2x over 1h and 16.7x over 5m (> 14.4x)"
    assert paging["value"]["availability"]["1h"] == 0.0


# -- across workers, in Redis -------------------------------------------------------------------


async def test_two_workers_deltas_add_up_in_redis(redis_url: str) -> None:
    now = float(int(time.time()))
    clock = Clock(now - 3 * 3600)
    one, two = SloCounter(clock), SloCounter(clock)
    client = redis_client(redis_url)
    store_client = redis.asyncio.Redis.from_url(redis_url)
    try:
        store = ErrorBudgetStore(store_client)
        for _ in range(30):
            one.record(DASHBOARD, 200, 0.01)
        for _ in range(3):
            two.record(DASHBOARD, 503, 0.01)
        await store.add(one.take(), clock.now)
        await store.add(two.take(), clock.now)
        clock.now = now
        for _ in range(7):
            one.record(DASHBOARD, 200, 0.3)
        await store.add(one.take(), clock.now)
        for _ in range(2):
            two.record(DASHBOARD, 500, 0.01)
        await store.add(two.take(), clock.now)
        await store.add(one.take(), clock.now)  # nothing new: adds nothing

        minutes, hours = await read_buckets(store_client, now)
        assert minutes == {now // 60: [9, 2, 7]}
        assert hours == {(now - 3 * 3600) // 3600: [33, 3, 0], now // 3600: [9, 2, 7]}
        budget = render_budget(minutes, hours, now, source="redis", partial=False)
        assert budget["objectives"]["availability"]["windows"]["6h"]["requests"] == 42
        assert budget["objectives"]["availability"]["windows"]["6h"]["bad"] == 5
        assert budget["objectives"]["latency"]["windows"]["1h"] == {
            "requests": 7,
            "bad": 7,
            "error_ratio": 1.0,
            "burn_rate": pytest.approx(100.0),
        }
        # Every key in one slot (one hash tag), each with an expiry past its window.
        keys = sorted(key.decode() for key in client.keys("*"))
        assert keys
        assert all(key.startswith(KEY_PREFIX + ":") for key in keys)
        for key in keys:
            left = client.ttl(key)
            assert left > 0
            assert left > (30 * 86400 if ":h:" in key else 3600)  # past the windows
    finally:
        await store_client.aclose()
        client.close()


async def test_a_batch_redis_refused_goes_out_again_once(redis_url: str) -> None:
    now = float(int(time.time()))
    clock = Clock(now)
    counter = SloCounter(clock)
    for _ in range(4):
        counter.record(DASHBOARD, 500, 0.01)
    with redis_process() as server:
        dead = redis.asyncio.Redis.from_url(server.url, socket_timeout=2)
        server.kill()
        batch = counter.take()
        with pytest.raises(redis.ConnectionError):
            await ErrorBudgetStore(dead).add(batch, now)
        counter.give_back(batch)
        await dead.aclose()
    counter.record(DASHBOARD, 200, 0.01)
    live = redis.asyncio.Redis.from_url(redis_url)
    try:
        await ErrorBudgetStore(live).add(counter.take(), now)
        await ErrorBudgetStore(live).add(counter.take(), now)
        minutes, _ = await read_buckets(live, now)
    finally:
        await live.aclose()
    assert minutes == {now // 60: [5, 4, 0]}
    # The worker's own history holds each request once too.
    own_minutes, own_hours = counter.history()
    assert own_minutes == {now // 60: [5, 4, 0]}
    assert own_hours == {now // 3600: [5, 4, 0]}


# -- end to end: the stats, the scraped histogram and the rules ---------------------------------


WAITING_FOR_BOOKINGS = (
    "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
    " AND wait_event_type = 'Lock' AND query ILIKE '%bookings%'"
)


async def _held_request(api: Api, dsn: str, params: dict[str, str], terminate: bool) -> int:
    """A cold dashboard request held behind ``LOCK TABLE bookings``: released once it has
    waited there 0.2 s (an answer in more than 100 ms), or its backend terminated (a 5xx)."""
    async with (
        await psycopg.AsyncConnection.connect(dsn) as locker,
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as watcher,
    ):
        await locker.execute("LOCK TABLE bookings IN ACCESS EXCLUSIVE MODE")
        request = asyncio.ensure_future(api.get(DASHBOARD, api.token(), params=params))
        waited = False
        for _ in range(3000):  # polls; the test's timeout is the deadline
            if request.done():
                break
            row = await (await watcher.execute(WAITING_FOR_BOOKINGS)).fetchone()
            if row is not None:
                waited = True
                if not terminate:
                    await asyncio.sleep(0.2)  # a lower bound on the answer's time
                    break
                await watcher.execute("SELECT pg_terminate_backend(%s)", (row[0],))
            await asyncio.sleep(0.01)
        await locker.rollback()
        response = await request
    assert waited, "the request never waited for the bookings lock"
    return response.status_code


def _scraped(exposition: str) -> dict[str, float]:
    """The histogram's series of the report routes, as promtool input series."""
    series = {}
    for family in text_string_to_metric_families(exposition):
        if family.name != "http_server_request_duration_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith(("_sum", "_created")) or not re.fullmatch(
                SLO_ROUTE_PATTERN, sample.labels.get("http_route", "")
            ):
                continue
            labels = {**sample.labels, "job": "salon-reports", "instance": "test:8000"}
            text = ", ".join(f'{name}="{value}"' for name, value in sorted(labels.items()))
            series[f"{sample.name}{{{text}}}"] = sample.value
    return series


def _rules_evaluate_to(series: dict[str, float], expected: dict[str, float], tmp: Path) -> None:
    """promtool runs alerts/slo.rules.yml on ``series`` (0, then their value 5 minutes later)
    and each recorded ratio must equal the stats' figure."""
    tests = [
        {
            "expr": f'sum(abs(slo:sli_error:ratio_rate{window}{{slo="{slo}"}} - {value!r})'
            " < bool 1e-9)",
            "eval_time": "5m",
            "exp_samples": [{"value": 1}],
        }
        for (slo, window), value in expected.items()
    ]
    spec = {
        "rule_files": [str(SLO_RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "5m",
                "input_series": [
                    {"series": labels, "values": f"0 {count:g}"} for labels, count in series.items()
                ],
                "promql_expr_test": tests,
            }
        ],
    }
    path = tmp / "slo.test.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = subprocess.run(
        [require_tool("promtool"), "test", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def test_the_stats_budget_is_the_rules_on_the_scraped_histogram(
    base_settings: Settings,
    database_url: str,
    dsn: str,
    data: dict[str, int],
    redis_url: str,
    tmp_path: Path,
) -> None:
    settings = app_settings(base_settings, database_url, redis_url)
    async with RunningApi(settings) as api:
        salon = str(data["lisbon"])
        statuses = []
        for report in ("dashboard", "bookings", "professionals", "realtime", "dashboard"):
            statuses.append((await api.report(report, salon_id=salon)).status_code)
        statuses.append((await api.report("dashboard", salon_id="x")).status_code)  # 4xx
        statuses.append((await api.get(DASHBOARD)).status_code)  # 401
        window = {"salon_id": salon, "start": "2024-01-01", "end": "2024-02-01"}
        statuses.append(await _held_request(api, dsn, window, terminate=False))
        window = {"salon_id": salon, "start": "2024-03-01", "end": "2024-04-01"}
        statuses.append(await _held_request(api, dsn, window, terminate=True))
        assert statuses[:5] == [200] * 5
        assert statuses[5] // 100 == 4
        assert statuses[6] == 401
        assert statuses[7] == 200
        assert statuses[8] // 100 == 5
        # Not report requests: not counted.
        for path in ("/healthz", "/metrics", "/performance"):
            await api.get(path)
        publisher = api.resources.publisher
        assert publisher is not None
        await publisher.publish_budget()
        stats = (await api.get(STATS, api.token("ops"))).json()
        exposition = (await api.get("/metrics")).text

    budget = stats["slo"]
    assert (budget["source"], budget["partial"]) == ("redis", False)
    availability = budget["objectives"]["availability"]["windows"]
    latency = budget["objectives"]["latency"]["windows"]
    assert availability["5m"]["requests"] == 9
    assert availability["5m"]["bad"] == 1
    assert latency["5m"]["requests"] == 8
    assert latency["5m"]["bad"] >= 1  # the held one; more if the machine was slow
    series = _scraped(exposition)
    count = "http_server_request_duration_seconds_count"
    assert sum(value for name, value in series.items() if name.startswith(count)) == 9
    expected = {}
    for window in WINDOWS:
        if window == "30d":
            continue  # its group is evaluated every 5 minutes: not yet at 5m
        for name, windows in (("availability", availability), ("latency", latency)):
            assert windows[window] == windows["5m"], window  # all within the last minutes
            expected[(name, window)] = windows[window]["error_ratio"]
    _rules_evaluate_to(series, expected, tmp_path)
    for name in ("availability", "latency"):
        objective = budget["objectives"][name]
        ratio = objective["windows"]["30d"]["error_ratio"]
        assert objective["budget_left"] == pytest.approx(1 - ratio / objective["error_budget"])
    assert set(MINUTE_WINDOWS) | set(HOUR_WINDOWS) == set(availability)
    # One 5xx in nine requests burns the availability budget 111 times too fast: the stats'
    # alert says so, as the page alert would.
    [alert] = [entry for entry in stats["alerts"] if entry["name"] == "error_budget_burn"]
    assert alert["breached"] is True
    assert alert["detail"].startswith("availability: 111.1x over 1h and 111.1x over 5m")


async def test_without_redis_the_stats_answer_with_this_workers_counts(
    base_settings: Settings, database_url: str, data: dict[str, int]
) -> None:
    with redis_process() as server:
        settings = app_settings(base_settings, database_url, server.url)
        async with RunningApi(settings) as api:
            salon = data["lisbon"]
            for _ in range(3):
                assert (await api.report("dashboard", salon_id=salon)).status_code == 200
            publisher = api.resources.publisher
            assert publisher is not None
            await publisher.publish_budget()  # these three are in Redis ...
            server.kill()
            for _ in range(2):  # ... these two only in this worker
                assert (await api.report("dashboard", salon_id=salon)).status_code == 200
            with pytest.raises(redis.ConnectionError):
                await publisher.publish_budget()
            response = await api.get(STATS, api.token("ops"))
    assert response.status_code == 200
    budget = response.json()["slo"]
    assert (budget["source"], budget["partial"]) == ("worker", True)
    assert budget["since"] is not None
    availability = budget["objectives"]["availability"]
    assert availability["windows"]["5m"]["requests"] == 5
    assert availability["windows"]["30d"]["requests"] == 5
    assert availability["budget_left"] == 1.0
