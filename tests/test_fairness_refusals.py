"""A flooding tenant's refusals made cheap (issue 19): refused before FastAPI, and delayed when
they repeat. Neither may change what a refusal is, nor refuse what is not a computation.

What would break, and how each test pins it down (no clock: hooks and orderings):

- The early refusal answers other bytes or headers than the endpoint's 429, or is counted
  differently: the same request is refused both ways (the hit path switched off for the
  second) and compared byte for byte, and the throttle counters move by one each time.
- The early refusal refuses a hit: an entry another worker put in Redis (not in this worker's
  local tier) must be served 200 ``HIT`` while the tenant is over its share here, and so must
  a key whose computation is in flight in this worker (the request joins it).
- The delay holds something that others wait for, or refuses in another order: a repeated
  refusal is held at the scheduler's sleep (a hook, never a clock), and meanwhile another
  salon's cold report and the noisy salon's own cached report are answered.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from service.config import Settings
from service.fairness import FairScheduler, Tenant, TenantThrottled
from tests.conftest import Api, RunningApi
from tests.reports.test_hits import hits_of
from tests.test_fairness import (
    NOISY_LIMIT,
    NOISY_QUEUE,
    Gate,
    _fair_settings,
    _until,
    _windows,
)

PREFIX = "/api/v1/optimized-reports"
# A parent that was not sampled: the request is not traced (parent-based sampling), as nine
# in ten are at the recommended ratio; the early refusal takes only those.
UNSAMPLED = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"}


def _professionals(salon: int, window: dict[str, Any], limit: int = 7) -> dict[str, Any]:
    return {"salon_id": salon, "limit": limit, **window}


async def _fill_share(api: Api, token: str, salon: int) -> tuple[Gate, list[asyncio.Task[Any]]]:
    """The salon's share held at its connection turn and its queue full (sampled requests:
    the endpoint's way)."""
    gate = Gate(f"s:{salon}")
    api.resources.reports.fairness.on_turn = gate
    held = [
        asyncio.create_task(api.report("professionals", token, salon_id=salon, limit=50, **window))
        for window in _windows(NOISY_LIMIT + NOISY_QUEUE, offset=40)
    ]
    scheduler = api.resources.reports.fairness
    tenant = Tenant(f"s:{salon}", "owner", salon)
    await _until(lambda: gate.held == NOISY_LIMIT and scheduler.full(tenant), "share and queue")
    return gate, held


def _throttled(api: Api) -> int:
    return sum(api.resources.telemetry.instruments.fairness.throttled.values())


def _without_trace_id(response: httpx.Response) -> list[tuple[bytes, bytes]]:
    return [(name, value) for name, value in response.headers.raw if name != b"x-trace-id"]


async def _warm_route(api: Api, token: str, salon: int) -> None:
    """One answered request of the report: the hit path learns its route from it."""
    response = await api.report("professionals", token, salon_id=salon, limit=1)
    assert response.status_code == 200


