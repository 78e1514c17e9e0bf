"""The change stream's failure modes, each with the interleaving it guards against.

- The slot dropped under load (or invalidated, or the position restored from an old backup):
  noticed, reports answer 503 instead of figures that nothing keeps current (cached ones
  included), the metric says so, and ``rollups rebuild`` brings back exact tables while the
  writes go on.
- The consumer ``kill -9``-ed at random moments under writes, and restarted: nothing lost,
  nothing counted twice.
- The service stopped while writes go on, then started: it catches up, exact, and the
  freshness histogram shows the catch-up.
- Invalidation comes after the derived data: a report refilled while the fold is held back
  reads the old rollups and is cached; the notification that follows the fold drops it.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
from datetime import date
from typing import Any, ClassVar

import psycopg
import pytest

from service.changes.consumer import wait_applied
from service.changes.position import APPLY_LOCK, Position, State, read_position
from service.changes.rebuild import emit_marker, rebuild, rebuild_on
from service.changes.stream import Folder
from service.changes.verify import verify
from service.config import Settings
from tests.conftest import (
    Api,
    RunningApi,
    app_settings,
)

PLATFORM = {"start": "2026-01-01", "end": "2026-12-31"}


class Writer:
    """Inserts and moves bookings on its own thread until stopped; counts what it did."""

    def __init__(self, dsn: str, seed: int = 0) -> None:
        self.dsn = dsn
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.transactions = 0
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as connection:
                while not self.stop.is_set():
                    with connection.transaction():
                        connection.execute(
                            "INSERT INTO bookings (salon_id, client_id, professional_id,"
                            " service_id, scheduled_at, status, price_cents)"
                            " SELECT salon_id, client_id, professional_id, service_id,"
                            " scheduled_at + interval '5 hours', 'confirmed', price_cents"
                            " FROM bookings WHERE id = %s",
                            (self.rng.randint(1, 3_000),),
                        )
                        connection.execute(
                            "UPDATE bookings SET status = 'completed',"
                            " scheduled_at = scheduled_at + interval '1 day' WHERE id = %s",
                            (self.rng.randint(1, 3_000),),
                        )
                    self.transactions += 1
                    time.sleep(0.002)
        except BaseException as error:
            self.errors.append(error)

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)
        assert not self.errors, self.errors


async def _drop_slot(dsn: str) -> None:
    """What an operator (or max_slot_wal_keep_size) does to the stream: the slot is gone."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
        for _ in range(200):
            row = await (
                await connection.execute(
                    "SELECT slot_name, active_pid, pg_terminate_backend(active_pid)"
                    " FROM pg_replication_slots WHERE database = current_database()"
                )
            ).fetchone()
            assert row is not None
            if row[1] is None:
                try:
                    await connection.execute("SELECT pg_drop_replication_slot(%s)", (row[0],))
                    return
                except psycopg.errors.ObjectInUse:
                    pass  # the consumer reconnected in between
            await asyncio.sleep(0.01)
    raise AssertionError("could not drop the slot")


async def _until(predicate: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_a_dropped_slot_is_noticed_and_rebuild_brings_it_back_exact(
    base_settings: Settings, private: tuple[str, str], redis_url: str
) -> None:
    url, dsn = private
    async with RunningApi(app_settings(base_settings, url, redis_url)) as api:
        cached = await api.report("dashboard", **PLATFORM)
        assert cached.status_code == 200
        with Writer(dsn):
            await asyncio.sleep(0.5)
            await _drop_slot(dsn)

            async def noticed() -> bool:
                await api.resources.stream_monitor.poll()  # type: ignore[union-attr]
                return not api.resources.stream.current

            await _until(noticed)
            # Nothing current may be presented: not a fresh computation, not a cached one.
            for params in (PLATFORM, {**PLATFORM, "salon_id": 1}):
                response = await api.report("dashboard", **params)
                assert response.status_code == 503, response.text
                assert response.json()["error"]["code"] == "derived_data_unavailable"
                assert "rollups rebuild" in response.json()["error"]["message"]
                assert response.headers["retry-after"]
            assert _gauge((await api.get("/metrics")).text, "reports_change_stream_lost") == 1.0
            ready = await api.get("/readyz")
            assert ready.status_code == 503, ready.text

            await rebuild(dsn)  # while the writer goes on

            async def current() -> bool:
                await api.resources.stream_monitor.poll()  # type: ignore[union-attr]
                return api.resources.stream.current

            await _until(current)
            await asyncio.sleep(0.5)  # more writes, folded by the new stream
        await api.resources.listener.settle()  # type: ignore[union-attr]
        assert await verify(dsn, rounds=1) == []
        again = await api.report("dashboard", **PLATFORM)
        assert again.status_code == 200
        assert again.json()["bookings_total"] > cached.json()["bookings_total"]
        assert _gauge((await api.get("/metrics")).text, "reports_change_stream_lost") == 0.0


def _gauge(exposition: str, name: str) -> float:
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in exposition.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    ]
    assert values, name
    return max(values)


