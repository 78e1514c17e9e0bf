"""Probes: ``/readyz`` is ready only with the schema at the Alembic head (issue 13)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from opentelemetry.sdk.trace import TracerProvider

from service.config import Settings
from service.db import MIGRATIONS_DIR, libpq_url, with_database
from service.main import create_app
from service.resources import start_resources, stop_resources
from service.schema_version import expected_revisions, schema_problem
from telemetry.setup import configure
from tests.conftest import Api, app_settings, create_database
from tests.support import free_port

SALON_REPORTS = Path(sys.executable).parent / "salon-reports"


def _scripts_heads() -> frozenset[str]:
    """The head revisions, read from the files without Alembic: revisions nothing revises."""
    revisions, parents = set(), set()
    for script in MIGRATIONS_DIR.joinpath("versions").glob("*.py"):
        source = script.read_text()
        revision = re.search(r'^revision\s*=\s*"([^"]+)"', source, re.MULTILINE)
        if revision is not None:
            revisions.add(revision.group(1))
            parents.update(re.findall(r'"([^"]+)"', _down_revision(source)))
    return frozenset(revisions - parents)


def _down_revision(source: str) -> str:
    match = re.search(r"^down_revision\s*=\s*(.+)$", source, re.MULTILINE)
    return match.group(1) if match is not None else ""


def test_the_head_is_read_from_the_migration_scripts() -> None:
    assert expected_revisions() == _scripts_heads()
    assert len(expected_revisions()) == 1


def test_schema_problem() -> None:
    head = frozenset({"0009"})
    assert schema_problem(head, head) is None
    never = schema_problem(None, head)
    assert never is not None
    assert "never migrated" in never
    assert "salon-reports migrate" in never
    behind = schema_problem(frozenset({"0003"}), head)
    assert behind is not None
    assert "0003" in behind
    assert "0009" in behind
    assert schema_problem(frozenset(), head) is not None  # an empty alembic_version


@pytest.fixture
def empty_database(base_settings: Settings, admin_dsn: str) -> Iterator[str]:
    """A database that was never migrated; its SQLAlchemy URL."""
    name = f"salon_reports_unmigrated_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"
    create_database(admin_dsn, name)
    yield with_database(base_settings.database_url, name)
    with psycopg.connect(admin_dsn, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def unmigrated_api(
    base_settings: Settings, empty_database: str, redis_url: str
) -> AsyncIterator[httpx.AsyncClient]:
    """The app on that database, its resources started (``RunningApi`` would wait for the
    change stream, which needs the schema)."""
    settings = app_settings(base_settings, empty_database, redis_url)
    telemetry = configure(
        version="test", environment="test", slow_query_ms=500.0, tracer_provider=TracerProvider()
    )
    app = create_app(settings, telemetry)
    app.state.resources = await start_resources(settings, telemetry)
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver"
        ) as http:
            yield http
    finally:
        await stop_resources(app.state.resources)
        telemetry.shutdown()


async def test_not_ready_on_a_database_never_migrated(unmigrated_api: httpx.AsyncClient) -> None:
    response = await unmigrated_api.get("/readyz")
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == "schema_not_at_head"
    assert "never migrated" in error["message"]
    assert (await unmigrated_api.get("/healthz")).status_code == 200  # alive all the same


async def test_not_ready_on_an_older_schema(
    unmigrated_api: httpx.AsyncClient, empty_database: str
) -> None:
    with psycopg.connect(libpq_url(empty_database), autocommit=True) as connection:
        connection.execute("CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)")
        connection.execute("INSERT INTO alembic_version VALUES ('0001')")
    response = await unmigrated_api.get("/readyz")
    assert response.status_code == 503, response.text
    message = response.json()["error"]["message"]
    assert "revision 0001" in message
    assert all(head in message for head in expected_revisions())


async def test_ready_at_the_head(api: Api) -> None:
    response = await api.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "ready"


def test_serve_says_loudly_at_start_that_the_schema_is_not_at_head(
    empty_database: str, tmp_path: Path
) -> None:
    port = free_port()
    environment = {
        "PATH": os.environ.get("PATH", ""),
        "DATABASE_URL": empty_database,
        "REDIS_URL": "",
        "REPORTS_ENVIRONMENT": "test",
        "REPORTS_JWT_SECRET": "k3P9x2LqV7mZ8wR4tY6uB1nC5dF0gH2jS8aE4vQ7",
        "OTEL_SDK_DISABLED": "true",
    }
    log = tmp_path / "serve.log"
    with log.open("w") as output:
        server = subprocess.Popen(
            [str(SALON_REPORTS), "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=environment,
            cwd=tmp_path,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        ready = _probe(f"http://127.0.0.1:{port}/readyz", server, log)
        assert ready.status_code == 503, ready.text
        assert ready.json()["error"]["code"] == "schema_not_at_head"
        output = log.read_text()
        assert "DATABASE SCHEMA NOT AT HEAD: the database was never migrated" in output, output
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _probe(url: str, server: subprocess.Popen[bytes], log: Path) -> httpx.Response:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert server.poll() is None, f"the server exited:\n{log.read_text()}"
        try:
            return httpx.get(url, timeout=2)
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError(f"the server did not answer:\n{log.read_text()}")