async def test_the_early_refusal_is_the_endpoints_429_byte_for_byte_and_counted_alike(
    base_settings: Settings,
    database_url: str,
    clean_db: str,
    redis_url: str,
    data: dict[str, int],
) -> None:
    noisy = data["lisbon"]
    settings = _fair_settings(
        base_settings, database_url, redis_url, tenant_repeat_refusal_delay=0.0
    )
    async with RunningApi(settings) as api:
        token = api.token("owner", [noisy])
        await _warm_route(api, token, noisy)
        gate, held = await _fill_share(api, token, noisy)
        hits = hits_of(api)
        path = f"{PREFIX}/professionals"
        stats = api.app.state.telemetry.stats
        route = f"GET {path}"

        def counted() -> tuple[int, int, int]:
            endpoint = stats.snapshot()["since_start"]["endpoints"][route]
            return _throttled(api), hits.refused, endpoint["latency"]["count"]

        answers = []
        for index, window in enumerate(_windows(4, offset=5)):
            params = _professionals(noisy, window)
            before = counted()
            if index % 2 == 0:
                response = await api.get(path, token, params=params, headers=UNSAMPLED)
                assert counted() == (before[0] + 1, before[1] + 1, before[2] + 1)
            else:  # the same kind of request, the hit path off: the endpoint refuses it
                hits.enabled = False
                try:
                    response = await api.get(path, token, params=params, headers=UNSAMPLED)
                finally:
                    hits.enabled = True
                assert counted() == (before[0] + 1, before[1], before[2] + 1)
            answers.append(response)
        early, endpoint = answers[0], answers[1]
        assert early.status_code == endpoint.status_code == 429
        assert early.content == endpoint.content
        assert early.json()["error"]["code"] == "tenant_throttled"
        assert _without_trace_id(early) == _without_trace_id(endpoint)
        assert early.headers["retry-after"] == endpoint.headers["retry-after"] == "60"
        assert early.headers["x-trace-id"]
        # A sampled request is left to the endpoint (its trace keeps the cache span).
        refused = hits.refused
        sampled = await api.get(path, token, params=_professionals(noisy, _windows(1, 9)[0]))
        assert sampled.status_code == 429
        assert hits.refused == refused
        assert sampled.content == early.content
        assert api.resources.telemetry.instruments.fairness.throttled[("owner", "queue_full")] == 5
        # Another salon is not refused by the early path: its miss is computed.
        other = data["newyork"]
        other_token = api.token("owner", [other])
        await api.report("dashboard", other_token, salon_id=other)  # its time zone known
        cold = await api.get(
            path, other_token, params=_professionals(other, _windows(1, 3)[0]), headers=UNSAMPLED
        )
        assert (cold.status_code, cold.headers["x-cache"]) == (200, "MISS")
        gate.opened.set()
        assert [r.status_code for r in await asyncio.gather(*held)] == [200] * len(held)


async def test_a_hit_is_never_refused_early_even_in_redis_only_or_in_flight(
    base_settings: Settings,
    database_url: str,
    clean_db: str,
    redis_url: str,
    data: dict[str, int],
) -> None:
    """The tenant is over its share in the first worker; an entry the second worker stored
    (in Redis, not in the first worker's local tier) is served, and so is a key whose
    computation is running in the first worker (the request joins it)."""
    noisy = data["lisbon"]
    settings = _fair_settings(
        base_settings, database_url, redis_url, tenant_repeat_refusal_delay=0.0
    )
    async with RunningApi(settings) as first, RunningApi(settings) as second:
        token = first.token("owner", [noisy])
        await _warm_route(first, token, noisy)
        stored = _professionals(noisy, _windows(1, offset=11)[0])
        filled = await second.report("professionals", token, **stored)
        assert (filled.status_code, filled.headers["x-cache"]) == (200, "MISS")
        gate, held = await _fill_share(first, token, noisy)
        path = f"{PREFIX}/professionals"
        hits = hits_of(first)
        refused = hits.refused
        answer = await first.get(path, token, params=stored, headers=UNSAMPLED)
        assert (answer.status_code, answer.headers["x-cache"]) == (200, "HIT")
        assert answer.content == filled.content
        # In flight here: one of the held computations' own key, asked again.
        in_flight = _professionals(noisy, _windows(1, offset=40)[0], limit=50)
        joiner = asyncio.create_task(first.get(path, token, params=in_flight, headers=UNSAMPLED))
        other = await first.get(
            path, token, params=_professionals(noisy, _windows(1, 12)[0]), headers=UNSAMPLED
        )
        assert other.status_code == 429  # what is neither stored nor in flight is refused
        assert hits.refused == refused + 1
        assert not joiner.done()  # it waits for the held computation, it was not refused
        gate.opened.set()
        joined = await joiner
        assert (joined.status_code, joined.headers["x-cache"]) == (200, "MISS")
        assert [r.status_code for r in await asyncio.gather(*held)] == [200] * len(held)