async def test_a_position_restored_from_an_old_backup_is_noticed(private: tuple[str, str]) -> None:
    _, dsn = private
    await wait_applied(dsn)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
        row = await (
            await connection.execute("SELECT applied_lsn::text FROM change_stream_position")
        ).fetchone()
        assert row is not None
        old = row[0]
        await connection.execute("UPDATE bookings SET status = 'cancelled' WHERE id < 50")
        await wait_applied(dsn)
        # the derived tables and their position, as an old backup holds them
        await connection.execute(
            "UPDATE change_stream_position SET applied_lsn = %s::pg_lsn", (old,)
        )
        with pytest.raises(RuntimeError, match="ahead of the recorded position"):
            await wait_applied(dsn, timeout=10)
    await rebuild(dsn)
    await wait_applied(dsn)
    assert await verify(dsn, rounds=1) == []


def test_an_invalidated_slot_means_lost() -> None:
    """``max_slot_wal_keep_size`` invalidates a slot (``wal_status = lost``): that is a loss."""
    position = Position(State.CURRENT, None, "s", "0/10", None, True, "0/10", "lost", 16, 16)
    reason = position.loss()
    assert reason is not None
    assert "max_slot_wal_keep_size" in reason
    assert (
        Position(State.CURRENT, None, "s", "0/10", None, True, "0/8", "reserved", 16, 8).loss()
        is None
    )


def _follower(url: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DATABASE_URL": url, "REPORTS_ENVIRONMENT": "test"}
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "follow"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def test_a_consumer_killed_mid_batch_loses_and_doubles_nothing(
    private: tuple[str, str],
) -> None:
    url, dsn = private
    await wait_applied(dsn)
    rng = random.Random(7)
    follower = _follower(url)
    kills = 0
    try:
        with Writer(dsn, seed=1), Writer(dsn, seed=2), Writer(dsn, seed=3):
            for _ in range(5):
                await asyncio.sleep(rng.uniform(0.3, 1.0))
                follower.send_signal(signal.SIGKILL)  # whatever it was doing
                follower.wait(5)
                kills += 1
                follower = _follower(url)
            await asyncio.sleep(0.5)
        await wait_applied(dsn, timeout=60)
    finally:
        follower.send_signal(signal.SIGKILL)
        follower.wait(5)
    assert kills == 5
    assert await verify(dsn, rounds=1) == []


async def test_the_service_catches_up_after_being_down(
    base_settings: Settings, private: tuple[str, str], redis_url: str
) -> None:
    url, dsn = private
    settings = app_settings(base_settings, url, redis_url)
    async with RunningApi(settings) as api:
        await api.report("dashboard", **PLATFORM)
    with Writer(dsn) as writer:  # nobody folds meanwhile
        await asyncio.sleep(2.5)
    assert writer.transactions > 50
    async with RunningApi(settings) as api:  # its start waits for the catch-up
        await api.resources.listener.settle()  # type: ignore[union-attr]
        assert await verify(dsn, rounds=1) == []
        body = (await api.report("dashboard", **PLATFORM)).json()
        with psycopg.connect(dsn) as connection:
            row = connection.execute(
                "SELECT count(*) FROM bookings WHERE scheduled_at >= '2026-01-01'"
                " AND scheduled_at < '2027-01-01'"
            ).fetchone()
        assert row is not None
        assert body["bookings_total"] == row[0]
        # The catch-up shows: writes applied more than a second after their commit.
        metrics = (await api.get("/metrics")).text
        within_1s = _bucket(metrics, "1.0")
        total = _bucket(metrics, "+Inf")
        assert total >= writer.transactions
        assert total - within_1s > 0, (within_1s, total)
        response = await api.get("/api/v1/optimized-reports/performance/stats", api.token("ops"))
        assert response.status_code == 200, response.text
        stats = response.json()
        assert stats["freshness"]["since_start"]["max_s"] > 1.0


def _bucket(exposition: str, le: str) -> float:
    total = 0.0
    for line in exposition.splitlines():
        if line.startswith("reports_freshness_lag_seconds_bucket{") and f'le="{le}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_a_refill_from_old_rollups_is_dropped_once_the_fold_commits(
    api: Api, db: psycopg.Connection, clean_db: str
) -> None:
    """Hold the fold back (the apply lock), write, refill the platform dashboard from the old
    rollups (it is cached), let the fold go: its notification drops the stale entry."""
    salon = db.execute("INSERT INTO salons (name) VALUES ('S') RETURNING id").fetchone()[0]
    client = db.execute(
        "INSERT INTO users (role, email) VALUES ('client', 'c@example.test') RETURNING id"
    ).fetchone()[0]
    pro = db.execute(
        "INSERT INTO professionals (salon_id, name) VALUES (%s, 'P') RETURNING id", (salon,)
    ).fetchone()[0]
    service = db.execute(
        "INSERT INTO services (salon_id, category, name, price_cents, duration_min)"
        " VALUES (%s, 'hair', 'Cut', 1000, 30) RETURNING id",
        (salon,),
    ).fetchone()[0]

    def book() -> None:
        db.execute(
            "INSERT INTO bookings (salon_id, client_id, professional_id, service_id,"
            " scheduled_at, status, price_cents)"
            " VALUES (%s, %s, %s, %s, '2026-03-03 10:00+00', 'completed', 1000)",
            (salon, client, pro, service),
        )

    book()
    await api.resources.listener.settle()  # type: ignore[union-attr]
    params = {"start": date(2026, 3, 1).isoformat(), "end": date(2026, 3, 31).isoformat()}
    with psycopg.connect(clean_db, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s, %s)", APPLY_LOCK)
        book()
        await asyncio.sleep(0.3)  # the change reached the consumer, which waits for the lock
        stale = await api.report("dashboard", **params)
        assert stale.headers["x-cache"] == "MISS"
        assert stale.json()["bookings_total"] == 1  # the rollups do not have it yet
        assert (await api.report("dashboard", **params)).headers["x-cache"] == "HIT"
        holder.execute("SELECT pg_advisory_unlock(%s, %s)", APPLY_LOCK)
    await api.resources.listener.settle()  # type: ignore[union-attr]
    fresh = await api.report("dashboard", **params)
    assert fresh.json()["bookings_total"] == 2, fresh.headers["x-cache"]


