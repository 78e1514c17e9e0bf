"""The cache against a real Redis and PostgreSQL (docs/design.md, "Cache")."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from service.cache import NAMESPACE
from service.config import Settings
from tests.conftest import Api, RunningApi, app_settings
from tests.factories import add_booking, add_professional, small_dataset
from tests.support import SqlCounter, redis_client, redis_process

PREFIX = "/api/v1/optimized-reports"


@pytest.fixture
async def data(db: psycopg.Connection, request: pytest.FixtureRequest) -> dict[str, int]:
    """The small dataset, its insert notifications already applied by the app's listener."""
    dataset = small_dataset(db)
    if "api" in request.fixturenames:
        await settled(request.getfixturevalue("api"))
    return dataset


def entry_keys(url: str) -> list[str]:
    client = redis_client(url)
    try:
        names = [name.decode() for name in client.scan_iter(match=f"{NAMESPACE}:*", count=500)]
    finally:
        client.close()
    return sorted(n for n in names if not n.endswith((":epoch", ":lock")) and ":keys:" not in n)


async def settled(api: Api) -> None:
    """Let the listener apply the notifications of the test's own data set-up first."""
    listener = api.resources.listener
    assert listener is not None
    await listener.settle()


@pytest.fixture
async def sql(api: Api) -> AsyncIterator[SqlCounter]:
    await settled(api)
    counter = SqlCounter(api)
    yield counter
    counter.close()


async def test_miss_then_hit_with_the_ttl_set(
    api: Api, data: dict[str, int], sql: SqlCounter
) -> None:
    first = await api.report("dashboard", salon_id=data["lisbon"])
    second = await api.report("dashboard", salon_id=data["lisbon"])
    assert first.headers["x-cache"] == "MISS"
    assert second.headers["x-cache"] == "HIT"
    assert first.content == second.content
    assert sql.count == 1
    [key] = entry_keys(api.settings.redis_url)
    ttl = redis_client(api.settings.redis_url).ttl(key)
    expected = api.settings.cache_ttl_dashboard + api.settings.cache_stale_grace
    assert expected - 5 <= ttl <= expected
    max_age = int(second.headers["cache-control"].split("max-age=")[1])
    assert api.settings.cache_ttl_dashboard - 5 <= max_age <= api.settings.cache_ttl_dashboard
    assert second.headers["cache-control"].startswith("private")
    timing = second.headers["server-timing"]
    assert all(f"{part};dur=" in timing for part in ("cache", "db", "total"))


@pytest.mark.parametrize("report", ["dashboard", "bookings", "professionals"])
async def test_each_report_uses_its_own_ttl(api: Api, data: dict[str, int], report: str) -> None:
    await api.report(report, salon_id=data["lisbon"])
    [key] = entry_keys(api.settings.redis_url)
    assert f":{report}:" in key
    ttl = redis_client(api.settings.redis_url).ttl(key)
    expected = api.settings.cache_ttl(report) + api.settings.cache_stale_grace
    assert expected - 5 <= ttl <= expected


async def test_equivalent_spellings_share_one_entry(
    api: Api, data: dict[str, int], sql: SqlCounter
) -> None:
    salon = data["lisbon"]
    today = datetime.now(UTC).astimezone().date()
    body = (await api.report("bookings", salon_id=salon)).json()
    start, end = body["meta"]["start"], body["meta"]["end"]
    spellings = [
        f"{PREFIX}/bookings?salon_id={salon}",
        f"{PREFIX}/bookings?end={end}&salon_id={salon}&start={start}",
        f"{PREFIX}/bookings?granularity=day&start={start}&end={end}&salon_id={salon}",
        f"{PREFIX}/bookings?salon_id=0{salon}&start={start}&end={end}&unknown=1",
    ]
    for url in spellings:
        response = await api.get(url, api.token())
        assert response.status_code == 200, response.text
        assert response.headers["x-cache"] == "HIT", url
    assert sql.count == 1
    assert len(entry_keys(api.settings.redis_url)) == 1
    assert today  # the default period is the salon's, checked by the HIT above


