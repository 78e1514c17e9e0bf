"""``REPORTS_READ_DATABASE_URL`` on a real streaming replica of the test server.

``make test`` starts the replica (``REPLICA=1 scripts/services.sh start``: ``pg_basebackup``,
a physical slot, hot standby) and writes its URL into ``.env`` as ``REPLICA_DATABASE_URL``.
Report queries go to the replica, everything else to the primary; a report is read on the
replica only when it has replayed every fold of the change stream committed before the read
began, otherwise on the primary (``service.reports.replica``), so a lagging replica's answer
is never cached as current.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg
import pytest
import redis
from dotenv import dotenv_values

from service.cache import NAMESPACE, CacheEntry
from service.config import Settings
from service.db import libpq_url, with_database
from service.reports import replica as replica_gate
from tests.conftest import Api, RunningApi, app_settings

WAIT_SECONDS = 30.0


def _replica_server_url() -> str | None:
    return os.environ.get("REPLICA_DATABASE_URL") or dotenv_values(".env").get(
        "REPLICA_DATABASE_URL"
    )


async def _wait_replayed(primary_dsn: str, replica_dsn: str) -> None:
    """Wait until the replica has replayed everything the primary wrote before this call."""
    with psycopg.connect(primary_dsn, autocommit=True) as primary:
        row = primary.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert row is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_SECONDS
    with psycopg.connect(replica_dsn, autocommit=True) as replica:
        while True:
            done = replica.execute(
                "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (row[0],)
            ).fetchone()
            if done is not None and done[0]:
                return
            assert loop.time() < deadline, "the replica did not catch up"
            await asyncio.sleep(0.02)


@pytest.fixture
def replica_dsn(database_url: str, clean_db: str) -> Iterator[str]:
    """libpq DSN of the test database on the replica (replay resumed afterwards)."""
    server = _replica_server_url()
    if not server:
        pytest.skip("no streaming replica: start one with `make services REPLICA=1`")
    url = with_database(server, str(psycopg.conninfo.conninfo_to_dict(clean_db)["dbname"]))
    dsn = libpq_url(url)
    with psycopg.connect(dsn, autocommit=True) as replica:
        row = replica.execute("SELECT pg_is_in_recovery()").fetchone()
        assert row == (True,), "REPLICA_DATABASE_URL is not a standby"
    yield dsn
    with psycopg.connect(dsn, autocommit=True) as replica:
        replica.execute("SELECT pg_wal_replay_resume()")


@pytest.fixture
async def replica_api(
    base_settings: Settings, database_url: str, redis_url: str, replica_dsn: str
) -> AsyncIterator[Api]:
    read_url = with_database(
        str(_replica_server_url()),
        str(psycopg.conninfo.conninfo_to_dict(replica_dsn)["dbname"]),
    )
    settings = app_settings(base_settings, database_url, redis_url, read_database_url=read_url)
    async with RunningApi(settings) as api:
        yield api


def _salon_with_bookings(dsn: str, bookings: int) -> None:
    """Salon 1 with ``bookings`` completed bookings of 1,000 cents yesterday (UTC)."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("INSERT INTO salons (id, name, timezone) VALUES (1, 'One', 'UTC')")
        connection.execute("INSERT INTO users (id, role, email) VALUES (1, 'client', 'c@x.test')")
        connection.execute("INSERT INTO professionals (id, salon_id, name) VALUES (1, 1, 'P')")
        connection.execute(
            "INSERT INTO services (id, salon_id, category, name, price_cents, duration_min)"
            " VALUES (1, 1, 'hair', 'Cut', 1000, 30)"
        )
        _add_bookings(connection, bookings)


def _add_bookings(connection: psycopg.Connection, bookings: int) -> None:
    when = datetime.now(UTC) - timedelta(days=1)
    connection.execute(
        "INSERT INTO bookings (salon_id, client_id, professional_id, service_id,"
        " scheduled_at, status, price_cents)"
        " SELECT 1, 1, 1, 1, %s, 'completed', 1000 FROM generate_series(1, %s)",
        (when, bookings),
    )


async def _settle(api: Api) -> None:
    listener = api.resources.listener
    assert listener is not None
    await listener.settle()


