"""The schema migrations: every table and named index exists, and downgrade works."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from service.config import Settings
from service.db import downgrade, libpq_url, migrate, with_database
from service.models import NOT_MODELLED, Base, include_name
from service.tools.seed import seed_database
from tests.conftest import _worker_suffix, create_database, drop_database, settle_stream
from tests.reports.test_rollups import assert_rollups_exact

NAMED_INDEXES = {
    "idx_bookings_scheduled_at_status",
    "idx_bookings_professional_scheduled",
    "idx_bookings_service_scheduled",
    "idx_bookings_client_scheduled",
    "idx_bookings_status_completed",
    "idx_professionals_salon_active",
    "idx_services_salon_category",
    "idx_users_role_created",
    "idx_audit_events_created_type",
    "idx_audit_events_entity",
}
TABLES = {"salons", "users", "professionals", "services", "bookings", "audit_events"}


def _schema(dsn: str) -> tuple[set[str], set[str], set[str]]:
    with psycopg.connect(dsn) as connection:
        tables = {
            r[0]
            for r in connection.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            )
        }
        indexes = {
            r[0]
            for r in connection.execute(
                "SELECT indexname FROM pg_indexes WHERE schemaname = 'public'"
            )
        }
        triggers = {
            r[0] for r in connection.execute("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal")
        }
    return tables, indexes, triggers


@pytest.fixture
def scratch_url(base_settings: Settings, admin_dsn: str) -> Iterator[str]:
    name = f"salon_reports_migration_{_worker_suffix()}"
    create_database(admin_dsn, name)
    yield with_database(base_settings.database_url, name)
    drop_database(admin_dsn, name)  # and its slot, which would keep the cluster's WAL


def test_upgrade_creates_everything_and_downgrade_removes_it(scratch_url: str) -> None:
    dsn = libpq_url(scratch_url)
    migrate(scratch_url)
    tables, indexes, triggers = _schema(dsn)
    assert tables >= TABLES
    assert indexes >= NAMED_INDEXES
    # The writers' path carries nothing of ours: the change stream maintains the derived data.
    assert not {t for t in triggers if t.startswith("bookings_")}, triggers
    with psycopg.connect(dsn) as connection:  # 0006, with the role of the tests (a superuser)
        installed = connection.execute(
            "SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements'"
        ).fetchone()
    assert installed is not None

    downgrade(scratch_url, "0004")
    _, _, triggers = _schema(dsn)
    assert {
        "bookings_notify_insert",
        "bookings_notify_update",
        "bookings_notify_delete",
        "bookings_notify_truncate",
    } <= triggers

    downgrade(scratch_url, "0001")
    tables, indexes, triggers = _schema(dsn)
    assert tables >= TABLES
    assert not {t for t in triggers if t.startswith("bookings_notify")}

    downgrade(scratch_url, "base")
    tables, indexes, _ = _schema(dsn)
    assert not tables & TABLES
    assert not indexes & NAMED_INDEXES

    migrate(scratch_url)  # and up again from nothing
    tables, indexes, _ = _schema(dsn)
    assert tables >= TABLES
    assert indexes >= NAMED_INDEXES


def test_downgrading_the_change_stream_keeps_the_derived_tables_exact(scratch_url: str) -> None:
    """0005 -> 0004 while the stream is behind: the triggers come back, the slot goes, and
    every derived table is recomputed; upgrading again leaves them exact as well."""
    dsn = libpq_url(scratch_url)
    migrate(scratch_url)
    seed_database(scratch_url, bookings=2_000, salons=3, days=40, seed=9)
    settle_stream(dsn)  # the stream exists and is current
    with psycopg.connect(dsn, autocommit=True) as connection:
        # folded by nobody before the downgrade: no consumer runs on this database now
        connection.execute("UPDATE bookings SET scheduled_at = scheduled_at + interval '2 days'")
    downgrade(scratch_url, "0004")
    with psycopg.connect(dsn, autocommit=True) as connection:
        assert connection.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()"
        ).fetchone() == (0,)
        assert_rollups_exact(connection)
        connection.execute("DELETE FROM bookings WHERE id % 4 = 0")  # the triggers again
        assert_rollups_exact(connection)
    migrate(scratch_url)
    with psycopg.connect(dsn, autocommit=True) as connection:
        assert_rollups_exact(connection)
        connection.execute("UPDATE bookings SET status = 'completed' WHERE id % 3 = 0")
        settle_stream(dsn)
        assert_rollups_exact(connection)


def test_autogenerate_proposes_nothing(database_url: str) -> None:
    """The models and the migrations agree: on a database at head, ``alembic revision
    --autogenerate`` (the same comparison, with the same filter as ``migrations/env.py``)
    would write an empty migration. The tables not modelled are skipped, not dropped."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"include_name": include_name})
            assert compare_metadata(context, Base.metadata) == []
            present = set(inspect(connection).get_table_names())
    finally:
        engine.dispose()
    assert present >= NOT_MODELLED  # what the filter skips does exist
