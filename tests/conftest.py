"""Shared fixtures: a real PostgreSQL database and a real Redis, both from `make services`.

Each test that asks for ``clean_db`` starts on empty tables (TRUNCATE … RESTART IDENTITY);
each that asks for ``redis_url`` starts on an empty Redis database. Tests use their own
database and Redis database number, never the demo data of `make run`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.auth import issue_token
from service.changes.consumer import ChangeConsumer, wait_applied
from service.config import Settings
from service.db import drop_database, libpq_url, migrate, with_database
from service.main import create_app
from service.resources import Resources, start_resources, stop_resources
from telemetry.setup import Telemetry, configure
from tests.factories import small_dataset
from tests.support import (
    SettlingListener,
    close_client,
    cluster_url,
    crossslot_errors,
    redis_client,
    reset_error_stats,
    wait_for_a_settled_cluster,
)

TABLES = (
    "audit_events",
    "bookings",
    "services",
    "professionals",
    "users",
    "salons",
)


def _worker_suffix() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The cluster pass (``SR_TEST_REDIS_CLUSTER=1``) skips, with their reason, the tests that
    need a single Redis server of their own (``single_redis``): they ran in the first pass."""
    if cluster_url() is None:
        return
    for item in items:
        marker = item.get_closest_marker("single_redis")
        if marker is not None:
            reason = marker.args[0] if marker.args else "needs a single Redis server"
            item.add_marker(pytest.mark.skip(reason=f"not on a Redis Cluster: {reason}"))


@pytest.fixture(scope="session")
def base_settings() -> Settings:
    return Settings()  # type: ignore[call-arg]


@pytest.fixture(scope="session")
def admin_dsn(base_settings: Settings) -> str:
    """libpq DSN of the server's maintenance database (for CREATE/DROP DATABASE)."""
    return libpq_url(with_database(base_settings.database_url, "postgres"))


def create_database(admin_dsn: str, name: str) -> None:
    drop_database(admin_dsn, name)
    with psycopg.connect(admin_dsn, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')


@pytest.fixture(scope="session")
def database_url(base_settings: Settings, admin_dsn: str) -> Iterator[str]:
    """SQLAlchemy URL of the test database, migrated to head once per session."""
    name = f"salon_reports_test_{_worker_suffix()}"
    create_database(admin_dsn, name)
    url = with_database(base_settings.database_url, name)
    migrate(url)
    yield url
    # An idle slot would keep the cluster's WAL until the next session drops the database.
    drop_database(admin_dsn, name)


@pytest.fixture(scope="session")
def dsn(database_url: str) -> Iterator[str]:
    """libpq DSN of the test database, for psycopg; its change stream is folded by a consumer
    on a background thread for the whole session (see ``BackgroundConsumer``)."""
    dsn = libpq_url(database_url)
    with BackgroundConsumer(dsn):
        yield dsn


class BackgroundConsumer:
    """A ``ChangeConsumer`` on its own thread and event loop.

    It wins the election on the test database, so ``wait_applied`` (and ``settled``) only wait
    for it; the apps that tests start run their own consumer too, which waits for the lock as a
    second worker would.
    """

    def __init__(self, dsn: str) -> None:
        self.consumer = ChangeConsumer(dsn, election_interval=0.2)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="test-consumer", daemon=True)

    def _run(self) -> None:
        self.loop.run_until_complete(self.consumer.run())

    def __enter__(self) -> BackgroundConsumer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.consumer.request_stop)
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()


def settle_stream(dsn: str) -> None:
    """Block until the derived tables reflect every write committed so far (sync code, even
    inside a running event loop: the wait runs on a thread of its own)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, wait_applied(dsn)).result()


@pytest.fixture
def clean_db(dsn: str) -> str:
    """Empty tables, identities restarted; yields the libpq DSN."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
    return dsn


@pytest.fixture
def db(clean_db: str) -> Iterator[psycopg.Connection]:
    """An autocommit psycopg connection to the clean test database."""
    with psycopg.connect(clean_db, autocommit=True) as connection:
        yield connection


@pytest.fixture(scope="session")
def redis_test_url(base_settings: Settings) -> str:
    if not base_settings.redis_url:
        pytest.fail("REDIS_URL is not configured; run `make services`")
    cluster = cluster_url()
    if cluster is not None:
        return cluster
    base = base_settings.redis_url.rsplit("/", 1)[0]
    # Databases 1-14 (15 is the load test's): stable per worker name, or pinned by
    # SR_TEST_REDIS_DB when several pytest sessions share one Redis.
    default = 1 + zlib.crc32(_worker_suffix().encode()) % 14
    return f"{base}/{int(os.environ.get('SR_TEST_REDIS_DB', default))}"


