"""Test helpers: a private Redis the test may kill and restart; a report-statement counter; the
invalidation listener with the tests' hooks (``settle``, ``drop_connection``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import psycopg
import redis
import redis.asyncio
from sqlalchemy import event

from service.cache.listener import CHANNEL, InvalidationListener
from service.changes.consumer import wait_applied

if TYPE_CHECKING:
    from tests.conftest import Api


def cluster_url() -> str | None:
    """The test Redis Cluster's URL, when the run asks for it (``SR_TEST_REDIS_CLUSTER=1``:
    the cache tests then use the cluster instead of a database of the single Redis)."""
    if os.environ.get("SR_TEST_REDIS_CLUSTER") != "1":
        return None
    from dotenv import dotenv_values

    url = os.environ.get("REDIS_CLUSTER_URL") or dotenv_values(".env").get("REDIS_CLUSTER_URL")
    if not url:
        raise RuntimeError("SR_TEST_REDIS_CLUSTER=1 but no cluster: make services REDIS_CLUSTER=1")
    return url


def wait_for_a_settled_cluster(url: str, timeout: float = 60.0) -> None:
    """Return once the test cluster has settled: every node answers, says ``cluster_state:ok``
    and sees the same masters, none flagged failing or in handshake, each master with a
    connected replica. Tests earlier in the run kill masters and hold replicas busy on the same
    cluster; a fail-over still going on when a cache test starts turns its commands into
    errors (the service then computes without the cache, correctly, but a test that counts
    statements sees two)."""
    seed = redis.Redis.from_url(url)
    deadline = time.monotonic() + timeout
    last = ""
    try:
        while True:
            try:
                last = _cluster_unsettled(seed)
            except redis.RedisError as error:
                last = f"{type(error).__name__}: {error}"
            if not last:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the test Redis Cluster did not settle: {last}")
            time.sleep(0.2)
    finally:
        seed.close()


def _cluster_unsettled(seed: redis.Redis) -> str:
    """What keeps the cluster from being settled, or an empty string."""
    nodes: dict[str, dict[str, Any]] = seed.execute_command("CLUSTER NODES")
    replicated = set()
    for address, node in nodes.items():
        flags = str(node["flags"])
        if any(flag in flags for flag in ("fail", "handshake", "noaddr")):
            return f"node {address} is {flags}"
        if not node["connected"] and "myself" not in flags:
            return f"node {address} is disconnected"
        if "slave" in flags:
            replicated.add(node["master_id"])
    masters = {node["node_id"] for node in nodes.values() if "master" in str(node["flags"])}
    if not masters or masters - replicated:
        return "a master without a replica"
    for address in nodes:
        host, port = address.split("@")[0].rsplit(":", 1)
        other = redis.Redis(host=host, port=int(port), socket_timeout=2)
        try:
            if other.execute_command("CLUSTER INFO").get("cluster_state") != "ok":
                return f"{address} says the cluster is not ok"
            seen: dict[str, dict[str, Any]] = other.execute_command("CLUSTER NODES")
            theirs = {node["node_id"] for node in seen.values() if "master" in str(node["flags"])}
            if theirs != masters:
                return f"{address} sees other masters"
        finally:
            other.close()
    return ""


def redis_client(url: str) -> redis.Redis:
    """A client of the Redis at ``url``: the cluster client for the test cluster (typed as a
    plain client: the tests call the commands both have)."""
    if url == cluster_url():
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(url)  # type: ignore[return-value]
    return redis.Redis.from_url(url)


def _nodes(client: redis.Redis) -> list[Any]:
    """Every node of a cluster client (None for a plain client: its one server)."""
    from redis.cluster import RedisCluster

    if isinstance(client, RedisCluster):
        return list(client.get_nodes())
    return [None]


def close_client(client: redis.Redis) -> None:
    """Close a client; a cluster client's node pools too (``close`` leaves their sockets to
    the garbage collector, which then warns)."""
    from redis.cluster import RedisCluster

    if isinstance(client, RedisCluster):
        client.disconnect_connection_pools()
    client.close()


def reset_error_stats(client: redis.Redis) -> None:
    """``CONFIG RESETSTAT`` on every node (the error counts of ``INFO errorstats`` included)."""
    for node in _nodes(client):
        if node is None:
            client.config_resetstat()
        else:
            client.config_resetstat(target_nodes=node)  # type: ignore[call-arg]


def crossslot_errors(client: redis.Redis) -> dict[str, Any]:
    """The ``CROSSSLOT`` errors each node counted since its stats were reset, by node."""
    found = {}
    for node in _nodes(client):
        if node is None:
            stats = client.info("errorstats")
        else:
            stats = client.info("errorstats", target_nodes=node)  # type: ignore[call-arg]
        bad = {name: value for name, value in stats.items() if "CROSSSLOT" in name}
        if bad:
            found["redis" if node is None else node.name] = bad
    return found


def async_redis_client(url: str) -> redis.asyncio.Redis:
    """``redis_client`` for asyncio code."""
    if url == cluster_url():
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(url)  # type: ignore[return-value]
    return redis.asyncio.Redis.from_url(url)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisProcess:
    """A redis-server on a loopback port of its own, for tests that stop it."""

    def __init__(self, port: int | None = None, options: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.options = options  # more redis-server arguments, e.g. ("--maxmemory", "4mb")
        self.directory = tempfile.mkdtemp(prefix="salon-reports-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed; run `make services`"
        self.process = subprocess.Popen(
            [
                binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.directory,
                *self.options,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with redis.Redis(port=self.port, socket_timeout=0.2) as probe:
                    probe.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        """SIGKILL: no goodbye to the clients, like a crash."""
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
            self.process = None

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


@contextmanager
def redis_process(*options: str) -> Iterator[RedisProcess]:
    server = RedisProcess(options=options)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class SqlCounter:
    """Counts report statements as the database driver receives them, in one app's read engine."""

    def __init__(self, api: Api) -> None:
        self.count = 0
        self.engine = api.resources.read_engine.sync_engine
        event.listen(self.engine, "before_cursor_execute", self._seen)

    def _seen(
        self, _conn: Any, _cursor: Any, _statement: str, _params: Any, context: Any, _many: bool
    ) -> None:
        if str(context.execution_options.get("query_name", "")).startswith("report."):
            self.count += 1

    def close(self) -> None:
        event.remove(self.engine, "before_cursor_execute", self._seen)