async def test_tenants_and_roles_never_share_an_entry(api: Api, data: dict[str, int]) -> None:
    lisbon, newyork = data["lisbon"], data["newyork"]
    start, end = "2026-01-01", "2026-12-31"
    askers = [
        (api.token("owner", [lisbon]), lisbon),
        (api.token("owner", [newyork]), newyork),
        (api.token("owner", [lisbon, newyork]), lisbon),
        (api.token("admin"), lisbon),
        (api.token("admin"), None),
    ]
    bodies = []
    for token, salon in askers:
        params: dict[str, Any] = {"start": start, "end": end}
        if salon is not None:
            params["salon_id"] = salon
        response = await api.report("dashboard", token, **params)
        assert response.status_code == 200
        bodies.append(response.json())
        assert response.json()["meta"]["salon_id"] == salon
    # owners of the same salon may share; owner vs admin and salon vs salon never do
    assert bodies[0]["bookings_total"] == 4
    assert bodies[1]["bookings_total"] == 2
    assert bodies[4]["bookings_total"] == 6
    keys = entry_keys(api.settings.redis_url)
    assert len(keys) == 4
    assert sum(f"{{s:{lisbon}}}" in key for key in keys) == 2
    assert sum(f"{{s:{newyork}}}" in key for key in keys) == 1
    assert sum("{p:" in key for key in keys) == 1