async def test_a_repeated_refusal_waits_its_delay_and_holds_nothing_meanwhile(
    base_settings: Settings,
    database_url: str,
    clean_db: str,
    redis_url: str,
    data: dict[str, int],
) -> None:
    noisy, victim = data["lisbon"], data["newyork"]
    settings = _fair_settings(
        base_settings, database_url, redis_url, tenant_repeat_refusal_delay=0.5
    )
    async with RunningApi(settings) as api:
        token = api.token("owner", [noisy])
        victim_token = api.token("owner", [victim])
        cached = await api.report("dashboard", token, salon_id=noisy)
        await api.report("dashboard", victim_token, salon_id=victim)
        await _warm_route(api, token, noisy)
        scheduler = api.resources.reports.fairness
        slept: list[float] = []
        wake = asyncio.Event()

        async def sleep(seconds: float) -> None:  # the delay, held until the test lets it go
            slept.append(seconds)
            await wake.wait()

        scheduler.sleep = sleep
        gate, held = await _fill_share(api, token, noisy)
        path = f"{PREFIX}/professionals"
        windows = _windows(3, offset=20)
        # The first refusal within the Retry-After is answered at once (the endpoint's way or
        # the early one alike), the next ones are held at the delay.
        first = await api.get(path, token, params=_professionals(noisy, windows[0]))
        assert first.status_code == 429
        assert slept == []
        repeats = [
            asyncio.create_task(api.get(path, token, params=_professionals(noisy, w), headers=h))
            for w, h in ((windows[1], UNSAMPLED), (windows[2], {}))
        ]
        await _until(lambda: len(slept) == 2, "both repeats held")
        assert slept == [0.5, 0.5]
        assert scheduler.held == 2
        # Meanwhile: another salon's cold report is computed, the noisy salon's cached one
        # served, and nothing of the noisy salon's share moved.
        cold = await api.report("dashboard", victim_token, salon_id=victim, **_windows(1, 2)[0])
        assert (cold.status_code, cold.headers["x-cache"]) == (200, "MISS")
        hit = await api.report("dashboard", token, salon_id=noisy)
        assert (hit.status_code, hit.content) == (200, cached.content)
        assert not any(task.done() for task in repeats)
        assert gate.held == NOISY_LIMIT
        wake.set()
        for response in await asyncio.gather(*repeats):
            assert response.status_code == 429
            assert response.content == first.content
            assert response.headers["retry-after"] == first.headers["retry-after"]
        assert scheduler.held == 0
        counts = api.resources.telemetry.instruments.fairness
        assert counts.delayed == 2
        assert counts.throttled[("owner", "queue_full")] == 3
        stats = (await api.get(f"{PREFIX}/performance/stats", api.token())).json()
        assert stats["fairness"]["since_start"]["delayed"] == 2
        gate.opened.set()
        await asyncio.gather(*held)


async def test_the_delay_applies_to_repeats_only_and_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scheduler = FairScheduler(
        capacity=4, per_tenant=1, queue=0, queue_timeout=1.0, repeat_delay=0.25
    )
    release = asyncio.Event()
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        await release.wait()

    scheduler.sleep = sleep
    salon, other = Tenant("s:1", "owner", 1), Tenant("s:2", "owner", 2)

    async def hold(tenant: Tenant) -> None:
        async with scheduler.computation(tenant):
            await release.wait()

    running = [asyncio.create_task(hold(salon)), asyncio.create_task(hold(other))]
    await asyncio.sleep(0)

    def refusal(tenant: Tenant) -> TenantThrottled:
        with pytest.raises(TenantThrottled) as refused:
            scheduler.refuse_if_full(tenant)
        return refused.value

    # Each tenant's first refusal is answered at once; its repeats wait; the tenants apart.
    assert [refusal(salon).delay, refusal(salon).delay] == [0.0, 0.25]
    assert [refusal(other).delay, refusal(other).delay] == [0.0, 0.25]
    monkeypatch.setattr("service.fairness.MAX_HELD_REFUSALS", 2)
    waiting = [asyncio.create_task(scheduler.hold(refusal(salon))) for _ in range(3)]
    await asyncio.sleep(0)
    # Two wait; the third is answered at once rather than queue without bound.
    assert scheduler.held == 2
    assert slept == [0.25, 0.25]
    assert [task.done() for task in waiting] == [False, False, True]
    release.set()
    await asyncio.gather(*waiting, *running)
    assert scheduler.held == 0
    assert scheduler.counts.delayed == 2
    # A queue that timed out is not a repeat flood: never delayed.
    assert TenantThrottled(1.0, "queue_timeout").delay == 0.0
