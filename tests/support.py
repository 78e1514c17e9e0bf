"""Test helpers: a private Redis the test may kill and restart; a report-statement counter; the
invalidation listener with the tests' hooks (``settle``, ``drop_connection``)."""

from __future__ import annotations

import asyncio
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


def redis_client(url: str) -> redis.Redis:
    """A client of the Redis at ``url``: the cluster client for the test cluster (typed as a
    plain client: the tests call the commands both have)."""
    if url == cluster_url():
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(url)  # type: ignore[return-value]
    return redis.Redis.from_url(url)


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
                redis.Redis(port=self.port, socket_timeout=0.2).ping()
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
