"""The cache on a real Redis Cluster (``REPORTS_REDIS_CLUSTER=true``).

``make test`` starts one (``REDIS_CLUSTER=1 scripts/services.sh start``: 3 masters, 3 replicas
on loopback ports) and writes the URL of a node into ``.env`` as ``REDIS_CLUSTER_URL``. Every
multi-key command and script of the cache stays in one scope's hash tag; these tests run the
cache's paths on it and then check that no node ever answered ``CROSSSLOT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import psycopg
import pytest
import redis
from dotenv import dotenv_values
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from service.cache import CacheKey, CacheResult, ReportCache, build_key
from service.cache.durability import ReplicaWait
from service.cache.keys import EVERY_KEY, PLATFORM_SLOT_TAGS
from service.config import Settings
from service.paths import API_PREFIX
from service.reports.names import CACHED_REPORTS
from tests.conftest import Api, RunningApi, app_settings
from tests.factories import add_booking, small_dataset
from tests.support import SqlCounter, redis_process


def _cluster_url() -> str | None:
    return os.environ.get("REDIS_CLUSTER_URL") or dotenv_values(".env").get("REDIS_CLUSTER_URL")


@pytest.fixture
def cluster() -> Iterator[RedisCluster]:
    """The test cluster, emptied (it has one database: tests sharing it take turns)."""
    url = _cluster_url()
    if not url:
        pytest.skip("no Redis Cluster: start one with `make services REDIS_CLUSTER=1`")
    client = RedisCluster.from_url(url)
    for _ in range(100):
        info = client.cluster_info()
        if info.get("cluster_state") == "ok" and int(info.get("cluster_slots_ok", 0)) == 16384:
            break
        time.sleep(0.1)
    client.flushall(target_nodes=RedisCluster.PRIMARIES)
    for node in client.get_nodes():
        client.config_resetstat(target_nodes=node)
    yield client
    errors = {
        node.name: client.info("errorstats", target_nodes=node) for node in client.get_nodes()
    }
    client.close()
    for name, stats in errors.items():
        assert not any("CROSSSLOT" in key for key in stats), (name, stats)


@pytest.fixture
def cluster_settings(
    base_settings: Settings, database_url: str, clean_db: str, cluster: RedisCluster
) -> Settings:
    return app_settings(base_settings, database_url, str(_cluster_url()), redis_cluster=True)


@pytest.fixture
async def workers(cluster_settings: Settings) -> AsyncIterator[tuple[Api, Api]]:
    async with RunningApi(cluster_settings) as one, RunningApi(cluster_settings) as two:
        yield one, two


async def _settle(*apps: Api) -> None:
    for api in apps:
        listener = api.resources.listener
        assert listener is not None
        await listener.settle()


def _book(db: psycopg.Connection, data: dict[str, int]) -> None:
    add_booking(
        db,
        salon_id=data["lisbon"],
        client_id=data["bob"],
        professional_id=data["pro_lisbon"],
        service_id=data["cut"],
        scheduled_at=datetime.now(UTC) - timedelta(hours=1),
    )


def _keys(cluster: RedisCluster) -> list[bytes]:
    return list(cluster.scan_iter(match=EVERY_KEY, target_nodes=RedisCluster.PRIMARIES))


async def test_the_cache_works_on_a_cluster(
    workers: tuple[Api, Api], db: psycopg.Connection, cluster: RedisCluster
) -> None:
    one, two = workers
    data = small_dataset(db)
    await _settle(one, two)
    salons = [data["lisbon"], data["newyork"]]

    # Single flight across two workers: one SQL execution for 40 cold requests.
    counters = [SqlCounter(one), SqlCounter(two)]
    token = one.token()
    answers = await asyncio.gather(
        *[w.report("bookings", token, salon_id=salons[0]) for _ in range(20) for w in (one, two)]
    )
    assert {a.status_code for a in answers} == {200}
    assert sum(counter.count for counter in counters) == 1
    for counter in counters:
        counter.close()

    # Entries of several scopes (one salon, another, the platform) on the masters; a hit from
    # Redis on the other worker.
    for salon in (*salons, None):
        params: dict[str, Any] = {} if salon is None else {"salon_id": salon}
        assert (await one.report("dashboard", **params)).headers["X-Cache"] == "MISS"
        assert (await two.report("dashboard", **params)).headers["X-Cache"] == "HIT"
    masters = {cluster.get_node_from_key(key.decode()).name for key in _keys(cluster)}
    assert len(masters) >= 2  # the scopes really are spread over the cluster

    # Invalidation after a write: both workers answer with it.
    before = (await one.report("dashboard", salon_id=salons[0])).json()["bookings_total"]
    _book(db, data)
    await _settle(one, two)
    for api in (one, two):
        answer = await api.report("dashboard", salon_id=salons[0])
        assert answer.json()["bookings_total"] == before + 1
    platform = await two.report("dashboard")
    assert platform.headers["X-Cache"] == "MISS"

    # Stats and metrics published by each worker, read by the other.
    for api in (one, two):
        publisher = api.resources.publisher
        assert publisher is not None
        await publisher.publish()
    stats = await one.get(f"{API_PREFIX}/performance/stats", one.token("ops"))
    assert stats.json()["workers"] == 2
    assert stats.json()["partial"] is False

    # The admin clear-everything reaches every master.
    assert _keys(cluster)
    cleared = await one.http.post(
        f"{API_PREFIX}/cache/clear", json={}, headers={"Authorization": f"Bearer {token}"}
    )
    assert cleared.status_code == 200, cleared.text
    assert _keys(cluster) == []
    assert (await two.report("dashboard", salon_id=salons[0])).headers["X-Cache"] == "MISS"


def _wait_replicating(host: str, port: int) -> None:
    """Wait until a restarted node has rejoined as a replica with its link up (so the next
    test finds a settled cluster)."""
    client = redis.Redis(host=host, port=port)
    try:
        for _ in range(300):
            with contextlib.suppress(redis.RedisError):
                info = client.info("replication")
                if info.get("role") == "slave" and info.get("master_link_status") == "up":
                    return
            time.sleep(0.1)
        raise AssertionError(f"{host}:{port} did not rejoin as a replica")
    finally:
        client.close()


def _restart_command(client: redis.Redis) -> list[str]:
    """The command that starts this node again as it runs now (same port, directory, files)."""
    config = client.config_get("*")
    return [
        "redis-server",
        "--bind", "127.0.0.1",
        "--port", config["port"],
        "--dir", config["dir"],
        "--daemonize", "yes",
        "--cluster-enabled", "yes",
        "--cluster-config-file", config["cluster-config-file"],
        "--cluster-node-timeout", config["cluster-node-timeout"],
        "--cluster-port", config["cluster-port"],
        "--logfile", config["logfile"],
        "--pidfile", config["pidfile"],
        "--save", "",
        "--appendonly", "no",
    ]  # fmt: skip


async def test_a_killed_master_is_replaced_and_nothing_wrong_is_served(
    cluster_settings: Settings, db: psycopg.Connection, cluster: RedisCluster
) -> None:
    """The master holding Lisbon's slot is shut down: its replica takes over (cluster node
    timeout 2 s); meanwhile the service answers from PostgreSQL; afterwards it caches again,
    and a write made during the failover is in every answer."""
    data = small_dataset(db)
    async with RunningApi(cluster_settings) as api:
        await _settle(api)
        lisbon = data["lisbon"]
        first = await api.report("dashboard", salon_id=lisbon)
        assert first.headers["X-Cache"] == "MISS"
        total = first.json()["bookings_total"]
        slot_key = f"sr:v2:{{s:{lisbon}}}:dashboard:epoch"
        master = cluster.get_node_from_key(slot_key)
        node = redis.Redis(host=master.host, port=master.port)
        command = _restart_command(node)
        node.shutdown(nosave=True)
        node.close()
        try:
            announced = api.resources.cache.announced
            _book(db, data)
            while api.resources.cache.announced == announced:  # folded, and heard of here
                await asyncio.sleep(0.01)
            answers = []
            deadline = time.monotonic() + 60
            while True:  # until a replica has been promoted and the service caches again
                response = await api.report("dashboard", salon_id=lisbon)
                assert response.status_code == 200, response.text
                answers.append(response)
                if response.headers["X-Cache"] == "HIT":
                    break
                assert time.monotonic() < deadline, "the service never cached again"
                await asyncio.sleep(0.2)
            print("answers during the failover:", [a.headers["X-Cache"] for a in answers])
            # Every answer after the write includes it, from the database or the cache.
            assert {a.json()["bookings_total"] for a in answers} == {total + 1}
            assert {a.headers["X-Cache"] for a in answers} - {"HIT"} <= {"BYPASS", "MISS", "ERROR"}
            others = [n for n in cluster.get_nodes() if n.name != master.name]
            promoted = RedisCluster(startup_nodes=[ClusterNode(n.host, n.port) for n in others])
            assert promoted.get_node_from_key(slot_key).name != master.name
            promoted.close()
        finally:
            subprocess.run(command, check=True)  # back, as a replica of the promoted one
            _wait_replicating(master.host, master.port)


# -- the platform's slots, and WAIT after an invalidation ----------------------------------


async def _constant() -> bytes:
    return b'{"computed":1}'


def _replica_of(cluster: RedisCluster, key: str) -> ClusterNode:
    """The replica of the master that serves ``key``'s slot."""
    master = cluster.get_node_from_key(key)
    for node in cluster.get_nodes():
        info = cluster.info("replication", target_nodes=node)
        if info.get("role") == "slave" and int(info["master_port"]) == master.port:
            return node
    raise AssertionError(f"no replica of {master.name}")


