"""The Redis side of a change is done once across the fleet, whatever its number of workers.

Every worker's listener gets every notification and drops its own local tier; only the one
holding the invalidator lock runs the Redis invalidation, and the others settle by its round
markers (``service.cache.listener``). Workers here are apps in this process, each with its own
listener, cache and pools, sharing the test database and Redis database as processes would.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
import redis

from service.cache.listener import InvalidationListener
from service.config import Settings
from tests.conftest import Api, RunningApi, app_settings
from tests.factories import add_booking, small_dataset

# Commands of the measurement itself and of the stats publishers (which publish on a timer,
# not per write).
NOT_PER_WRITE = {"info", "hset", "expire", "hdel", "hgetall", "config|resetstat", "ping"}


def _commands(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(
        int(values["calls"])
        for name, values in stats.items()
        if name.removeprefix("cmdstat_") not in NOT_PER_WRITE
    )


def _listener(api: Api) -> InvalidationListener:
    listener = api.resources.listener
    assert listener is not None
    return listener


def _book(db: psycopg.Connection, data: dict[str, int], salon: str = "lisbon") -> None:
    add_booking(
        db,
        salon_id=data[salon],
        client_id=data["bob"],
        professional_id=data[f"pro_{salon}"],
        service_id=data["cut" if salon == "lisbon" else "nails"],
        scheduled_at=datetime.now(UTC) - timedelta(hours=1),
    )


async def _settle_all(apps: list[Api]) -> None:
    for api in apps:
        await _listener(api).settle()


@pytest.fixture
async def fleet(
    base_settings: Settings, database_url: str, clean_db: str, redis_url: str
) -> AsyncIterator[list[Api]]:
    """Four workers, started one after the other (the first takes the invalidator lock)."""
    settings = app_settings(base_settings, database_url, redis_url)
    async with AsyncExitStack() as stack:
        apps = [await stack.enter_async_context(RunningApi(settings)) for _ in range(4)]
        for api in apps:
            # The measurement counts the steady state: no follower gives up waiting.
            _listener(api).follow_wait = 30.0
        yield apps


async def test_redis_commands_per_write_do_not_grow_with_workers(
    base_settings: Settings, database_url: str, db: psycopg.Connection, redis_url: str
) -> None:
    settings = app_settings(base_settings, database_url, redis_url)
    data = small_dataset(db)
    client = redis.Redis.from_url(redis_url)
    writes = 4
    per_write: dict[int, float] = {}
    async with AsyncExitStack() as stack:
        fleet: list[Api] = []
        try:
            for workers in (1, 2, 4):
                while len(fleet) < workers:  # the first one started takes the lock
                    fleet.append(await stack.enter_async_context(RunningApi(settings)))
                    # The steady state is measured: no follower gives up waiting.
                    _listener(fleet[-1]).follow_wait = 30.0
                    # Nor the stats every worker publishes every 2 s (their script's EVALSHA,
                    # the error budgets' HINCRBY and EXPIREAT), which are not per write.
                    publisher = fleet[-1].resources.publisher
                    assert publisher is not None
                    await publisher.stop()
                await _settle_all(fleet)
                # Every worker has something of Lisbon cached, as a busy fleet would.
                for api in fleet:
                    response = await api.report("dashboard", salon_id=data["lisbon"])
                    assert response.status_code == 200
                before = _commands(client)
                for _ in range(writes):
                    _book(db, data)
                    await _settle_all(fleet)
                per_write[workers] = (_commands(client) - before) / writes
        finally:
            client.close()
        print(f"Redis commands per booking write, by number of workers: {per_write}")
        assert per_write[1] > 0
        assert per_write[1] == per_write[2] == per_write[4]

        listeners = [_listener(api) for api in fleet]
        (invalidator,) = [listener for listener in listeners if listener.invalidator]
        assert invalidator is listeners[0]
        assert invalidator.rounds_led >= 3 * writes
        for listener in listeners[1:]:
            assert listener.rounds_led == 0
            assert listener.rounds_followed >= writes
            assert listener.fallbacks == 0


async def test_a_follower_never_settles_a_change_the_round_did_not_cover(
    fleet: list[Api], db: psycopg.Connection
) -> None:
    """The interleaving: the invalidator's round for a change to Lisbon has invalidated Redis,
    and a change to New York is notified before the round's end marker. A follower must keep
    New York pending (the round did not cover it) and so serve none of its Redis entries
    until the next round, which is held back here until the follower has answered."""
    leader, follower = fleet[0], fleet[1]
    data = small_dataset(db)
    await _settle_all(fleet)
    newyork = data["newyork"]
    first = await follower.report("dashboard", salon_id=newyork)
    assert first.json()["bookings_total"] == 2
    assert (await follower.report("dashboard", salon_id=newyork)).headers["X-Cache"] == "HIT"

    follower_cache = follower.resources.cache
    answered = asyncio.Event()
    rounds: list[str] = []

    async def hook(phase: str) -> None:
        rounds.append(phase)
        if rounds == ["apply", "end"]:  # Lisbon's round: New York changes before its end
            await asyncio.to_thread(_book, db, data, "newyork")
            while not follower_cache.announcements.pending(f"{{s:{newyork}}}"):
                await asyncio.sleep(0.005)
        elif len(rounds) == 3:  # New York's round waits for the follower's answer
            await asyncio.wait_for(answered.wait(), 30)

    # The invalidator's round: its Redis invalidations run between "apply" and "end".
    leader_cache = _listener(leader).cache
    invalidate = leader_cache.apply_announced

    async def invalidate_in_a_round() -> int:
        await hook("apply")
        applied = await invalidate()
        await hook("end")
        return applied

    leader_cache.apply_announced = invalidate_in_a_round  # type: ignore[method-assign]
    try:
        _book(db, data, "lisbon")
        while _listener(follower).rounds_followed == 0 or len(rounds) < 3:
            await asyncio.sleep(0.005)
        # The follower has settled Lisbon's round, not New York's change: New York's entry,
        # still in Redis, is not served.
        answer = await follower.report("dashboard", salon_id=newyork)
        assert answer.json()["bookings_total"] == 3
        assert answer.headers["X-Cache"] != "HIT"
        assert follower_cache.announcements.pending(f"{{s:{newyork}}}")
    finally:
        answered.set()
        del leader_cache.apply_announced
    await _settle_all(fleet)
    assert (await follower.report("dashboard", salon_id=newyork)).json()["bookings_total"] == 3


async def test_when_the_invalidator_goes_a_follower_takes_over(
    base_settings: Settings, database_url: str, db: psycopg.Connection, redis_url: str
) -> None:
    """The invalidator's worker stops: the next change waits ``follow_wait`` on a follower,
    which then takes the lock, invalidates itself, and runs the rounds from then on."""
    settings = app_settings(base_settings, database_url, redis_url)
    data = small_dataset(db)
    lisbon = data["lisbon"]
    first = RunningApi(settings)
    leader = await first.__aenter__()
    stopped = False
    try:
        async with RunningApi(settings) as follower:
            await _settle_all([leader, follower])
            assert _listener(leader).invalidator
            assert not _listener(follower).invalidator
            before = (await follower.report("dashboard", salon_id=lisbon)).json()
            await first.__aexit__(None, None, None)  # the invalidator's worker stops
            stopped = True
            _listener(follower).follow_wait = 0.2
            _book(db, data)
            await _settle_all([follower])
            answer = await follower.report("dashboard", salon_id=lisbon)
            assert answer.json()["bookings_total"] == before["bookings_total"] + 1
            assert _listener(follower).fallbacks == 1
            assert _listener(follower).invalidator
            _book(db, data)
            await _settle_all([follower])
            assert _listener(follower).rounds_led >= 1
            assert _listener(follower).fallbacks == 1
            answer = await follower.report("dashboard", salon_id=lisbon)
            assert answer.json()["bookings_total"] == before["bookings_total"] + 2
    finally:
        if not stopped:
            await first.__aexit__(None, None, None)