async def _wait_for(predicate: Any, timeout: float = 1.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if await predicate():
            return time.monotonic() - started
        await asyncio.sleep(0.02)
    raise AssertionError(f"not true within {timeout} s")


@pytest.mark.parametrize("change", ["insert", "update", "delete"])
async def test_a_booking_change_from_any_writer_invalidates_within_a_second(
    api: Api, data: dict[str, int], db: psycopg.Connection, change: str
) -> None:
    salon = data["lisbon"]
    before = (await api.report("dashboard", salon_id=salon)).json()
    platform_before = (await api.report("dashboard")).json()
    assert (await api.report("dashboard", salon_id=salon)).headers["x-cache"] == "HIT"
    other = (await api.report("dashboard", salon_id=data["newyork"])).json()

    if change == "insert":
        add_booking(
            db,
            salon_id=salon,
            client_id=data["bob"],
            professional_id=data["pro_lisbon"],
            service_id=data["cut"],
            scheduled_at=datetime.now(UTC) - timedelta(hours=1),
            status="completed",
            price_cents=4000,
        )
        expected = before["revenue_cents"] + 4000
    elif change == "update":
        db.execute(
            "UPDATE bookings SET price_cents = 5000 WHERE salon_id = %s"
            " AND status = 'completed' AND id = (SELECT min(id) FROM bookings"
            " WHERE salon_id = %s AND status = 'completed')",
            (salon, salon),
        )
        expected = before["revenue_cents"] + 2000
    else:
        db.execute(
            "DELETE FROM bookings WHERE id = (SELECT min(id) FROM bookings"
            " WHERE salon_id = %s AND status = 'completed')",
            (salon,),
        )
        expected = before["revenue_cents"] - 3000

    async def fresh() -> bool:
        body = (await api.report("dashboard", salon_id=salon)).json()
        return bool(body["revenue_cents"] == expected)

    await _wait_for(fresh, timeout=1.0)
    platform = (await api.report("dashboard")).json()
    assert platform["revenue_cents"] == platform_before["revenue_cents"] + (
        expected - before["revenue_cents"]
    )
    # the other salon's entry was left alone
    response = await api.report("dashboard", salon_id=data["newyork"])
    assert response.headers["x-cache"] == "HIT"
    assert response.json() == other


async def test_a_dropped_listener_never_leaves_stale_data_served(
    api: Api, data: dict[str, int], db: psycopg.Connection
) -> None:
    salon = data["lisbon"]
    await settled(api)
    before = (await api.report("dashboard", salon_id=salon)).json()
    assert (await api.report("dashboard", salon_id=salon)).headers["x-cache"] == "HIT"
    listener = api.resources.listener
    assert listener is not None
    listener.retry_delay = 1.0
    await listener.drop_connection()

    async def noticed() -> bool:
        return not api.resources.cache.listener_healthy

    await _wait_for(noticed, timeout=2.0)
    # written while nobody listens: this notification is lost
    db.execute(
        "UPDATE bookings SET price_cents = price_cents + 100 WHERE salon_id = %s"
        " AND status = 'completed'",
        (salon,),
    )
    expected = before["revenue_cents"] + 100 * before["by_status"]["completed"]
    response = await api.report("dashboard", salon_id=salon)
    assert response.headers["x-cache"] == "BYPASS"
    assert response.json()["revenue_cents"] == expected
    await asyncio.wait_for(listener.connected.wait(), 5)
    assert listener.reconnects == 1
    # everything cached before the cut was dropped on reconnecting
    for _ in range(3):
        response = await api.report("dashboard", salon_id=salon)
        assert response.json()["revenue_cents"] == expected
    assert response.headers["x-cache"] == "HIT"


async def test_200_concurrent_cold_requests_run_the_sql_once(
    api: Api, data: dict[str, int], sql: SqlCounter
) -> None:
    token = api.token()
    responses = await asyncio.gather(
        *[api.report("professionals", token, salon_id=data["lisbon"]) for _ in range(200)]
    )
    assert {r.status_code for r in responses} == {200}
    assert len({r.content for r in responses}) == 1
    assert sql.count == 1


async def test_cold_requests_across_workers_run_the_sql_once(
    base_settings: Settings, database_url: str, data: dict[str, int], redis_url: str
) -> None:
    settings = app_settings(base_settings, database_url, redis_url)
    async with RunningApi(settings) as one, RunningApi(settings) as two:
        await settled(one)
        await settled(two)
        counters = [SqlCounter(one), SqlCounter(two)]
        token = one.token()
        responses = await asyncio.gather(
            *[
                worker.report("bookings", token, salon_id=data["lisbon"], granularity="week")
                for _ in range(50)
                for worker in (one, two)
            ]
        )
        assert {r.status_code for r in responses} == {200}
        assert len({r.content for r in responses}) == 1
        assert sum(c.count for c in counters) == 1
        for counter in counters:
            counter.close()


async def test_a_crashed_lock_holder_blocks_no_longer_than_its_lease(
    base_settings: Settings, database_url: str, data: dict[str, int], redis_url: str
) -> None:
    settings = app_settings(
        base_settings, database_url, redis_url, cache_lock_lease=1.0, cache_local_entries=0
    )
    async with RunningApi(settings) as api:
        await api.report("dashboard", salon_id=data["lisbon"])
        [key] = entry_keys(redis_url)
        client = redis_client(redis_url)
        client.delete(key)
        client.set(f"{key}:lock", "crashed-holder", px=1000)  # a holder that will never finish
        started = time.monotonic()
        response = await api.report("dashboard", salon_id=data["lisbon"])
        waited = time.monotonic() - started
        assert response.status_code == 200
        assert response.headers["x-cache"] == "MISS"
        assert waited < 3.0


@pytest.mark.single_redis(
    "it kills and restarts a private single Redis;"
    " on a cluster, a killed master: tests/test_redis_cluster.py, tests/chaos/test_redis_faults.py"
)
async def test_redis_killed_mid_test_then_back(
    base_settings: Settings, database_url: str, data: dict[str, int], db: psycopg.Connection
) -> None:
    with redis_process() as server:
        settings = app_settings(base_settings, database_url, server.url, redis_breaker_cooldown=0.5)
        async with RunningApi(settings) as api:
            salon = data["lisbon"]
            expected = (await api.report("dashboard", salon_id=salon)).json()
            assert (await api.report("dashboard", salon_id=salon)).headers["x-cache"] == "HIT"
            other = (await api.report("bookings", salon_id=salon)).json()
            server.kill()
            api.resources.cache.local.drop()  # only Redis is being tested here
            for _ in range(15):
                for report, body in (("dashboard", expected), ("bookings", other)):
                    response = await api.report(report, salon_id=salon)
                    assert response.status_code == 200
                    assert response.headers["x-cache"] == "BYPASS"
                    assert response.json() == body
            assert api.resources.cache.breaker.is_open
            server.start()  # an empty Redis on the same port

            async def hits_again() -> bool:
                await api.report("dashboard", salon_id=salon)
                response = await api.report("dashboard", salon_id=salon)
                return response.headers["x-cache"] == "HIT"

            await _wait_for(hits_again, timeout=5.0)
            assert (await api.report("dashboard", salon_id=salon)).json() == expected


async def test_redis_disabled_still_answers(
    base_settings: Settings, database_url: str, data: dict[str, int]
) -> None:
    settings = app_settings(base_settings, database_url, "")
    async with RunningApi(settings) as api:
        response = await api.report("dashboard", salon_id=data["lisbon"])
        assert response.status_code == 200
        assert response.headers["x-cache"] == "BYPASS"
        assert (await api.get("/readyz")).json()["redis"] == "disabled"


async def _clear(api: Api, **body: Any) -> int:
    response = await api.http.post(
        f"{PREFIX}/cache/clear", json=body, headers={"Authorization": f"Bearer {api.token()}"}
    )
    assert response.status_code == 200, response.text
    return int(response.json()["deleted"])


async def _fill(api: Api, data: dict[str, int]) -> None:
    for report in ("dashboard", "bookings", "professionals"):
        for salon in (data["lisbon"], data["newyork"], None):
            params = {} if salon is None else {"salon_id": salon}
            assert (await api.report(report, **params)).status_code == 200


async def test_cache_clear_by_scope_deletes_exactly_that_scope(
    api: Api, data: dict[str, int]
) -> None:
    url = api.settings.redis_url
    await _fill(api, data)
    assert len(entry_keys(url)) == 9
    assert await _clear(api, report="bookings", salon_id=data["lisbon"]) == 1
    remaining = entry_keys(url)
    assert len(remaining) == 8
    assert not any(":bookings:" in k and f"{{s:{data['lisbon']}}}" in k for k in remaining)
    assert await _clear(api, salon_id=data["newyork"]) == 3
    assert not any(f"{{s:{data['newyork']}}}" in k for k in entry_keys(url))
    assert await _clear(api, report="dashboard") == 2
    assert not any(":dashboard:" in k for k in entry_keys(url))
    assert await _clear(api) == 3
    assert entry_keys(url) == []


async def test_cache_clear_rejects_anything_but_its_fields(api: Api) -> None:
    response = await api.http.post(
        f"{PREFIX}/cache/clear",
        json={"pattern": "*"},
        headers={"Authorization": f"Bearer {api.token()}"},
    )
    assert response.status_code == 422
    response = await api.http.post(
        f"{PREFIX}/cache/clear",
        json={"report": "sr:*"},
        headers={"Authorization": f"Bearer {api.token()}"},
    )
    assert response.status_code == 422


async def test_etag_round_trip(api: Api, data: dict[str, int]) -> None:
    first = await api.report("dashboard", salon_id=data["lisbon"])
    etag = first.headers["etag"]
    assert etag.startswith('"')
    assert not etag.startswith("W/")
    again = await api.get(
        f"{PREFIX}/dashboard",
        api.token(),
        params={"salon_id": data["lisbon"]},
        headers={"If-None-Match": etag},
    )
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["etag"] == etag
    other = await api.get(
        f"{PREFIX}/dashboard",
        api.token(),
        params={"salon_id": data["lisbon"]},
        headers={"If-None-Match": '"something-else"'},
    )
    assert other.status_code == 200
    # same bytes, same ETag, in another process with an empty cache
    await _clear(api)
    recomputed = await api.report("dashboard", salon_id=data["lisbon"])
    assert recomputed.headers["x-cache"] == "MISS"
    assert recomputed.headers["etag"] == etag


async def test_stale_entries_are_served_while_one_refresh_runs(
    base_settings: Settings, database_url: str, data: dict[str, int], redis_url: str
) -> None:
    settings = app_settings(
        base_settings, database_url, redis_url, cache_ttl_dashboard=1, cache_stale_grace=30
    )
    async with RunningApi(settings) as api:
        await settled(api)
        counter = SqlCounter(api)
        salon = data["lisbon"]
        await api.report("dashboard", salon_id=salon)
        await asyncio.sleep(1.1)
        stale = await asyncio.gather(*[api.report("dashboard", salon_id=salon) for _ in range(20)])
        # served at once from the stale entry; once the refresh lands, as hits
        served = [r.headers["x-cache"] for r in stale]
        assert "STALE" in served
        assert set(served) <= {"STALE", "HIT"}
        assert {r.headers["cache-control"] for r in stale if r.headers["x-cache"] == "STALE"} == {
            "private, max-age=0"
        }

        async def refreshed() -> bool:
            response = await api.report("dashboard", salon_id=salon)
            return response.headers["x-cache"] == "HIT"

        await _wait_for(refreshed, timeout=2.0)
        assert counter.count == 2  # the first fill and exactly one background refresh
        counter.close()


async def test_a_stale_entry_beats_a_503_when_the_database_is_down(
    base_settings: Settings, database_url: str, data: dict[str, int], redis_url: str
) -> None:
    from service.db import async_engine, with_database

    settings = app_settings(
        base_settings, database_url, redis_url, cache_ttl_dashboard=1, cache_stale_grace=30
    )
    async with RunningApi(settings) as api:
        salon = data["lisbon"]
        fresh = await api.report("dashboard", salon_id=salon)
        await asyncio.sleep(1.1)
        reports = api.resources.reports
        healthy = reports.engine
        # a database that refuses connections
        dead_url = with_database(database_url, database_url.rsplit("/", 1)[1]).replace(
            f":{healthy.url.port}/", ":1/"
        )
        reports.engine = async_engine(dead_url, pool_timeout=0.5)
        try:
            stale = await api.report("dashboard", salon_id=salon)
            assert stale.status_code == 200
            assert stale.headers["x-cache"] == "STALE"
            assert stale.content == fresh.content
            cold = await api.report("bookings", salon_id=salon)
            assert cold.status_code == 503
            assert cold.json()["error"]["code"] == "database_unavailable"
            assert cold.headers["retry-after"].isdigit()
        finally:
            await reports.engine.dispose()
            reports.engine = healthy


async def test_an_admin_clear_on_one_worker_empties_every_local_tier(
    base_settings: Settings, database_url: str, data: dict[str, int], redis_url: str
) -> None:
    settings = app_settings(base_settings, database_url, redis_url)
    async with RunningApi(settings) as one, RunningApi(settings) as two:
        await settled(one)
        await settled(two)
        salon = data["lisbon"]
        await one.report("dashboard", salon_id=salon)
        assert (await two.report("dashboard", salon_id=salon)).headers["x-cache"] == "HIT"
        assert len(two.resources.cache.local) == 1
        assert await _clear(one, salon_id=salon) == 1

        async def dropped() -> bool:
            return len(two.resources.cache.local) == 0

        await _wait_for(dropped, timeout=1.0)
        assert (await two.report("dashboard", salon_id=salon)).headers["x-cache"] == "MISS"


async def test_the_local_tier_serves_without_redis_round_trips(
    api: Api, data: dict[str, int]
) -> None:
    salon = data["lisbon"]
    await api.report("dashboard", salon_id=salon)
    client = redis_client(api.settings.redis_url)
    before = int(client.info("stats")["total_commands_processed"])
    for _ in range(20):
        assert (await api.report("dashboard", salon_id=salon)).headers["x-cache"] == "HIT"
    after = int(client.info("stats")["total_commands_processed"])
    # the INFO call itself and the stats publisher may run; 20 GETs would show
    assert after - before < 10


@pytest.mark.single_redis(
    "it kills a private single Redis to open the breaker;"
    " on a cluster: tests/chaos/test_redis_faults.py"
)
async def test_the_breaker_closes_again_while_the_local_tier_answers(
    base_settings: Settings, database_url: str, data: dict[str, int]
) -> None:
    with redis_process() as server:
        settings = app_settings(base_settings, database_url, server.url, redis_breaker_cooldown=0.3)
        async with RunningApi(settings) as api:
            await settled(api)
            salon = data["lisbon"]
            await api.report("dashboard", salon_id=salon)  # now in the local tier
            server.kill()
            for _ in range(4):  # misses that need Redis: the breaker opens
                response = await api.report("bookings", salon_id=salon)
                assert response.headers["x-cache"] == "BYPASS"
            assert api.resources.cache.breaker.is_open
            server.start()
            await asyncio.sleep(0.4)  # past the cooldown: the next Redis call is the probe
            local = await api.report("dashboard", salon_id=salon)
            assert local.headers["x-cache"] == "HIT"  # answered locally, no probe spent

            async def bookings_cached_again() -> bool:
                response = await api.report("bookings", salon_id=salon)
                return response.headers["x-cache"] in ("MISS", "HIT")

            await _wait_for(bookings_cached_again, timeout=3.0)
            assert not api.resources.cache.breaker.is_open


# -- every table a report reads invalidates it (issue 15, item 5) ------------------------------


def _names(items: list[dict[str, Any]], field: str) -> list[str]:
    return sorted(str(item[field]) for item in items)


# change -> (report, what of the body it changes, SQL, expected before/after per scope)
TABLE_CHANGES: dict[str, tuple[str, Any, str, dict[str, tuple[Any, Any]]]] = {
    "service renamed": (
        "dashboard",
        lambda body: _names(body["top_services"], "name"),
        "UPDATE services SET name = 'Cut & Style' WHERE id = %(cut)s",
        {
            "lisbon": (["Cut"], ["Cut & Style"]),
            "platform": (["Cut", "Manicure"], ["Cut & Style", "Manicure"]),
        },
    ),
    "service category changed": (
        "bookings",
        lambda body: _names(body["by_category"], "category"),
        "UPDATE services SET category = 'styling' WHERE id = %(cut)s",
        {
            "lisbon": (["hair"], ["styling"]),
            "platform": (["hair", "nails"], ["nails", "styling"]),
        },
    ),
    "professional renamed": (
        "professionals",
        lambda body: _names(body["items"], "name"),
        "UPDATE professionals SET name = 'Ana Maria' WHERE id = %(pro_lisbon)s",
        {
            "lisbon": (["Ana", "Idle"], ["Ana Maria", "Idle"]),
            "platform": (["Ana", "Idle", "Nia"], ["Ana Maria", "Idle", "Nia"]),
        },
    ),
    "professional deactivated": (
        "professionals",
        lambda body: _names(body["items"], "name"),
        "UPDATE professionals SET is_active = false WHERE id = %(idle)s",
        {
            "lisbon": (["Ana", "Idle"], ["Ana"]),
            "platform": (["Ana", "Idle", "Nia"], ["Ana", "Nia"]),
        },
    ),
    "salon time zone changed": (
        "dashboard",
        lambda body: body["meta"]["timezone"],
        "UPDATE salons SET timezone = 'Asia/Tokyo' WHERE id = %(lisbon)s",
        {"lisbon": ("Europe/Lisbon", "Asia/Tokyo")},  # platform-wide reports are in UTC
    ),
}


@pytest.mark.parametrize("change", list(TABLE_CHANGES))
async def test_a_change_to_any_table_a_report_reads_invalidates_it(
    api: Api, data: dict[str, int], db: psycopg.Connection, change: str
) -> None:
    """Services, professionals and salons invalidate like bookings: through the change
    stream, the salon's cached reports and the platform-wide ones (the salon's time zone,
    looked up once a minute at most, with them)."""
    report, view, statement, expected = TABLE_CHANGES[change]
    idle = add_professional(db, data["lisbon"], "Idle")  # no bookings: shown while active
    await settled(api)
    scopes = {"lisbon": {"salon_id": data["lisbon"]}, "platform": {}}
    for scope, (before, _) in expected.items():
        await api.report(report, **scopes[scope])
        cached = await api.report(report, **scopes[scope])
        assert cached.headers["x-cache"] == "HIT"
        assert view(cached.json()) == before, scope
    db.execute(statement, {**data, "idle": idle})
    await settled(api)
    for scope, (_, after) in expected.items():
        response = await api.report(report, **scopes[scope])
        assert response.headers["x-cache"] == "MISS", scope
        assert view(response.json()) == after, scope


# -- HTTP caching (issue 15, item 6) ---------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        "{etag}",
        "W/{etag}",  # what a proxy that compresses makes of it (nginx gzip)
        '"something-else", {etag}',
        '"something-else",W/{etag}',
        '  {etag} ,\t"x"',
        "*",
    ],
)
async def test_if_none_match_uses_the_weak_comparison(
    api: Api, data: dict[str, int], header: str
) -> None:
    """RFC 9110 section 13.1.2: If-None-Match compares weakly, takes a list, and "*"."""
    first = await api.report("dashboard", salon_id=data["lisbon"])
    etag = first.headers["etag"]
    response = await api.get(
        f"{PREFIX}/dashboard",
        api.token(),
        params={"salon_id": data["lisbon"]},
        headers={"If-None-Match": header.format(etag=etag)},
    )
    assert response.status_code == 304
    assert response.headers["etag"] == etag