def _busy(port: int, seconds: float, started: threading.Event) -> None:
    """Keep a node's only thread in a script for ``seconds``: it applies nothing of its
    master's replication stream (nor acknowledges it) meanwhile."""
    client = redis.Redis(port=port)
    try:
        started.set()
        client.eval(
            "local t = redis.call('TIME'); local stop = t[1] * 1e6 + t[2] + ARGV[1] "
            "repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] >= stop return 1",
            0,
            int(seconds * 1_000_000),
        )
    finally:
        client.close()


@contextlib.contextmanager
def _replica_held(port: int, seconds: float) -> Iterator[None]:
    started = threading.Event()
    thread = threading.Thread(target=_busy, args=(port, seconds, started))
    thread.start()
    started.wait(5)
    # The script is running once the node stops answering: a PING that times out.
    deadline = time.monotonic() + 5
    while True:
        with redis.Redis(port=port, socket_timeout=0.05, retry=Retry(NoBackoff(), 0)) as probe:
            try:
                probe.ping()
            except redis.TimeoutError:
                break
        assert time.monotonic() < deadline, "the replica was never held"
        time.sleep(0.01)
    try:
        yield
    finally:
        thread.join(30)


def _readonly(node: ClusterNode) -> redis.Redis:
    client = redis.Redis(host=node.host, port=node.port)
    client.execute_command("READONLY")
    return client