async def test_one_worker_folds_and_another_takes_over_when_it_stops(
    base_settings: Settings, private: tuple[str, str], redis_url: str
) -> None:
    """Two workers: exactly one holds the election; when it goes, the other folds."""
    url, dsn = private
    settings = app_settings(base_settings, url, redis_url)
    workers = [RunningApi(settings), RunningApi(settings)]
    apis = [await workers[0].__aenter__(), await workers[1].__aenter__()]
    running = [True, True]
    try:
        consumers = [api.resources.consumer for api in apis]
        assert all(consumer is not None for consumer in consumers)

        async def one_leads() -> bool:
            return sum(c.leading.is_set() for c in consumers) == 1  # type: ignore[union-attr]

        await _until(one_leads)
        await asyncio.sleep(1.5)  # both have tried the election again meanwhile
        assert await one_leads()
        leader = next(i for i, c in enumerate(consumers) if c.leading.is_set())  # type: ignore[union-attr]
        other = 1 - leader
        await workers[leader].__aexit__(None, None, None)  # the leading worker goes away
        running[leader] = False
        with Writer(dsn):
            await asyncio.wait_for(consumers[other].leading.wait(), 10)  # type: ignore[union-attr]
            await asyncio.sleep(0.5)
        await apis[other].resources.listener.settle()  # type: ignore[union-attr]
        assert consumers[other].batches > 0  # type: ignore[union-attr]
        assert await verify(dsn, rounds=1) == []
    finally:
        for worker, up in zip(workers, running, strict=True):
            if up:
                await worker.__aexit__(None, None, None)


async def test_a_rebuild_counts_each_concurrent_write_once(private: tuple[str, str]) -> None:
    """The rebuild's handoff, with its two interleavings forced by the hook: a write committed
    after the new slot exists but before the snapshot is in both (the stream must skip it), and
    a write still open at the snapshot is in neither until it commits (the stream must fold it).
    Without the skip the first one would count twice."""
    _, dsn = private
    await wait_applied(dsn)
    async with (
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as both,
        await psycopg.AsyncConnection.connect(dsn) as open_at_snapshot,
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as rebuilder,
    ):
        copy_one = (
            "INSERT INTO bookings (salon_id, client_id, professional_id, service_id,"
            " scheduled_at, status, price_cents) SELECT salon_id, client_id, professional_id,"
            " service_id, scheduled_at + interval '3 days', 'completed', 1234"
            " FROM bookings WHERE id = %s"
        )

        async def in_the_window() -> None:
            await both.execute(copy_one, (10,))  # committed: seen by the snapshot and the slot
            await open_at_snapshot.execute(copy_one, (20,))  # not committed yet

        await rebuild_on(rebuilder, slot_created=in_the_window)
        await open_at_snapshot.commit()
    await wait_applied(dsn)
    assert await verify(dsn, rounds=1) == []
    with psycopg.connect(dsn) as connection:
        row = connection.execute(
            "SELECT count(*) FROM bookings WHERE price_cents = 1234"
        ).fetchone()
    assert row == (2,)