@pytest.mark.parametrize("header", ['W/"something-else"', '"something-else", W/"other"', "W/"])
async def test_if_none_match_with_other_tags_gets_the_body(
    api: Api, data: dict[str, int], header: str
) -> None:
    response = await api.get(
        f"{PREFIX}/dashboard",
        api.token(),
        params={"salon_id": data["lisbon"]},
        headers={"If-None-Match": header},
    )
    assert response.status_code == 200
    assert response.json()["meta"]["salon_id"] == data["lisbon"]


@pytest.mark.parametrize("report", ["dashboard", "bookings", "professionals", "realtime"])
async def test_report_responses_vary_by_authorization(
    api: Api, data: dict[str, int], report: str
) -> None:
    """A private response depends on who asks: a browser shared by an admin and an owner must
    not answer one's request with the other's copy."""
    response = await api.report(report, salon_id=data["lisbon"])
    assert response.status_code == 200
    assert "authorization" in response.headers["vary"].lower()
    again = await api.get(
        f"{PREFIX}/{report}",
        api.token(),
        params={"salon_id": data["lisbon"]},
        headers={"If-None-Match": response.headers["etag"]},
    )
    if again.status_code == 304:  # realtime's body changes with the second of `as_of`
        assert "authorization" in again.headers["vary"].lower()


