"""Fixtures of the change-stream tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from service.config import Settings
from service.db import libpq_url, migrate, with_database
from service.tools.seed import seed_database
from tests.conftest import _worker_suffix, create_database, drop_database


@pytest.fixture
def private(base_settings: Settings, admin_dsn: str) -> Iterator[tuple[str, str]]:
    """A database of its own (URL, DSN), migrated and seeded: no other consumer on it."""
    name = f"salon_reports_stream_{_worker_suffix()}"
    create_database(admin_dsn, name)
    url = with_database(base_settings.database_url, name)
    migrate(url)
    seed_database(url, bookings=3_000, salons=4, days=60, seed=3)
    try:
        yield url, libpq_url(url)
    finally:
        drop_database(admin_dsn, name)
