"""Shared fixtures: a real PostgreSQL database and a real Redis, both from `make services`.

Each test that asks for ``clean_db`` starts on empty tables (TRUNCATE … RESTART IDENTITY);
each that asks for ``redis_url`` starts on an empty Redis database. Tests use their own
database and Redis database number, never the demo data of `make run`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import psycopg
import pytest
import redis

from service.config import Settings
from service.db import libpq_url, migrate, with_database

TABLES = ("audit_events", "bookings", "services", "professionals", "users", "salons")


def _worker_suffix() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


@pytest.fixture(scope="session")
def base_settings() -> Settings:
    return Settings()  # type: ignore[call-arg]


@pytest.fixture(scope="session")
def admin_dsn(base_settings: Settings) -> str:
    """libpq DSN of the server's maintenance database (for CREATE/DROP DATABASE)."""
    return libpq_url(with_database(base_settings.database_url, "postgres"))


def create_database(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        connection.execute(f'CREATE DATABASE "{name}"')


@pytest.fixture(scope="session")
def database_url(base_settings: Settings, admin_dsn: str) -> str:
    """SQLAlchemy URL of the test database, migrated to head once per session."""
    name = f"salon_reports_test_{_worker_suffix()}"
    create_database(admin_dsn, name)
    url = with_database(base_settings.database_url, name)
    migrate(url)
    return url


@pytest.fixture(scope="session")
def dsn(database_url: str) -> str:
    """libpq DSN of the test database, for psycopg."""
    return libpq_url(database_url)


@pytest.fixture
def clean_db(dsn: str) -> Iterator[str]:
    """Empty tables, identities restarted; yields the libpq DSN."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
    yield dsn


@pytest.fixture
def db(clean_db: str) -> Iterator[psycopg.Connection]:
    """An autocommit psycopg connection to the clean test database."""
    with psycopg.connect(clean_db, autocommit=True) as connection:
        yield connection


@pytest.fixture(scope="session")
def redis_test_url(base_settings: Settings) -> str:
    if not base_settings.redis_url:
        pytest.fail("REDIS_URL is not configured; run `make services`")
    base = base_settings.redis_url.rsplit("/", 1)[0]
    return f"{base}/{1 + abs(hash(_worker_suffix())) % 14}"


@pytest.fixture
def redis_url(redis_test_url: str) -> Iterator[str]:
    """An empty Redis database for this test."""
    client = redis.Redis.from_url(redis_test_url)
    client.flushdb()
    client.close()
    yield redis_test_url