class SettlingListener(InvalidationListener):
    """The app's invalidation listener plus what tests need of it: ``settle`` (wait until every
    write committed so far is folded and its invalidation handled here) and ``drop_connection``
    (a network cut). ``RunningApi`` hands it to ``start_resources``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._markers: dict[str, asyncio.Event] = {}  # this process's settle markers
        self._seen: list[tuple[int, asyncio.Event]] = []  # markers arrived, by announcement

    async def drop_connection(self) -> None:
        """Have the server terminate the listening connection (a network cut)."""
        connection = self._connection
        if connection is None:
            return
        pid = connection.info.backend_pid
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as admin:
            await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))

    async def settle(self, timeout: float = 5.0) -> None:
        """Wait until every write committed before this call has been folded by the change
        stream and its notification handled here.

        The stream's consumer notifies when it commits a batch; then a marker goes down the
        same channel: notifications arrive in order, so once the marker is seen, and what was
        announced before it applied to Redis, everything before it was handled. (The listener
        ignores a payload that names no salon, as the marker does.)
        """
        await wait_applied(self.dsn, timeout=max(timeout, 30.0))
        marker = f"settle:{uuid.uuid4().hex}"
        seen = asyncio.Event()
        self._markers[marker] = seen
        try:
            async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
                await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, marker))
            await asyncio.wait_for(seen.wait(), timeout)
        finally:
            self._markers.pop(marker, None)

    def _arrived(self, channel: str, payload: str) -> None:
        marker = self._markers.get(payload) if channel == CHANNEL else None
        if marker is not None:
            # Seen once everything announced before it has been applied to Redis.
            self._seen.append((self.cache.announced, marker))
            return
        super()._arrived(channel, payload)

    async def _apply(self) -> None:
        await super()._apply()
        applied = self.cache.applied
        for entry in [entry for entry in self._seen if entry[0] <= applied]:
            self._seen.remove(entry)
            entry[1].set()


class RedisClusterProcesses:
    """A private Redis Cluster (3 masters, 3 replicas) on free loopback ports, for tests that
    kill or pause its nodes (never the shared one of ``make services``).

    Each node keeps its ``nodes.conf`` in a directory of its own, so a killed master started
    again rejoins as a replica of the one promoted in its place. A short node timeout (2 s, as
    in ``scripts/services.sh``) makes that promotion take seconds.
    """

    def __init__(self) -> None:
        self.nodes = [RedisProcess() for _ in range(6)]
        for node in self.nodes:
            node.options = (
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "2000",
                "--cluster-port", str(free_port()),
            )  # fmt: skip
        self.killed: RedisProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        binary = shutil.which("redis-cli")
        assert binary, "redis-cli is not installed; run `make services`"
        subprocess.run(
            [
                binary,
                "--cluster",
                "create",
                *[f"127.0.0.1:{node.port}" for node in self.nodes],
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )
        self.wait_ok()
        self.wait_replicating()

    def wait_replicating(self, timeout: float = 30.0) -> None:
        """Until every live replica's link to its master is up (a replica is promoted only
        then; ``--cluster create`` returns before the replicas have synchronised)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            roles = []
            with contextlib.suppress(redis.RedisError):
                for node in self.nodes:
                    if node.process is not None:
                        with redis.Redis(port=node.port) as client:
                            roles.append(client.info("replication"))
            replicas = [info for info in roles if info.get("role") == "slave"]
            if len(replicas) >= 3 - (self.killed is not None) and all(
                info.get("master_link_status") == "up" for info in replicas
            ):
                return
            time.sleep(0.1)
        raise RuntimeError("the Redis Cluster's replicas did not synchronise")

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every live node says the cluster is ok and every slot is served."""
        deadline = time.monotonic() + timeout
        live = [node for node in self.nodes if node.process is not None]
        while time.monotonic() < deadline:
            infos = []
            with contextlib.suppress(redis.RedisError):
                for node in live:
                    with redis.Redis(port=node.port) as client:
                        infos.append(client.cluster("INFO"))
            if len(infos) == len(live) and all(
                info.get("cluster_state") == "ok" and int(info.get("cluster_slots_ok", 0)) == 16384
                for info in infos
            ):
                return
            time.sleep(0.1)
        raise RuntimeError("the Redis Cluster did not become ready")

    def masters(self) -> list[RedisProcess]:
        found = []
        for node in self.nodes:
            if node.process is None:
                continue
            with contextlib.suppress(redis.RedisError), redis.Redis(port=node.port) as client:
                if client.info("replication")["role"] == "master":
                    found.append(node)
        return found

    def master_of(self, key: str) -> RedisProcess:
        """The node that serves the slot of ``key`` now."""
        client = redis.RedisCluster(host="127.0.0.1", port=self.masters()[0].port)
        try:
            serving = client.get_node_from_key(key)
            return next(node for node in self.nodes if node.port == serving.port)
        finally:
            client.close()

    def kill(self, key: str = "{s:1}") -> None:
        """SIGKILL the master of ``key``'s slot (its replica is promoted after the timeout)."""
        self.killed = self.master_of(key)
        self.killed.kill()

    def restart_killed(self) -> None:
        """Start the killed node again (it rejoins as a replica) and wait for a settled cluster."""
        assert self.killed is not None
        self.killed.start()
        self.killed = None
        self.wait_ok()
        self.wait_replicating()

    def pause(self, milliseconds: int) -> None:
        """``CLIENT PAUSE ALL`` on every master: every command of the service hangs."""
        for node in self.masters():
            with redis.Redis(port=node.port) as client:
                client.client_pause(milliseconds, all=True)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@contextmanager
def redis_cluster_processes() -> Iterator[RedisClusterProcesses]:
    cluster = RedisClusterProcesses()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