async def test_each_invalidation_waits_for_a_replica_where_there_is_one(
    api: Api, data: dict[str, int], db: psycopg.Connection
) -> None:
    """After a change's invalidation the service WAITs for a replica of each node written:
    acknowledged on the test Redis Cluster (a replica per master), not waited on for the
    single test Redis (no replica); either way counted in the metric's counts."""
    waits = api.resources.telemetry.instruments.replica_waits
    before = dict(waits)
    add_booking(
        db,
        salon_id=data["lisbon"],
        client_id=data["bob"],
        professional_id=data["pro_lisbon"],
        service_id=data["cut"],
        scheduled_at=datetime.now(UTC) - timedelta(hours=1),
    )
    await settled(api)
    grown = {outcome: waits[outcome] - before.get(outcome, 0) for outcome in waits}
    if api.settings.redis_cluster:
        # One WAIT per master written (the salon's slot and the platform's twelve); a WAIT
        # past its 100 ms on a loaded machine counts as a timeout.
        assert grown.get("acknowledged", 0) + grown.get("timeout", 0) >= 3, grown
        assert grown.get("no_replica", 0) == 0, grown
    else:
        assert grown.get("no_replica", 0) >= 1, grown
        assert grown.get("acknowledged", 0) == grown.get("timeout", 0) == 0, grown