def _cached_totals(redis_url: str) -> list[int]:
    """``bookings_total`` of every valid (current epoch) dashboard entry of salon 1 in Redis."""
    client = redis.Redis.from_url(redis_url)
    try:
        epoch = client.get(f"{NAMESPACE}:{{s:1}}:dashboard:epoch")
        totals = []
        for name in client.scan_iter(match=f"{NAMESPACE}:{{s:1}}:dashboard:*"):
            if name.endswith((b":epoch", b":lock")):
                continue
            entry = CacheEntry.valid(client.get(name), epoch)
            if entry is not None:
                totals.append(orjson.loads(entry.body)["bookings_total"])
        return totals
    finally:
        client.close()


async def test_reports_read_from_the_replica_and_the_rest_from_the_primary(
    replica_api: Api, clean_db: str, replica_dsn: str
) -> None:
    api = replica_api
    _salon_with_bookings(clean_db, bookings=2)
    await _settle(api)
    await _wait_replayed(clean_db, replica_dsn)
    reads = api.resources.reports.replica_reads
    for salon_id in (1, None):  # one salon, and platform-wide (the rollups)
        params = {} if salon_id is None else {"salon_id": salon_id}
        response = await api.report("dashboard", **params)
        assert response.status_code == 200, response.text
        assert response.json()["bookings_total"] == 2
        assert response.json()["revenue_cents"] == 2000
    assert reads.replica >= 2  # the salon's time zone, then both reports
    assert reads.primary_behind == reads.primary_conflict == 0

    # The report pool's connections are the replica's.
    with psycopg.connect(replica_dsn, autocommit=True) as replica:
        row = replica.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'salon-reports'"
        ).fetchone()
        assert row is not None
        assert row[0] >= 1

    # Both pools exist and are reported; readiness is about the primary.
    metrics = (await api.get("/metrics")).text
    assert 'pool_name="primary"' in metrics
    assert 'pool_name="read"' in metrics
    assert (await api.get("/readyz")).status_code == 200

    # A write on the primary reaches the replica by replication and the cache by the listener.
    assert (await api.report("dashboard", salon_id=1)).headers["X-Cache"] == "HIT"
    with psycopg.connect(clean_db, autocommit=True) as connection:
        connection.execute("UPDATE bookings SET status = 'cancelled' WHERE id = 1")
    await _settle(api)
    await _wait_replayed(clean_db, replica_dsn)
    again = await api.report("dashboard", salon_id=1)
    assert again.headers["X-Cache"] == "MISS"
    assert again.json()["by_status"]["cancelled"] == 1


async def test_a_lagging_replica_never_has_its_answers_cached(
    replica_api: Api, clean_db: str, replica_dsn: str, redis_url: str
) -> None:
    """Replay paused: every write on the primary is invalidated by the listener while the
    replica still holds the old figures. No answer served or cached may be the replica's;
    once replay resumes, the replica answers again, with the current figures."""
    api = replica_api
    reads = api.resources.reports.replica_reads
    _salon_with_bookings(clean_db, bookings=2)
    await _settle(api)
    await _wait_replayed(clean_db, replica_dsn)
    assert (await api.report("dashboard", salon_id=1)).json()["bookings_total"] == 2
    on_replica = reads.replica

    with psycopg.connect(replica_dsn, autocommit=True) as replica:
        replica.execute("SELECT pg_wal_replay_pause()")
        while replica.execute("SELECT pg_get_wal_replay_pause_state()").fetchone() != ("paused",):
            await asyncio.sleep(0.01)
    with psycopg.connect(clean_db, autocommit=True) as primary:
        for expected in range(3, 8):
            _add_bookings(primary, 1)
            await _settle(api)
            for _ in range(2):  # a miss, then what the cache holds
                response = await api.report("dashboard", salon_id=1)
                assert response.status_code == 200, response.text
                assert response.json()["bookings_total"] == expected
            assert response.headers["X-Cache"] == "HIT"
            assert _cached_totals(redis_url) == [expected]
            # The platform-wide report too (the rollups are derived on the primary).
            platform = await api.report("dashboard")
            assert platform.json()["bookings_total"] == expected
    assert reads.replica == on_replica  # the paused replica answered nothing
    assert reads.primary_behind >= 10

    with psycopg.connect(replica_dsn, autocommit=True) as replica:
        replica.execute("SELECT pg_wal_replay_resume()")
    await _wait_replayed(clean_db, replica_dsn)
    with psycopg.connect(clean_db, autocommit=True) as primary:
        _add_bookings(primary, 1)
    await _settle(api)
    await _wait_replayed(clean_db, replica_dsn)
    fresh = await api.report("dashboard", salon_id=1)
    assert fresh.headers["X-Cache"] == "MISS"
    assert fresh.json()["bookings_total"] == 8
    # The salon's time zone (forgotten at the change) and the report, both on the replica.
    assert reads.replica == on_replica + 2
    assert _cached_totals(redis_url) == [8]