async def test_platform_entries_spread_over_slots_and_a_change_reaches_every_one(
    cluster: RedisCluster,
) -> None:
    """Platform-wide entries land on several slots (and masters); a change to any salon
    deletes the platform's epochs in every one of them, and nothing of another salon."""
    client = AsyncRedisCluster.from_url(str(_cluster_url()))
    cache = ReportCache(cast(AsyncRedis, client), reports=CACHED_REPORTS)
    reports = ("dashboard", "bookings", "professionals")
    platform = [
        build_key(report, None, "admin", {"start": f"2026-01-{day:02d}"})
        for report in reports
        for day in range(1, 11)
    ]
    salon = build_key("dashboard", 7, "admin", {})
    try:
        for key in [*platform, salon]:
            assert (await cache.fetch(key, 600, _constant)).result == CacheResult.MISS
        assert len({cluster.keyslot(key.key) for key in platform}) > 1
        assert len({cluster.get_node_from_key(key.key).name for key in platform}) > 1
        epochs = [
            CacheKey.of_scope(report, tag).epoch_key
            for tag in PLATFORM_SLOT_TAGS
            for report in reports
        ]
        used = {key.epoch_key for key in platform}
        assert {name for name in epochs if cluster.exists(name)} == used

        cache.announce({8})
        await cache.apply_announced()

        assert [name for name in epochs if cluster.exists(name)] == []
        for key in platform:
            assert (await cache.fetch(key, 600, _constant)).result == CacheResult.MISS
        assert (await cache.fetch(salon, 600, _constant)).result == CacheResult.HIT
    finally:
        await cache.close()
        await client.aclose()


