"""``REPORTS_READ_DATABASE_URL``: report queries go to the replica, everything else to the primary.

A real replica streams the primary's data; here the "replica" is a second database holding
different numbers for the same salon, so that where each answer came from is visible.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from service.config import Settings
from service.db import libpq_url, migrate, with_database
from tests.conftest import (
    RunningApi,
    _worker_suffix,
    app_settings,
    create_database,
    drop_database,
    settle_stream,
)


def _salon_with_bookings(dsn: str, bookings: int) -> None:
    """Salon 1 with ``bookings`` completed bookings of 1,000 cents yesterday (UTC)."""
    when = datetime.now(UTC) - timedelta(days=1)
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("INSERT INTO salons (id, name, timezone) VALUES (1, 'One', 'UTC')")
        connection.execute("INSERT INTO users (id, role, email) VALUES (1, 'client', 'c@x.test')")
        connection.execute("INSERT INTO professionals (id, salon_id, name) VALUES (1, 1, 'P')")
        connection.execute(
            "INSERT INTO services (id, salon_id, category, name, price_cents, duration_min)"
            " VALUES (1, 1, 'hair', 'Cut', 1000, 30)"
        )
        connection.execute(
            "INSERT INTO bookings (salon_id, client_id, professional_id, service_id,"
            " scheduled_at, status, price_cents)"
            " SELECT 1, 1, 1, 1, %s, 'completed', 1000 FROM generate_series(1, %s)",
            (when, bookings),
        )


@pytest.fixture
def replica_url(base_settings: Settings, admin_dsn: str) -> Iterator[str]:
    name = f"salon_reports_test_{_worker_suffix()}_replica"
    create_database(admin_dsn, name)
    url = with_database(base_settings.database_url, name)
    migrate(url)
    yield url
    drop_database(admin_dsn, name)


async def test_reports_read_from_the_replica_and_the_rest_from_the_primary(
    base_settings: Settings, database_url: str, clean_db: str, redis_url: str, replica_url: str
) -> None:
    _salon_with_bookings(clean_db, bookings=2)
    _salon_with_bookings(libpq_url(replica_url), bookings=5)
    # A real replica replays the primary's derived rows; this stand-in folds its own stream.
    settle_stream(libpq_url(replica_url))
    settings = app_settings(base_settings, database_url, redis_url, read_database_url=replica_url)
    async with RunningApi(settings) as api:
        for salon_id in (1, None):  # one salon, and platform-wide (the rollups)
            params = {} if salon_id is None else {"salon_id": salon_id}
            response = await api.report("dashboard", **params)
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["bookings_total"] == 5  # the replica's numbers
            assert body["revenue_cents"] == 5000

        # Both pools exist and are reported; readiness is about the primary.
        metrics = (await api.get("/metrics")).text
        assert 'pool_name="primary"' in metrics
        assert 'pool_name="read"' in metrics
        ready = await api.get("/readyz")
        assert ready.status_code == 200

        # The invalidation listener watches the primary, where the writes happen: a write
        # there drops the cached answer (a real replica would then have the new row too).
        cached = await api.report("dashboard", salon_id=1)
        assert cached.headers["X-Cache"] == "HIT"
        with psycopg.connect(clean_db, autocommit=True) as connection:
            connection.execute("UPDATE bookings SET status = 'cancelled' WHERE id = 1")
        listener = api.resources.listener
        assert listener is not None
        await listener.settle()
        again = await api.report("dashboard", salon_id=1)
        assert again.headers["X-Cache"] == "MISS"
        assert again.json()["bookings_total"] == 5