async def test_a_recovery_conflict_is_retried_on_the_primary(
    replica_api: Api, clean_db: str, replica_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replay of a change that needs a lock the report's replica session holds ends that
    session (after ``max_standby_streaming_delay``): the report is answered by the primary."""
    api = replica_api
    service = api.resources.reports
    _salon_with_bookings(clean_db, bookings=2)
    await _settle(api)
    await _wait_replayed(clean_db, replica_dsn)
    await api.report("dashboard")  # the platform time zone needs no lookup; warm the pools

    with psycopg.connect(replica_dsn, autocommit=True) as replica:
        before = replica.execute(
            "SELECT confl_lock FROM pg_stat_database_conflicts WHERE datname = current_database()"
        ).fetchone()
    assert before is not None

    async def conflict() -> None:
        # The replica session has read change_stream_position (a lock on it, a snapshot):
        # an exclusive lock on the primary must wait for it on replay, then end it.
        with psycopg.connect(clean_db, autocommit=True) as primary, primary.transaction():
            primary.execute("LOCK TABLE change_stream_position IN ACCESS EXCLUSIVE MODE")
        with psycopg.connect(replica_dsn, autocommit=True) as replica:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + WAIT_SECONDS
            while True:
                row = replica.execute(
                    "SELECT confl_lock FROM pg_stat_database_conflicts"
                    " WHERE datname = current_database()"
                ).fetchone()
                if row is not None and row[0] > before[0]:
                    return
                assert loop.time() < deadline, "no recovery conflict happened"
                await asyncio.sleep(0.05)

    # The conflict happens between the position check and the report query, on the replica.
    checked = replica_gate.caught_up

    async def caught_up_then_conflict(connection: Any, mark: str | None) -> bool:
        if await checked(connection, mark):
            monkeypatch.setattr(replica_gate, "caught_up", checked)  # once
            await conflict()
            return True
        return False

    monkeypatch.setattr(replica_gate, "caught_up", caught_up_then_conflict)
    response = await api.report("dashboard", start="2020-01-01", end="2020-01-31")
    assert response.status_code == 200, response.text
    assert service.replica_reads.primary_conflict == 1
    assert response.json()["bookings_total"] == 0


async def test_a_replica_connection_lost_mid_read_is_retried_on_the_primary(
    replica_api: Api, clean_db: str, replica_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replica ends the report's session between the position check and the report query
    (under load a session ended for a recovery conflict often arrives only as "server closed
    the connection unexpectedly"): the report is answered by the primary, once."""
    api = replica_api
    service = api.resources.reports
    _salon_with_bookings(clean_db, bookings=2)
    await _settle(api)
    await _wait_replayed(clean_db, replica_dsn)
    await api.report("dashboard")  # warm the pools

    checked = replica_gate.caught_up

    async def caught_up_then_session_ended(connection: Any, mark: str | None) -> bool:
        if await checked(connection, mark):
            monkeypatch.setattr(replica_gate, "caught_up", checked)  # once
            raw = await connection.get_raw_connection()
            pid = raw.driver_connection.info.backend_pid
            with psycopg.connect(replica_dsn, autocommit=True) as replica:
                replica.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
            return True
        return False

    monkeypatch.setattr(replica_gate, "caught_up", caught_up_then_session_ended)
    response = await api.report("dashboard", start="2020-01-01", end="2020-01-31")
    assert response.status_code == 200, response.text
    assert service.replica_reads.primary_lost == 1
    assert service.replica_reads.primary_conflict == 0
    assert response.json()["bookings_total"] == 0
    # The pool has dropped the dead connection: the next report reads the replica again.
    replica_reads = service.replica_reads.replica
    assert (await api.report("dashboard", start="2020-02-01", end="2020-02-29")).status_code == 200
    assert service.replica_reads.replica == replica_reads + 1
