"""Fair share between tenants (service/fairness.py): a noisy salon waits behind its own backlog.

The interleavings that would break it, and how each test pins them down without a clock:

- One salon floods cold reports and takes every connection, so another salon's cold report
  waits for the flood (the pool's first-come-first-served queue): the noisy salon's database
  work is held at its turn by a hook, and the victim's cold reports must be answered while it
  is held — they wait behind none of its computations.
- Several tenants queue for connections, a new one arrives: with one queue in arrival order it
  waits behind every earlier request; round-robin lets it wait behind at most one computation
  of each other waiting tenant (a randomized history of arrivals and completions, checked).
- Two workers each let a tenant run its share: the tenant holds twice its limit unless the
  limit is shared (leases in Redis); a worker that dies holding leases must not keep them.
- Redis is down: the shared count cannot be read, and requests must still be answered.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from datetime import date, timedelta
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from service.cache import CircuitBreaker
from service.config import Settings
from service.fairness import (
    ADMIN_TENANT,
    FairScheduler,
    Tenant,
    TenantLeases,
    TenantThrottled,
)
from tests.conftest import Api, RunningApi, app_settings
from tests.support import free_port

NOISY_LIMIT = 2
NOISY_QUEUE = 3


def _owner(salon: int) -> Tenant:
    return Tenant(f"s:{salon}", "owner", salon)


async def _until(condition: Callable[[], bool], what: str) -> None:
    """Let the event loop run until ``condition`` holds (a safety limit, not a measurement)."""
    for _ in range(20_000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"never happened: {what}")


class Gate:
    """Holds one tenant's database work at its connection turn until opened."""

    def __init__(self, lane: str) -> None:
        self.lane = lane
        self.opened = asyncio.Event()
        self.held = 0
        self.turns: list[str] = []  # every lane's turns, in the order they were given

    async def __call__(self, lane: str) -> None:
        self.turns.append(lane)
        if lane == self.lane:
            self.held += 1
            try:
                await self.opened.wait()
            finally:
                self.held -= 1


def _windows(count: int, offset: int = 0) -> list[dict[str, Any]]:
    """Distinct periods: each one a cold key."""
    end = date.today() - timedelta(days=offset)
    return [
        {"start": (end - timedelta(days=300 + index)).isoformat(), "end": end.isoformat()}
        for index in range(count)
    ]


def _fair_settings(base: Settings, database_url: str, redis_url: str, **overrides: Any) -> Settings:
    fair: dict[str, Any] = {
        "pool_size": 4,
        "pool_max_overflow": 0,
        "tenant_max_concurrent": NOISY_LIMIT,
        "tenant_queue": NOISY_QUEUE,
        # Long enough never to expire in these tests unless one asks: a 429 is a full queue.
        "tenant_queue_timeout": 60.0,
    }
    return app_settings(base, database_url, redis_url, **{**fair, **overrides})


