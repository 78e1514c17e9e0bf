"""PostgreSQL restarted, and the connection pool run dry, while the service is under load.

Both use the session's private cluster (never the shared server of `make services`): the
restart stops it for real, the pool scenario holds ``LOCK TABLE bookings`` on it.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml

from tests.chaos.harness import ChaosData, reference_bodies, warm
from tests.chaos.load import LoadGenerator, Sample, by_phase, describe, figures
from tests.chaos.metrics import Series, samples, scrape, stats
from tests.chaos.servers import running_service, service_env
from tests.ops.promql import analyse
from tests.ops.tools import RULE_FILES, assert_tool_ok, run_tool
from tests.support import RedisProcess

pytestmark = pytest.mark.chaos

POOL_TIMEOUT = 1.0
MAX_LOCK_SECONDS = 20.0  # the longest the pool test holds its table lock


def answered(samples_: list[Sample]) -> None:
    """Every request got an answer: no 500, no hang, nothing cut, every body complete JSON."""
    broken = [
        sample
        for sample in samples_
        if sample.status is None or (sample.status >= 500 and sample.status != 503)
    ]
    assert not broken, f"{len(broken)} requests failed:\n{describe(broken)}"
    not_json = [sample for sample in samples_ if not sample.json_body]
    assert not not_json, describe(not_json)
    wrong = [sample for sample in samples_ if sample.correct is False]
    assert not wrong, f"{len(wrong)} answers differ from the reference:\n{describe(wrong)}"


def check_unavailable(unavailable: list[Sample], within: float) -> None:
    """Each 503 is the JSON error with a Retry-After, and came fast."""
    for sample in unavailable:
        assert sample.error_code == "database_unavailable", describe([sample])
        assert sample.retry_after is not None, describe([sample])
        assert int(sample.retry_after) > 0, describe([sample])
    slow = [sample for sample in unavailable if sample.seconds > within]
    assert not slow, f"503s slower than {within} s:\n{describe(slow)}"


def recovered(samples_: list[Sample], seconds: float) -> list[Sample]:
    """The requests of the last ``seconds`` of the run."""
    end = max(sample.started for sample in samples_)
    return [sample for sample in samples_ if sample.started >= end - seconds]


async def test_postgres_restarted_mid_load(
    database: ChaosData, redis_server: RedisProcess, tmp_path: Path, chaos_result: dict[str, Any]
) -> None:
    outage_seconds = 4.0
    chaos_result.update(
        name="postgres-restarted",
        order=2,
        fault=f"pg_ctl stop -m fast, down {outage_seconds:.0f} s, start (private cluster)",
    )
    calls = database.mix(cold=True)
    expected = await reference_bodies(database, calls)
    env = service_env(
        database.database_url,
        redis_server.url,
        database.secret,
        # Bookings entries expire after 3 s: in the outage they are stale, within their grace.
        REPORTS_CACHE_TTL_BOOKINGS="3",
        REPORTS_CACHE_STALE_GRACE="60",
        REPORTS_DB_POOL_TIMEOUT="2",
    )
    with running_service(env, tmp_path / "service.log") as service:
        async with LoadGenerator(service.url, calls, expected, database.today) as load:
            await warm(load)
            load.start()
            await load.run_phase("before", 3)
            load.phase = "during"
            try:
                await asyncio.to_thread(database.cluster.stop, "fast")
                down_at = time.monotonic()
                await asyncio.sleep(outage_seconds)
            finally:
                starting_at = time.monotonic()
                await asyncio.to_thread(database.cluster.start)
            await load.run_phase("after", 6)
            await load.stop()
        async with httpx.AsyncClient(base_url=service.url, timeout=5) as http:
            ready = [(await http.get("/readyz")).json() for _ in range(6)]
        still_running = service.process is not None and service.process.poll() is None
        assert "Child process" not in service.output(), service.output()[-2000:]
    samples_ = load.samples
    phases = by_phase(samples_)
    chaos_result.update(figures(samples_))

    answered(samples_)
    # While it was down (the phase also covers the stop and the start themselves).
    during = [s for s in phases["during"] if s.started >= down_at and s.ended <= starting_at]
    warm_during = [sample for sample in during if not calls[sample.call].cold]
    cold_during = [sample for sample in during if calls[sample.call].cold]
    # Cached answers continue, correct, from the cache: fresh ones and stale ones in grace.
    missing = [
        sample for sample in warm_during if sample.status != 200 or sample.correct is not True
    ]
    assert not missing, f"cached reports not served in the outage:\n{describe(missing)}"
    assert {sample.cache for sample in warm_during} <= {"HIT", "STALE"}
    stale_bookings = [
        sample
        for sample in warm_during
        if calls[sample.call].report == "bookings" and sample.cache == "STALE"
    ]
    assert stale_bookings, "no stale-in-grace entry was served"
    # Uncached ones fail fast and say when to retry.
    unavailable = [sample for sample in cold_during if sample.status == 503]
    assert unavailable, "no uncached request reached the stopped database"
    check_unavailable(unavailable, within=2 + 2)
    # Back without a restart of the service: everything answers again, uncached ones too.
    tail = recovered(phases["after"], 3)
    assert all(sample.status == 200 for sample in tail), describe(
        s for s in tail if s.status != 200
    )
    assert any(calls[sample.call].cold for sample in tail)
    assert all(probe["invalidation_listener"] == "connected" for probe in ready), ready
    assert still_running
    chaos_result["notes"] = (
        f"while down: {len(warm_during)} cached answers served, correct "
        f"({sum(s.cache == 'STALE' for s in warm_during)} STALE), {len(unavailable)} uncached "
        f"got a JSON 503 with Retry-After within {max(s.seconds for s in unavailable) * 1000:.0f}"
        " ms; all answered again without a restart"
    )


# -- the pool -----------------------------------------------------------------------------


def pool_exhaustion_rule() -> str:
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if rule.get("alert") == "SalonReportsDbPoolExhausted":
                    expr: str = rule["expr"]
                    return expr
    raise AssertionError("no SalonReportsDbPoolExhausted rule")


POOL_METRICS = (
    "db_client_connection_count",
    "db_client_connection_max",
    "db_client_connection_pending_requests",
)


def pool_series(exposition: str) -> dict[str, Series]:
    return {name: samples(exposition, name) for name in POOL_METRICS}


PoolKey = tuple[str, str]  # (pool name, worker)


def pool_sums(series: dict[str, Series]) -> dict[PoolKey, tuple[float, float, float]]:
    """Per pool of each worker, summed as the rule sums them: (used, max, pending)."""
    sums: dict[PoolKey, list[float]] = {}
    for position, (name, state) in enumerate(
        [
            ("db_client_connection_count", "used"),
            ("db_client_connection_max", None),
            ("db_client_connection_pending_requests", None),
        ]
    ):
        for labels, value in series[name]:
            if state is not None and labels.get("db_client_connection_state") != state:
                continue
            key = (labels["db_client_connection_pool_name"], labels.get("worker", ""))
            pool = sums.setdefault(key, [0.0, 0.0, 0.0])
            pool[position] += value
    return {key: (used, maximum, pending) for key, (used, maximum, pending) in sums.items()}


def exhausted_pools(series: dict[str, Series]) -> dict[PoolKey, float]:
    """The rule's condition by hand (used >= max and pending > 0, per worker):
    (pool, worker) -> connections used."""
    return {
        key: used
        for key, (used, maximum, pending) in pool_sums(series).items()
        if used >= maximum and pending > 0
    }


def promtool_agrees(expr: str, series: dict[str, Series], directory: Path, promtool: str) -> None:
    """Evaluate the rule's own PromQL with promtool against the scraped values: it must
    return one sample per exhausted pool (the connections in use), and no other."""
    input_series = []
    for name, found in series.items():
        for labels, value in found:
            labels = {**labels, "job": "salon-reports", "instance": "chaos"}
            selector = ", ".join(f'{key}="{val}"' for key, val in sorted(labels.items()))
            input_series.append({"series": f"{name}{{{selector}}}", "values": f"{value:g}x5"})
    firing = exhausted_pools(series)
    test = {
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": input_series,
                "promql_expr_test": [
                    {
                        "expr": expr,
                        "eval_time": "2m",
                        "exp_samples": [
                            {
                                "labels": f'{{db_client_connection_pool_name="{pool}", '
                                f'instance="chaos", job="salon-reports", worker="{worker}"}}',
                                "value": used,
                            }
                            for (pool, worker), used in firing.items()
                        ],
                    }
                ],
            }
        ],
    }
    assert firing, "the scraped values do not cross the rule's thresholds"
    path = directory / "pool-exhaustion.test.yml"
    path.write_text(yaml.safe_dump(test))
    assert_tool_ok(run_tool([promtool, "test", "rules", str(path)]))


async def test_pool_exhausted_gives_fast_503_and_shows_in_metrics(
    database: ChaosData, redis_server: RedisProcess, tmp_path: Path, chaos_result: dict[str, Any]
) -> None:
    lock_seconds = 4.0
    chaos_result.update(
        name="pool-exhausted",
        order=3,
        fault=(
            f"LOCK TABLE bookings (ACCESS EXCLUSIVE) held {lock_seconds:.0f} s; pool 2 per worker, "
            f"no overflow, {POOL_TIMEOUT:g} s pool timeout"
        ),
    )
    expr = pool_exhaustion_rule()
    assert set(POOL_METRICS) <= analyse(expr).metrics, expr
    calls = database.mix(cold=True)
    expected = await reference_bodies(database, calls)
    env = service_env(
        database.database_url,
        redis_server.url,
        database.secret,
        REPORTS_DB_POOL_SIZE="2",
        REPORTS_DB_POOL_MAX_OVERFLOW="0",
        REPORTS_DB_POOL_TIMEOUT=str(POOL_TIMEOUT),
    )
    ops = database.token("ops")
    exhausted_scrape: dict[str, Series] | None = None
    exhausted_stats: list[dict[str, Any]] = []
    with running_service(env, tmp_path / "service.log") as service:
        async with LoadGenerator(service.url, calls, expected, database.today) as load:
            await warm(load)
            load.start()
            await load.run_phase("before", 2)
            load.phase = "during"
            async with await psycopg.AsyncConnection.connect(database.dsn) as locker:
                await locker.execute("LOCK TABLE bookings IN ACCESS EXCLUSIVE MODE")
                # The pool gauges are momentary and other workers' figures reach a scrape up
                # to 2 s late: the lock is held until a scrape and the stats have both shown
                # the exhausted pool (at least lock_seconds, at most MAX_LOCK_SECONDS), so a
                # busy machine delays the observation instead of missing it.
                clock = asyncio.get_running_loop().time
                started = clock()
                while clock() - started < MAX_LOCK_SECONDS and (
                    clock() - started < lock_seconds
                    or exhausted_scrape is None
                    or not exhausted_stats
                ):
                    await asyncio.sleep(0.25)
                    series = pool_series(await scrape(service.url))
                    if exhausted_pools(series):
                        exhausted_scrape = series
                    snapshot = await stats(service.url, ops)
                    if any(
                        worker["waiting"] > 0 and worker["in_use"] >= worker["size"]
                        for worker in snapshot["pool"]["workers"]
                    ):
                        exhausted_stats.append(snapshot)
                await locker.rollback()  # releases the lock
            await load.run_phase("after", 4)
            await load.stop()
        final_stats = await stats(service.url, ops)
    samples_ = load.samples
    phases = by_phase(samples_)
    chaos_result.update(figures(samples_))
    chaos_result["pool_timeouts"] = final_stats["pool"]["timeouts"]

    answered(samples_)
    during = phases["during"]
    # Cached reports need no connection: served throughout, correct.
    warm_during = [sample for sample in during if not calls[sample.call].cold]
    assert all(sample.status == 200 and sample.correct for sample in warm_during)
    # Uncached ones: the pool ran dry, and the waiters got a 503 after the pool timeout.
    unavailable = [sample for sample in during if sample.status == 503]
    assert unavailable, figures(during)
    check_unavailable(unavailable, within=POOL_TIMEOUT + 2)
    # Seen by the metrics (the alert rule's expression holds on a scrape) and the stats.
    assert exhausted_scrape is not None, "no scrape showed an exhausted pool"
    # `make chaos` does not install the Prometheus tools (`make test` does): without promtool
    # the condition is checked by hand only.
    promtool = shutil.which("promtool")
    chaos_result["alert_expression_checked_by"] = "promtool" if promtool else "hand"
    if promtool is not None:
        promtool_agrees(expr, exhausted_scrape, tmp_path, promtool)
    assert exhausted_stats, "the stats never showed a request waiting for a connection"
    pool = exhausted_stats[-1]["pool"]
    assert any(worker["in_use"] >= worker["size"] for worker in pool["workers"]), pool
    alerts = {alert["name"]: alert for alert in exhausted_stats[-1]["alerts"]}
    assert alerts["pool_exhaustion"]["breached"], alerts["pool_exhaustion"]
    assert final_stats["pool"]["timeouts"] > 0
    # Released: the blocked queries finish, nothing is left waiting, everything answers.
    tail = recovered(phases["after"], 2)
    assert all(sample.status == 200 for sample in tail), describe(
        s for s in tail if s.status != 200
    )
    waits = [sample.seconds * 1000 for sample in unavailable]
    chaos_result["notes"] = (
        f"{len(unavailable)} uncached requests got a JSON 503 after {min(waits):.0f}-"
        f"{max(waits):.0f} ms (pool timeout {POOL_TIMEOUT:g} s); cached ones unaffected; "
        f"pool metrics met SalonReportsDbPoolExhausted's expression "
        f"({chaos_result['alert_expression_checked_by']}); stats: pool_exhaustion breached, "
        f"{final_stats['pool']['timeouts']} timeouts"
    )
