"""``salon-reports simulate``: bounded Zipf traffic plus booking writes (issue 8).

The simulation runs in process here, against the app through an ASGI transport, so that its
counts can be held against the service's own stats and the database; the browser test
(tests/test_page.py) runs the real command against a real server.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import httpx
import psycopg
import pytest

from service.config import Settings
from service.tools.seed import seed_database
from service.tools.simulate import (
    DRAIN_SECONDS,
    REPORTS,
    SimulationError,
    ZipfChoice,
    check_loopback,
    run_simulation,
    simulate,
)
from tests.conftest import Api, RunningApi, app_settings
from tests.support import free_port

PREFIX = "/api/v1/optimized-reports"


def bookings(db: psycopg.Connection) -> int:
    row = db.execute("SELECT count(*) FROM bookings").fetchone()
    assert row is not None
    return int(row[0])


async def _stats(api: Api) -> dict[str, Any]:
    response = await api.get(f"{PREFIX}/performance/stats", api.token("ops"))
    assert response.status_code == 200
    stats: dict[str, Any] = response.json()
    return stats


async def test_simulation_sends_a_zipf_mix_and_writes_bookings(
    base_settings: Settings, database_url: str, db: psycopg.Connection, redis_url: str
) -> None:
    seed_database(database_url, bookings=3000, salons=5, days=120, seed=5)
    before = bookings(db)
    row = db.execute("SELECT now()").fetchone()
    assert row is not None
    started = row[0]
    settings = app_settings(base_settings, database_url, redis_url)
    progress: list[str] = []
    async with RunningApi(settings) as api:
        result = await run_simulation(
            url="http://testserver",
            rps=60,
            writes_per_min=600,
            duration=2.0,
            settings=settings,
            transport=httpx.ASGITransport(app=api.app),
            seed=3,
            progress=progress.append,
        )
        stats = await _stats(api)
    tally = result.tally

    # Bounded: 2 s at 60 requests/s (some not sent if MAX_IN_FLIGHT are still waiting on a
    # busy machine), then at most DRAIN_SECONDS for the last answers; every one answered.
    assert 110 <= tally.sent + tally.skipped <= 121
    assert tally.sent >= 60
    assert 1.9 <= result.seconds < 2 + DRAIN_SECONDS + 1
    assert tally.statuses == Counter({"200": tally.sent})
    # What the client saw is what the service counted.
    endpoints = stats["since_start"]["endpoints"]
    assert (
        sum(endpoints.get(f"GET {PREFIX}/{report}", {"count": 0})["count"] for report in REPORTS)
        == tally.sent
    )
    cache = stats["since_start"]["cache"]
    assert tally.cache["HIT"] + tally.cache["STALE"] == cache["hits"] + cache["stale"]
    assert tally.cache["MISS"] == cache["misses"]
    assert cache["bypass"] == 0  # realtime answers BYPASS, but it is no cache lookup
    assert tally.cache["HIT"] > 0
    assert tally.cache["MISS"] > 0
    # Zipf: the first report is the most requested, the last the least.
    by_report = {
        report: endpoints.get(f"GET {PREFIX}/{report}", {"count": 0})["count"] for report in REPORTS
    }
    assert by_report["dashboard"] > by_report["professionals"] > 0
    assert by_report["dashboard"] > by_report["realtime"] > 0
    assert tally.cache["BYPASS"] == by_report["realtime"]
    # Writes went straight into PostgreSQL: 600 a minute for 2 s.
    writes = tally.inserts + tally.updates
    assert 18 <= writes <= 21
    assert tally.write_errors == 0
    after = bookings(db)
    assert after - before == tally.inserts
    row = db.execute(
        "SELECT count(*) FROM bookings WHERE updated_at > %s AND created_at <= %s",
        (started, started),
    ).fetchone()
    assert row is not None
    assert tally.updates > 0
    assert 1 <= row[0] <= tally.updates  # a booking may be confirmed, then cancelled
    assert tally.salons_written
    summary = result.summary()
    assert f"{tally.sent} sent, {tally.sent} answered, 0 failed" in summary
    assert f"status: 200: {tally.sent}" in summary
    assert (
        f"writes: {writes} ({tally.inserts} new bookings, {tally.updates} status changes" in summary
    )
    assert progress == []  # under 10 s: no progress line


async def test_simulation_without_writes_or_salons(
    base_settings: Settings, database_url: str, db: psycopg.Connection, redis_url: str
) -> None:
    settings = app_settings(base_settings, database_url, redis_url)
    async with RunningApi(settings) as api:
        transport = httpx.ASGITransport(app=api.app)
        with pytest.raises(SimulationError, match="no salons"):
            await run_simulation(
                url="http://testserver",
                rps=10,
                writes_per_min=0,
                duration=1,
                settings=settings,
                transport=transport,
            )
        seed_database(database_url, bookings=200, salons=2, days=30, seed=1)
        before = bookings(db)
        result = await run_simulation(
            url="http://testserver",
            rps=10,
            writes_per_min=0,
            duration=1,
            settings=settings,
            transport=transport,
        )
    assert result.tally.sent >= 9
    assert result.tally.inserts + result.tally.updates == 0
    assert bookings(db) == before


async def test_simulation_says_when_no_service_answers(
    base_settings: Settings, database_url: str, db: psycopg.Connection
) -> None:
    seed_database(database_url, bookings=100, salons=1, days=10, seed=1)
    settings = app_settings(base_settings, database_url, "")
    with pytest.raises(SimulationError, match="no service answering"):
        await run_simulation(
            url=f"http://127.0.0.1:{free_port()}",
            rps=10,
            writes_per_min=10,
            duration=1,
            settings=settings,
        )


@pytest.mark.parametrize(
    "url", ["http://10.1.2.3:8000", "http://192.0.2.7", "ftp://127.0.0.1/", "127.0.0.1:8000"]
)
def test_simulate_only_targets_this_machine(url: str) -> None:
    with pytest.raises(SimulationError):
        check_loopback(url)
    with pytest.raises(SimulationError):
        simulate(url=url, rps=1, writes_per_min=0, duration=1)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:80"])
def test_loopback_urls_are_accepted(url: str) -> None:
    check_loopback(url)


def test_zipf_choice_favours_the_first_ranks() -> None:
    choose = ZipfChoice(["a", "b", "c", "d", "e"], random.Random(1))
    counts = Counter(choose() for _ in range(20_000))
    ordered = [counts[item] for item in "abcde"]
    assert ordered == sorted(ordered, reverse=True)
    # Rank k drawn in proportion to 1/k**1.1: the first about 46 % of the time.
    expected = 1 / sum(1 / rank**1.1 for rank in range(1, 6))
    assert abs(counts["a"] / 20_000 - expected) < 0.02