def _assert_throttled(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert int(response.headers["Retry-After"]) >= 1
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "tenant_throttled"


async def test_a_flood_of_cold_reports_does_not_hold_back_another_salon(
    base_settings: Settings,
    database_url: str,
    clean_db: str,
    redis_url: str,
    data: dict[str, int],
) -> None:
    noisy, victim = data["lisbon"], data["newyork"]
    settings = _fair_settings(base_settings, database_url, redis_url)
    async with RunningApi(settings) as api:
        noisy_token = api.token("owner", [noisy])
        victim_token = api.token("owner", [victim])
        # Cached before the flood: the noisy salon's own cached answer, and the victim's.
        for token, salon in ((noisy_token, noisy), (victim_token, victim)):
            warm = await api.report("dashboard", token, salon_id=salon)
            assert warm.status_code == 200
        scheduler = api.resources.reports.fairness
        gate = Gate(f"s:{noisy}")
        scheduler.on_turn = gate

        flood_size = NOISY_LIMIT + NOISY_QUEUE + 7
        flood = [
            asyncio.create_task(
                api.report("professionals", noisy_token, salon_id=noisy, limit=1 + index % 50, **w)
            )
            for index, w in enumerate(_windows(flood_size))
        ]
        # The noisy salon's share is at the gate, its queue full, the rest refused at once.
        await _until(
            lambda: gate.held == NOISY_LIMIT and sum(task.done() for task in flood) == 7,
            "the flood settles into share, queue and refusals",
        )
        refused = [task.result() for task in flood if task.done()]
        for response in refused:
            _assert_throttled(response)

        # The victim's cold reports are computed while every noisy computation is held.
        victim_answers = []
        for window in _windows(5, offset=3):
            response = await api.report("dashboard", victim_token, salon_id=victim, **window)
            victim_answers.append(response)
        assert [(r.status_code, r.headers["X-Cache"]) for r in victim_answers] == [
            (200, "MISS")
        ] * 5
        victim_turns = [lane for lane in gate.turns if lane == f"s:{victim}"]
        assert len(victim_turns) == 5
        # ... behind none of the noisy salon's computations: none has started since the flood
        # filled its share (they were held), and none was queued ahead of the victim's turns.
        assert gate.turns.count(f"s:{noisy}") == NOISY_LIMIT

        # Cached answers never wait, the noisy salon's own included.
        for token, salon in ((noisy_token, noisy), (victim_token, victim)):
            cached = await api.report("dashboard", token, salon_id=salon)
            assert (cached.status_code, cached.headers["X-Cache"]) == (200, "HIT")

        # What ops see while it lasts: the salon by id in the stats, classes in the metrics.
        stats = (await api.get("/api/v1/optimized-reports/performance/stats", api.token())).json()
        fairness = stats["fairness"]
        [row] = [row for row in fairness["tenants"] if row["salon_id"] == noisy]
        assert row == {
            **row,
            "class": "owner",
            "running": NOISY_LIMIT,
            "waiting": NOISY_QUEUE,
            "admitted_last_5m": NOISY_LIMIT + 1,  # and the warm-up's
            "queued_last_5m": NOISY_QUEUE,
            "throttled_last_5m": 7,
        }
        assert row["last_throttled_at"] is not None
        assert fairness["since_start"]["throttled"] == {"owner": 7, "admin": 0}
        assert fairness["since_start"]["throttled_by_reason"]["queue_full"] == 7
        assert fairness["now"]["waiting"]["owner"] == NOISY_QUEUE
        assert [a for a in stats["alerts"] if a["name"] == "tenant_throttling"]
        exposition = (await api.get("/metrics")).text
        throttled = [
            line
            for line in exposition.splitlines()
            if line.startswith("reports_fairness_throttled_total{")
            and 'reason="queue_full"' in line
            and 'tenant_class="owner"' in line
        ]
        assert len(throttled) == 1, throttled
        assert throttled[0].endswith(" 7.0"), throttled
        fairness_lines = [
            line for line in exposition.splitlines() if line.startswith("reports_fairness")
        ]
        assert fairness_lines
        assert not any("salon_id" in line or f"s:{noisy}" in line for line in fairness_lines)

        gate.opened.set()
        answers = await asyncio.gather(*flood)
    codes = sorted(response.status_code for response in answers)
    assert codes == [200] * (NOISY_LIMIT + NOISY_QUEUE) + [429] * 7
    assert all(r.status_code < 500 for r in [*answers, *victim_answers])


async def test_a_queue_that_does_not_move_is_refused_after_its_wait(
    base_settings: Settings,
    database_url: str,
    clean_db: str,
    redis_url: str,
    data: dict[str, int],
) -> None:
    noisy = data["lisbon"]
    settings = _fair_settings(base_settings, database_url, redis_url, tenant_queue_timeout=0.05)
    async with RunningApi(settings) as api:
        token = api.token("owner", [noisy])
        gate = Gate(f"s:{noisy}")
        api.resources.reports.fairness.on_turn = gate
        flood = [
            asyncio.create_task(api.report("dashboard", token, salon_id=noisy, **window))
            for window in _windows(NOISY_LIMIT + NOISY_QUEUE)
        ]
        # The gate stays shut until the queued ones have given up: their wait ran out.
        await _until(lambda: sum(task.done() for task in flood) == NOISY_QUEUE, "queue expiry")
        for task in flood:
            if task.done():
                _assert_throttled(task.result())
        counts = api.resources.telemetry.instruments.fairness
        assert counts.throttled[("owner", "queue_timeout")] == NOISY_QUEUE
        gate.opened.set()
        answers = await asyncio.gather(*flood)
    assert sorted(r.status_code for r in answers) == [200] * NOISY_LIMIT + [429] * NOISY_QUEUE


# -- round-robin turns: a randomized history, checked ---------------------------------------


async def _settle() -> None:
    """Run every callback the scheduler's hand-overs made ready (no I/O, no clock involved)."""
    for _ in range(50):
        await asyncio.sleep(0)


async def _history(seed: int) -> None:
    """Tenants put random numbers of computations through a scheduler of random capacity;
    computations finish in a random order; a victim arrives at a random moment. The victim
    waits behind at most one computation of each tenant waiting for a turn when it arrived."""
    rng = random.Random(seed)
    capacity = rng.randint(1, 4)
    per_tenant = rng.randint(1, 3)
    scheduler = FairScheduler(capacity=capacity, per_tenant=per_tenant, queue=50, queue_timeout=60)
    started: list[str] = []
    finish: dict[int, asyncio.Event] = {}
    running: set[int] = set()

    async def computation(tenant: Tenant, number: int) -> None:
        async with scheduler.computation(tenant), scheduler.turn(tenant.key, 60):
            started.append(tenant.key)
            running.add(number)
            finish[number] = asyncio.Event()
            await finish[number].wait()
            running.discard(number)

    noisy = [_owner(salon) for salon in range(1, rng.randint(2, 5))]
    tasks = []
    for number in range(1, rng.randint(6, 31)):
        tasks.append(asyncio.create_task(computation(rng.choice(noisy), number)))
    await _settle()
    # Finish a few at random before the victim comes.
    for _ in range(rng.randint(0, 5)):
        if running:
            finish[rng.choice(sorted(running))].set()
            await _settle()
    waiting_tenants = {key for key in scheduler._ring if key != "s:99"}
    before = len(started)
    victim = asyncio.create_task(computation(_owner(99), 0))
    await _settle()
    while "s:99" not in started:
        assert running, "nothing runs, yet the victim waits"
        finish[rng.choice(sorted(running))].set()
        await _settle()
    ahead = started[before : started.index("s:99")]
    assert len(ahead) <= len(waiting_tenants), (seed, ahead, waiting_tenants)
    assert all(ahead.count(key) <= 1 for key in waiting_tenants), (seed, ahead)
    for event in finish.values():
        event.set()
    while not all(task.done() for task in [*tasks, victim]):
        for event in list(finish.values()):
            event.set()
        await asyncio.sleep(0.001)
    await asyncio.gather(*tasks, victim)
    assert scheduler.free_turns == capacity
    assert scheduler._lanes == {}


@pytest.mark.parametrize("seed", range(40))
async def test_turns_go_round_robin_between_tenants(seed: int) -> None:
    await _history(seed)


async def test_a_tenant_over_its_share_and_queue_is_refused_and_the_admin_class_is_apart() -> None:
    scheduler = FairScheduler(capacity=10, per_tenant=1, queue=1, queue_timeout=60)
    salon = _owner(1)
    release = asyncio.Event()

    async def hold(tenant: Tenant) -> None:
        async with scheduler.computation(tenant):
            await release.wait()

    first = asyncio.create_task(hold(salon))
    scheduler.refuse_if_full(salon)  # nothing running yet: the pre-check lets it through
    await asyncio.sleep(0)
    scheduler.refuse_if_full(salon)  # one running, the queue empty: still through
    second = asyncio.create_task(hold(salon))  # queued
    await asyncio.sleep(0)
    # Share running, queue full: refused before anything is asked of Redis or the database.
    with pytest.raises(TenantThrottled):
        scheduler.refuse_if_full(salon)
    scheduler.refuse_if_full(_owner(2))
    scheduler.refuse_if_full(ADMIN_TENANT)
    with pytest.raises(TenantThrottled) as refused:
        async with scheduler.computation(salon):
            pass
    assert refused.value.status_code == 429
    assert refused.value.headers == {"Retry-After": "60"}
    # Another salon and the admin class have shares of their own.
    for other in (_owner(2), ADMIN_TENANT):
        async with scheduler.computation(other):
            pass
    release.set()
    await asyncio.gather(first, second)
    assert scheduler.counts.admitted == {"owner": 3, "admin": 1}
    assert scheduler.counts.queued == {"owner": 1}


async def test_the_admin_class_has_no_share_unless_one_is_configured() -> None:
    release = asyncio.Event()

    async def hold(scheduler: FairScheduler) -> None:
        async with scheduler.computation(ADMIN_TENANT):
            await release.wait()

    unlimited = FairScheduler(capacity=10, per_tenant=1, queue=0, queue_timeout=60)
    capped = FairScheduler(capacity=10, per_tenant=1, queue=0, queue_timeout=60, admin_limit=2)
    held = [asyncio.create_task(hold(scheduler)) for scheduler in (unlimited, capped)]
    held += [asyncio.create_task(hold(unlimited)) for _ in range(4)]
    held.append(asyncio.create_task(hold(capped)))
    await _settle()
    assert unlimited.counts.by_class("running")["admin"] == 5
    assert capped.counts.by_class("running")["admin"] == 2
    with pytest.raises(TenantThrottled):
        async with capped.computation(ADMIN_TENANT):
            pass
    release.set()
    await asyncio.gather(*held)


# -- across workers --------------------------------------------------------------------------


async def test_the_limit_is_shared_by_every_worker(
    base_settings: Settings,
    database_url: str,
    clean_db: str,
    redis_url: str,
    data: dict[str, int],
) -> None:
    """Two apps (two workers) on one Redis: the noisy salon runs its share once, not twice."""
    noisy = data["lisbon"]
    settings = _fair_settings(base_settings, database_url, redis_url)
    async with RunningApi(settings) as first, RunningApi(settings) as second:
        token = first.token("owner", [noisy])
        gates = []
        admitted: list[Tenant] = []
        for api in (first, second):
            gate = Gate(f"s:{noisy}")
            api.resources.reports.fairness.on_turn = gate
            api.resources.reports.fairness.on_admitted = admitted.append
            gates.append(gate)
        windows = _windows(2 * NOISY_LIMIT)
        flood = [
            asyncio.create_task(
                (first, second)[index % 2].report("dashboard", token, salon_id=noisy, **window)
            )
            for index, window in enumerate(windows)
        ]
        # Each worker admits the salon locally, but only NOISY_LIMIT leases exist between them.
        await _until(lambda: sum(gate.held for gate in gates) == NOISY_LIMIT, "shares taken")
        for _ in range(50):
            await asyncio.sleep(0.002)  # the others poll for a lease meanwhile, and get none
        assert sum(gate.held for gate in gates) == NOISY_LIMIT
        assert len(admitted) == NOISY_LIMIT
        for gate in gates:
            gate.opened.set()
        answers = await asyncio.gather(*flood)
    assert [r.status_code for r in answers] == [200] * len(windows)
    assert len(admitted) == len(windows)
    client = Redis.from_url(redis_url)
    try:
        assert await client.zcard(TenantLeases.key(_owner(noisy))) == 0  # all given back
    finally:
        await client.aclose()


async def test_a_lease_left_by_a_dead_worker_expires(redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    try:
        leases = TenantLeases(client, CircuitBreaker(), lease=30)
        tenant = _owner(7)
        token = await leases.acquire(tenant, 1, time.monotonic())
        assert isinstance(token, str)
        # Full: a second one is refused once its wait is over.
        assert await leases.acquire(tenant, 1, time.monotonic()) is False
        # The holder dies without releasing; its lease's expiry (server clock) passes.
        await client.zadd(TenantLeases.key(tenant), {token: 0})
        assert isinstance(await leases.acquire(tenant, 1, time.monotonic()), str)
    finally:
        await client.aclose()


async def test_a_dead_redis_degrades_to_the_worker_share(
    base_settings: Settings, database_url: str, clean_db: str, data: dict[str, int]
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    settings = _fair_settings(base_settings, database_url, dead)
    async with RunningApi(settings) as api:
        salon = data["lisbon"]
        answers = [
            await api.report("dashboard", api.token("owner", [salon]), salon_id=salon, **window)
            for window in _windows(3)
        ]
        assert [r.status_code for r in answers] == [200] * 3
        assert api.resources.telemetry.instruments.fairness.degraded >= 1


def test_the_429_is_declared_in_openapi(api: Api) -> None:
    document = api.app.openapi()
    for report in ("dashboard", "bookings", "professionals", "realtime"):
        operation = document["paths"][f"/api/v1/optimized-reports/{report}"]["get"]
        declared = operation["responses"]["429"]
        assert "Retry-After" in declared["headers"]
        assert declared["content"]["application/json"]["schema"]["$ref"].endswith("ErrorBody")