@pytest.fixture
def redis_url(redis_test_url: str) -> Iterator[str]:
    """An empty Redis database for this test; on the test cluster, afterwards no node may have
    answered ``CROSSSLOT`` meanwhile (a multi-key command or script across slots)."""
    on_cluster = redis_test_url == cluster_url()
    if on_cluster:
        wait_for_a_settled_cluster(redis_test_url)
    client = redis_client(redis_test_url)
    client.flushdb()
    if on_cluster:
        reset_error_stats(client)
    close_client(client)
    yield redis_test_url
    if on_cluster:
        client = redis_client(redis_test_url)
        try:
            assert crossslot_errors(client) == {}
        finally:
            close_client(client)


# -- the application ----------------------------------------------------------------------


@dataclass
class Api:
    """An app running its lifespan, and an HTTP client speaking to it in process."""

    app: FastAPI
    http: httpx.AsyncClient
    settings: Settings
    spans: InMemorySpanExporter

    @property
    def resources(self) -> Resources:
        resources: Resources = self.app.state.resources
        return resources

    def token(self, role: str = "admin", salons: list[int] | None = None, **kwargs: Any) -> str:
        return issue_token(
            self.settings.jwt_secret,
            role=role,
            salon_ids=salons,  # type: ignore[arg-type]
            **kwargs,
        )

    async def get(self, path: str, token: str | None = None, **kwargs: Any) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return await self.http.get(path, headers=headers, **kwargs)

    async def report(self, name: str, token: str | None = None, **params: Any) -> httpx.Response:
        return await self.get(
            f"/api/v1/optimized-reports/{name}", token or self.token(), params=params
        )


def app_settings(base: Settings, database_url: str, redis_url: str, **overrides: Any) -> Settings:
    return base.model_copy(
        update={
            "database_url": database_url,
            "read_database_url": None,
            "redis_url": redis_url,
            "environment": "test",
            # CI machines are shared and noisy: a Redis call must not time out and trip the
            # circuit breaker in a test that is not about it.
            "redis_timeout": 2.0,
            # Tests that assert a MISS after a change would race the recomputation of what
            # they read before it; the tests of that recomputation (and the randomized
            # contract test) turn it on.
            "cache_refresh_recent": 0.0,
            "redis_cluster": bool(redis_url) and redis_url == cluster_url(),
            **overrides,
        }
    )


class RunningApi:
    """Start an app (lifespan included) and wait for its invalidation listener."""

    def __init__(self, settings: Settings, telemetry: Telemetry | None = None) -> None:
        self.settings = settings
        self.spans = InMemorySpanExporter()
        if telemetry is None:
            provider = TracerProvider()
            provider.add_span_processor(SimpleSpanProcessor(self.spans))
            telemetry = configure(
                version="test",
                environment="test",
                slow_query_ms=settings.slow_query_ms,
                tracer_provider=provider,
            )
        self.telemetry = telemetry
        self.app = create_app(settings, telemetry)
        self.http: httpx.AsyncClient | None = None

    async def __aenter__(self) -> Api:
        self.app.state.resources = await start_resources(
            self.settings, self.telemetry, listener_type=SettlingListener
        )
        resources = self.app.state.resources
        try:
            listener = resources.listener
            if listener is not None:
                await asyncio.wait_for(listener.connected.wait(), 10)
            # Reports answer 503 until the stream is current (a fresh database is initialised
            # by the first consumer).
            await wait_applied(libpq_url(self.settings.database_url))
            await resources.stream_monitor.poll()
        except BaseException:
            # No __aexit__ follows a failed __aenter__: a publisher left running would go on
            # writing its stats into the Redis database of the tests that come after.
            await stop_resources(resources)
            self.telemetry.shutdown()
            raise
        self.http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app, raise_app_exceptions=False),
            base_url="http://testserver",
        )
        return Api(self.app, self.http, self.settings, self.spans)

    async def __aexit__(self, *exc: object) -> None:
        assert self.http is not None
        await self.http.aclose()
        await stop_resources(self.app.state.resources)
        self.telemetry.shutdown()


@pytest.fixture
async def api(
    base_settings: Settings, database_url: str, clean_db: str, redis_url: str
) -> AsyncIterator[Api]:
    async with RunningApi(app_settings(base_settings, database_url, redis_url)) as running:
        yield running


@pytest.fixture
async def data(
    db: psycopg.Connection, clean_db: str, request: pytest.FixtureRequest
) -> dict[str, int]:
    """``small_dataset``, folded by the change stream and, when the test runs an app, its
    notifications handled by the app's listener (so none lands in the middle of the test)."""
    dataset = small_dataset(db)
    if "api" in request.fixturenames:
        listener = request.getfixturevalue("api").resources.listener
        assert listener is not None
        await listener.settle()
    else:
        await asyncio.to_thread(settle_stream, clean_db)
    return dataset