async def test_an_invalidation_is_on_the_replica_when_it_returns(cluster: RedisCluster) -> None:
    """The replica of the salon's master is held busy (it applies nothing of the replication
    stream meanwhile): the invalidation returns only once the replica has it (WAIT)."""
    client = AsyncRedisCluster.from_url(str(_cluster_url()))
    durability = ReplicaWait(replicas=1, timeout_ms=5000)
    cache = ReportCache(cast(AsyncRedis, client), reports=CACHED_REPORTS, durability=durability)
    key = build_key("dashboard", 7, "admin", {})
    master = cluster.get_node_from_key(key.epoch_key)
    replica = _readonly(_replica_of(cluster, key.epoch_key))
    try:
        await cache.fetch(key, 600, _constant)
        for _ in range(200):  # the entry's epoch has reached the replica
            if replica.get(key.epoch_key) is not None:
                break
            time.sleep(0.05)
        assert replica.get(key.epoch_key) is not None
        with _replica_held(replica.get_connection_kwargs()["port"], 1.5):
            before = int(cluster.info("replication", target_nodes=master)["master_repl_offset"])
            await cache.invalidate(7)
            # The master's view of its replica right when the call returned: the replica has
            # acknowledged what the master wrote after ``before``, the invalidation (a held
            # replica acknowledges nothing on its own).
            info = cluster.info("replication", target_nodes=master)
            assert int(info["slave0"]["offset"]) > before, info
            assert replica.get(key.epoch_key) is None  # read on the replica itself
        assert durability.counts == {"acknowledged": 1}
    finally:
        replica.close()
        await cache.close()
        await client.aclose()


async def test_a_wait_that_times_out_is_counted_and_logged(
    cluster: RedisCluster, caplog: pytest.LogCaptureFixture
) -> None:
    client = AsyncRedisCluster.from_url(str(_cluster_url()))
    durability = ReplicaWait(replicas=1, timeout_ms=100)
    cache = ReportCache(cast(AsyncRedis, client), reports=CACHED_REPORTS, durability=durability)
    key = build_key("dashboard", 7, "admin", {})
    replica = _replica_of(cluster, key.epoch_key)
    try:
        await cache.fetch(key, 600, _constant)
        with _replica_held(replica.port, 1.5):
            await cache.invalidate(7)
        assert durability.counts == {"timeout": 1}
        assert "reached 0 of 1 replicas" in caplog.text
        assert not cluster.exists(key.epoch_key)  # done on the master all the same
    finally:
        await cache.close()
        await client.aclose()


async def test_a_single_redis_without_a_replica_is_not_waited_on() -> None:
    with redis_process() as server:
        client = AsyncRedis.from_url(server.url)
        durability = ReplicaWait(replicas=1, timeout_ms=5000)
        cache = ReportCache(client, reports=CACHED_REPORTS, durability=durability)
        key = build_key("dashboard", 7, "admin", {})
        try:
            await cache.fetch(key, 600, _constant)
            await cache.invalidate(7)
            assert durability.counts == {"no_replica": 1}
            assert (await cache.fetch(key, 600, _constant)).result == CacheResult.MISS
        finally:
            await cache.close()
            await client.aclose()


async def test_a_single_redis_with_a_replica_is_waited_on() -> None:
    """The single-node path: the WAIT goes in the invalidation's pipeline (same connection);
    with the replica held busy the call returns only once the replica has it."""
    with redis_process() as master, redis_process() as replica_server:
        replica = redis.Redis(port=replica_server.port)
        replica.replicaof("127.0.0.1", master.port)
        client = AsyncRedis.from_url(master.url)
        durability = ReplicaWait(replicas=1, timeout_ms=5000)
        cache = ReportCache(client, reports=CACHED_REPORTS, durability=durability)
        key = build_key("dashboard", 7, "admin", {})
        try:
            for _ in range(200):
                if replica.info("replication").get("master_link_status") == "up":
                    break
                time.sleep(0.05)
            await cache.fetch(key, 600, _constant)
            for _ in range(200):
                if replica.get(key.epoch_key) is not None:
                    break
                time.sleep(0.05)
            assert replica.get(key.epoch_key) is not None
            primary = redis.Redis(port=master.port)
            with _replica_held(replica_server.port, 1.5):
                before = int(primary.info("replication")["master_repl_offset"])
                await cache.invalidate(7)
                info = primary.info("replication")
                assert int(info["slave0"]["offset"]) > before, info
                assert replica.get(key.epoch_key) is None
            primary.close()
            assert durability.counts == {"acknowledged": 1}
        finally:
            replica.close()
            await cache.close()
            await client.aclose()
