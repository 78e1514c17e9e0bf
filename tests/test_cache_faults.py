"""Two cache failure paths that `make chaos` found broken, pinned down without any load."""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from service.cache import NAMESPACE
from service.cache import store as cache_store
from service.config import Settings
from service.db import async_engine
from tests.conftest import RunningApi, app_settings, settle_stream
from tests.factories import small_dataset
from tests.support import redis_client, redis_process


def lock_keys(url: str) -> list[str]:
    client = redis_client(url)
    try:
        return [name.decode() for name in client.scan_iter(match=f"{NAMESPACE}:*:lock")]
    finally:
        client.close()


async def test_a_failed_store_still_releases_the_fill_lock(
    base_settings: Settings, database_url: str, db: psycopg.Connection, redis_url: str
) -> None:
    """Otherwise every other worker waits for that key until the lease runs out (15 s)."""
    salon = small_dataset(db)["lisbon"]
    settings = app_settings(base_settings, database_url, redis_url, cache_local_entries=0)
    async with RunningApi(settings) as api:
        cache = api.resources.cache

        async def store_fails(*_: object, **__: object) -> None:
            raise RedisConnectionError("connection reset")

        cache._store = store_fails  # type: ignore[assignment]
        response = await api.report("dashboard", salon_id=salon)
        assert response.status_code == 200
        assert response.headers["x-cache"] == "MISS"
        assert lock_keys(redis_url) == []


async def test_cached_answers_outlive_a_database_outage_that_drops_the_listener(
    base_settings: Settings, database_url: str, db: psycopg.Connection, redis_url: str
) -> None:
    """PostgreSQL down also cuts the invalidation listener (same server): the cache is then
    untrusted, but an entry it holds beats a 503, served STALE and not to be kept."""
    salon = small_dataset(db)["lisbon"]
    settings = app_settings(base_settings, database_url, redis_url)
    async with RunningApi(settings) as api:
        cached = await api.report("dashboard", salon_id=salon)
        assert cached.status_code == 200
        reports = api.resources.reports
        healthy = reports.engine
        reports.engine = async_engine(
            healthy.url.set(port=1).render_as_string(hide_password=False), pool_timeout=0.5
        )
        api.resources.cache.listener_healthy = False  # as the listener's connection drops
        try:
            served = await api.report("dashboard", salon_id=salon)
            assert served.status_code == 200
            assert served.headers["x-cache"] == "STALE"
            assert served.headers["cache-control"] == "private, max-age=0"
            assert served.content == cached.content
            cold = await api.report("bookings", salon_id=salon)
            assert cold.status_code == 503
            assert cold.json()["error"]["code"] == "database_unavailable"
        finally:
            await reports.engine.dispose()
            reports.engine = healthy
            api.resources.cache.listener_healthy = True


@pytest.mark.single_redis(
    "it kills a private single Redis; the admin clear on a cluster: tests/test_redis_cluster.py"
)
async def test_cache_clear_with_redis_down_is_a_clean_503(
    base_settings: Settings, database_url: str, db: psycopg.Connection
) -> None:
    """Through the circuit breaker like every other Redis call: a 503 with Retry-After, at once
    while the breaker is open, and a 200 again once Redis is back."""
    small_dataset(db)
    with redis_process() as server:
        settings = app_settings(
            base_settings, database_url, server.url, redis_timeout=0.5, redis_breaker_cooldown=0.5
        )
        async with RunningApi(settings) as api:
            headers = {"Authorization": f"Bearer {api.token()}"}
            url = "/api/v1/optimized-reports/cache/clear"
            server.kill()
            for body in ({}, {"salon_id": 1}, {"report": "dashboard"}, {}, {}, {}):
                response = await api.http.post(url, json=body, headers=headers)
                assert response.status_code == 503, response.text
                assert response.json()["error"]["code"] == "cache_unavailable"
                assert response.headers["retry-after"].isdigit()
            assert api.resources.cache.breaker.is_open
            started = time.monotonic()
            response = await api.http.post(url, json={}, headers=headers)
            assert response.status_code == 503
            assert time.monotonic() - started < 0.4  # no Redis call while the breaker is open
            server.start()
            await asyncio.sleep(0.6)  # past the cooldown: the next clear is the probe
            response = await api.http.post(url, json={}, headers=headers)
            assert response.status_code == 200, response.text


async def test_a_lock_left_behind_holds_requests_back_only_briefly(
    base_settings: Settings,
    database_url: str,
    db: psycopg.Connection,
    clean_db: str,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A holder whose release failed (Redis paused at that moment) leaves its lock for the rest
    of its lease; requests for that key wait at most ``HOLDER_WAIT_SECONDS`` for it, then
    compute themselves, instead of waiting out the lease."""
    monkeypatch.setattr(cache_store, "HOLDER_WAIT_SECONDS", 0.3)
    salon = small_dataset(db)["lisbon"]
    settle_stream(clean_db)
    settings = app_settings(
        base_settings, database_url, redis_url, cache_local_entries=0, cache_lock_lease=600.0
    )
    async with RunningApi(settings) as api:
        first = await api.report("dashboard", salon_id=salon)
        assert first.status_code == 200
        client = redis_client(redis_url)
        try:
            entries = [
                name.decode()
                for name in client.scan_iter(match=f"{NAMESPACE}:*dashboard*")
                if not name.endswith((b":epoch", b":lock")) and b":keys:" not in name
            ]
            assert len(entries) == 1, entries
            client.delete(entries[0])  # a miss again ...
            client.set(f"{entries[0]}:lock", "a holder that is gone", px=600_000)  # ... locked
        finally:
            client.close()
        second = await asyncio.wait_for(api.report("dashboard", salon_id=salon), timeout=60)
        assert second.status_code == 200
        assert second.headers["x-cache"] == "MISS"
        assert second.json() == first.json()
