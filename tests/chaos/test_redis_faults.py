"""Redis killed, and Redis too slow, while the service is under load.

Both run with the in-process cache tier off, so that every lookup really goes to Redis: the
point is what the service does when Redis fails it (the breaker, the fallback to PostgreSQL),
not what the local tier hides.

The cluster pass of ``make test`` (``SR_TEST_REDIS_CLUSTER=1``) runs both against a private
Redis Cluster of 3 masters and 3 replicas: the master of a busy salon's slot is killed (its
replica is promoted: breaker, then recovery), or every master is paused.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.chaos.harness import ChaosData, reference_bodies, warm
from tests.chaos.load import LoadGenerator, Sample, by_phase, describe, figures, hit_rate
from tests.chaos.metrics import cache_results, scrape
from tests.chaos.servers import running_service, service_env
from tests.support import RedisClusterProcesses, RedisProcess

RedisUnderTest = RedisProcess | RedisClusterProcesses

pytestmark = pytest.mark.chaos

REDIS_TIMEOUT = 0.25
BREAKER_COOLDOWN = 2.0
# Generous: a request that misses Redis computes its report from PostgreSQL on a small dataset,
# on a shared 2-core machine. A request that waited for a dead or paused Redis would take the
# whole outage (seconds), or the client's time limit.
OUTAGE_LATENCY_BOUND = 2.5


def redis_env(data: ChaosData, server: RedisUnderTest) -> dict[str, str]:
    return service_env(
        data.database_url,
        server.url,
        data.secret,
        REPORTS_REDIS_CLUSTER=str(isinstance(server, RedisClusterProcesses)).lower(),
        REPORTS_REDIS_TIMEOUT=str(REDIS_TIMEOUT),
        REPORTS_REDIS_BREAKER_THRESHOLD="3",
        REPORTS_REDIS_BREAKER_COOLDOWN=str(BREAKER_COOLDOWN),
        REPORTS_CACHE_LOCAL_ENTRIES="0",
    )


def check_answers(samples: list[Sample]) -> None:
    """No 5xx, no hang, no failed request, every answer equal to the reference."""
    failed = [sample for sample in samples if sample.status != 200]
    assert not failed, f"{len(failed)} requests were not answered 200:\n{describe(failed)}"
    wrong = [sample for sample in samples if sample.correct is not True]
    assert not wrong, f"{len(wrong)} answers differ from the reference:\n{describe(wrong)}"


def late_hit_rate(samples: list[Sample], seconds: float) -> float | None:
    """The hit rate of the requests of the last ``seconds`` of the run."""
    end = max(sample.started for sample in samples)
    return hit_rate(sample for sample in samples if sample.started >= end - seconds)


async def test_redis_killed_mid_load_and_restarted(
    database: ChaosData,
    redis_under_test: RedisUnderTest,
    tmp_path: Path,
    chaos_result: dict[str, Any],
) -> None:
    server = redis_under_test
    on_cluster = isinstance(server, RedisClusterProcesses)
    slot = f"{{s:{database.salons[0]}}}"  # the busiest salon of the mix
    chaos_result.update(
        name="redis-cluster-master-killed" if on_cluster else "redis-killed",
        order=1,
        fault=(
            f"kill -9 of the Redis Cluster master of {slot} for 4 s (its replica promoted), "
            "then restarted (rejoins as a replica)"
            if on_cluster
            else "kill -9 of Redis for 4 s, then restarted (empty)"
        ),
    )
    calls = database.mix()
    expected = await reference_bodies(database, calls)
    log = tmp_path / "service.log"
    with running_service(redis_env(database, server), log) as service:
        async with LoadGenerator(service.url, calls, expected, database.today) as load:
            await warm(load)
            load.start()
            await load.run_phase("before", 2)
            load.phase = "during"
            if isinstance(server, RedisClusterProcesses):
                killed = server.master_of(slot)
                server.kill(slot)
                await asyncio.sleep(4)
                for _ in range(300):  # until the replica has taken over (node timeout 2 s)
                    promoted = await asyncio.to_thread(server.master_of, slot)
                    if promoted.port != killed.port:
                        break
                    await asyncio.sleep(0.1)
                await asyncio.to_thread(server.restart_killed)
            else:
                server.kill()
                await asyncio.sleep(4)
                await asyncio.to_thread(server.start)
            await load.run_phase("after", 5)
            await load.stop()
        exposition = await scrape(service.url)
    samples = load.samples
    chaos_result.update(figures(samples))
    chaos_result["cache_lookups"] = cache_results(exposition)
    phases = by_phase(samples)

    check_answers(samples)
    slow = [s for s in phases["during"] if s.seconds > OUTAGE_LATENCY_BOUND]
    assert not slow, f"requests waited on the dead Redis:\n{describe(slow)}"
    bypassed = sum(sample.cache == "BYPASS" for sample in phases["during"])
    if on_cluster:
        # Another master took the killed one's slots; until then the breaker sent requests
        # to PostgreSQL (the other masters' slots too: one breaker for the cluster).
        assert promoted.port != killed.port
        assert bypassed > 0, figures(phases["during"])
    else:
        # Answered from PostgreSQL, not from a cache (the phase also covers Redis's restart).
        assert bypassed >= 0.8 * len(phases["during"]), figures(phases["during"])
    assert "redis circuit opened" in service.output()
    # Back: the breaker's probe closes it, the empty Redis fills, hits return.
    recovered = late_hit_rate(phases["after"], 2) or 0
    assert recovered >= 0.9, figures(phases["after"])
    slowest = max(sample.seconds for sample in phases["during"]) * 1000
    chaos_result["notes"] = (
        f"every answer equal to a fresh computation; slowest request while Redis was down "
        f"{slowest:.0f} ms (breaker open, answered from PostgreSQL); hit rate in the last 2 s "
        f"{recovered:.0%}"
    )


async def test_redis_paused_breaker_opens_and_latency_stays_bounded(
    database: ChaosData,
    redis_under_test: RedisUnderTest,
    tmp_path: Path,
    chaos_result: dict[str, Any],
) -> None:
    server = redis_under_test
    on_cluster = isinstance(server, RedisClusterProcesses)
    pause_seconds = 5.0
    chaos_result.update(
        name="redis-cluster-slow" if on_cluster else "redis-slow",
        order=4,
        fault=f"CLIENT PAUSE ALL for {pause_seconds:.0f} s (every Redis command hangs)",
    )
    calls = database.mix()
    expected = await reference_bodies(database, calls)
    log = tmp_path / "service.log"
    with running_service(redis_env(database, server), log) as service:
        async with LoadGenerator(service.url, calls, expected, database.today) as load:
            await warm(load)
            load.start()
            await load.run_phase("before", 2)
            before = cache_results(await scrape(service.url))
            load.phase = "during"
            if isinstance(server, RedisClusterProcesses):
                server.pause(int(pause_seconds * 1000))  # every master
            else:
                admin = redis.Redis(port=server.port)
                admin.client_pause(int(pause_seconds * 1000), all=True)
                admin.close()
            paused_until = time.monotonic() + pause_seconds
            await asyncio.sleep(pause_seconds)
            await load.run_phase("after", 5)
            await load.stop()
        after = cache_results(await scrape(service.url))
    samples = load.samples
    phases = by_phase(samples)
    lookups = {result: after.get(result, 0) - before.get(result, 0) for result in after}
    chaos_result.update(figures(samples))
    chaos_result["cache_lookups_from_fault_on"] = lookups

    check_answers(samples)
    during = [s for s in phases["during"] if s.started < paused_until]
    slow = [s for s in during if s.seconds > OUTAGE_LATENCY_BOUND]
    assert not slow, f"requests waited for the paused Redis:\n{describe(slow)}"
    # The breaker opened: most lookups skipped Redis (bypass) instead of each waiting for its
    # timeout (error). Without a breaker every lookup of the pause would be an error.
    assert lookups.get("bypass", 0) > 3 * lookups.get("error", 0), lookups
    assert "redis circuit opened" in service.output()
    recovered = late_hit_rate(phases["after"], 2) or 0
    assert recovered >= 0.9, figures(phases["after"])
    slowest = max(sample.seconds for sample in during) * 1000
    chaos_result["notes"] = (
        f"from the pause on, {lookups.get('bypass', 0):.0f} lookups skipped Redis (breaker "
        f"open) and {lookups.get('error', 0):.0f} waited for the {REDIS_TIMEOUT} s timeout; "
        f"slowest request in the pause {slowest:.0f} ms; answers correct; hit rate in the "
        f"last 2 s {recovered:.0%}"
    )