class _HookedConnection(psycopg.AsyncConnection[Any]):
    """The fold's connection, with a test hook run before the first statement that contains
    a given text."""

    hooks: ClassVar[list[tuple[str, Any]]] = []

    async def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        text = str(query)
        for index, (start, hook) in enumerate(self.hooks):
            if start in text:
                del self.hooks[index]
                await hook()
                break
        return await super().execute(query, *args, **kwargs)


async def test_a_first_booking_seen_early_and_removed_later_is_recomputed(
    private: tuple[str, str],
) -> None:
    """The first-booking tables recompute a key from ``bookings`` as it is at fold time, which
    may already hold a later transaction. The interleaving that would leave a stale first
    booking if the stream netted versions across transactions:

    1. T1 deletes a client's first booking; its batch starts folding;
    2. T2 books the same client earlier (committed before the recomputation, after the batch);
    3. the batch recomputes the key: it sees T2's booking and stores it as the first;
    4. T3 deletes that booking; T2 and T3 come in the next batch: +1 and -1 at the same time.

    Netted over the batch they cancel and the stale first booking would stay; netted per
    transaction, T3's removal recomputes the key. The hooks force steps 2 and 4 inside the fold
    of step 3."""
    _, dsn = private
    await wait_applied(dsn)
    with psycopg.connect(dsn, autocommit=True) as writer:
        row = writer.execute(  # the earliest booking of a client who has others
            "SELECT id, client_id, salon_id, professional_id, service_id, scheduled_at"
            " FROM bookings WHERE client_id IN"
            " (SELECT client_id FROM bookings GROUP BY 1 HAVING count(*) > 1)"
            " ORDER BY scheduled_at, id LIMIT 1"
        ).fetchone()
        assert row is not None
        first, client, *booking = row
        early: list[int] = []

        async def book_earlier() -> None:  # T2, committed before the recomputation
            inserted = writer.execute(
                "INSERT INTO bookings (salon_id, client_id, professional_id, service_id,"
                " scheduled_at, status, price_cents)"
                " VALUES (%s, %s, %s, %s, %s - interval '9 days', 'confirmed', 1000)"
                " RETURNING id",
                (booking[0], client, *booking[1:]),
            ).fetchone()
            assert inserted is not None
            early.append(inserted[0])

        async def delete_it() -> None:  # T3, after the recomputation
            writer.execute("DELETE FROM bookings WHERE id = %s", (early[0],))

        _HookedConnection.hooks = [
            ("WITH affected AS", book_earlier),
            ("pg_notify(", delete_it),
        ]
        stopping = asyncio.Event()
        async with (
            await _HookedConnection.connect(dsn, autocommit=True) as folding,
            await psycopg.AsyncConnection.connect(dsn, autocommit=True) as watching,
        ):
            # one batch per quiet pause: T2 and T3 land in the same one
            folder = Folder(folding, dsn, quiet=0.3, max_delay=5.0)
            running = asyncio.create_task(folder.run(stopping))
            writer.execute("DELETE FROM bookings WHERE id = %s", (first,))  # T1
            await _until(_no_hooks_left)
            marker = await emit_marker(watching)

            async def folded() -> bool:
                return ((await read_position(watching)).applied or 0) >= marker

            await _until(folded)
            stopping.set()
            await running
    assert early, "the hooks did not run: the interleaving was not forced"
    with psycopg.connect(dsn) as connection:
        stored = connection.execute(
            "SELECT first_at FROM client_first_bookings WHERE client_id = %s", (client,)
        ).fetchone()
        truth = connection.execute(
            "SELECT min(scheduled_at) FROM bookings WHERE client_id = %s", (client,)
        ).fetchone()
    assert truth is not None
    assert truth[0] is not None
    assert stored == truth
    assert await verify(dsn, rounds=1) == []


async def _no_hooks_left() -> bool:
    return not _HookedConnection.hooks
