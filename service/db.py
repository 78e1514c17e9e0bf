"""Database engines, schema migration and small helpers shared by the CLI and the app."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def migrate(database_url: str, revision: str = "head") -> None:
    """Upgrade the schema to ``revision`` (default: the newest)."""
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(database_url), revision)


def sync_engine(database_url: str) -> Engine:
    return create_engine(database_url, pool_pre_ping=True)


def session_settings(statement_timeout_ms: int) -> dict[str, str]:
    """What every report connection runs with.

    JIT compilation costs 35-85 ms on the big platform-wide aggregations and wins nothing back
    at this size; hash aggregates of a year of bookings want memory.
    """
    return {"statement_timeout": str(statement_timeout_ms), "jit": "off", "work_mem": "64MB"}


def async_engine(
    database_url: str,
    *,
    pool_size: int = 10,
    max_overflow: int = 5,
    pool_timeout: float = 5.0,
    statement_timeout_ms: int = 10_000,
    application_name: str = "salon-reports",
    transaction_pooling: bool = False,
) -> AsyncEngine:
    """The pooled engine of the app.

    With ``transaction_pooling`` (a PgBouncer in ``pool_mode = transaction`` in front of the
    server) consecutive transactions of one connection may run on different server sessions:
    the settings are then set in every transaction (``set_config(..., true)``, i.e. ``SET
    LOCAL``) instead of once as startup options (which PgBouncer does not pass on), and
    psycopg prepares no statements (a prepared statement lives in one server session).
    """
    settings = session_settings(statement_timeout_ms)
    connect_args: dict[str, Any] = {"application_name": application_name, "connect_timeout": 5}
    if transaction_pooling:
        connect_args["prepare_threshold"] = None
    else:
        connect_args["options"] = " ".join(f"-c {name}={value}" for name, value in settings.items())
    engine = create_async_engine(
        database_url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=pool_timeout,
        pool_pre_ping=False,
        pool_recycle=1800,
        connect_args=connect_args,
    )
    if transaction_pooling:
        statement = "SELECT " + ", ".join(
            f"set_config('{name}', '{value}', true)" for name, value in settings.items()
        )

        @event.listens_for(engine.sync_engine, "begin")
        def _set_local(connection: Connection) -> None:
            # On the driver's cursor: one statement, not traced as a query of its own.
            cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                cursor.execute(statement)
            finally:
                cursor.close()

    return engine


def with_database(database_url: str, name: str) -> str:
    """The same server URL pointing at another database."""
    return make_url(database_url).set(database=name).render_as_string(hide_password=False)


def libpq_url(database_url: str) -> str:
    """A plain libpq URL (for psycopg directly) from a SQLAlchemy one."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


def drop_database(admin_dsn: str, name: str) -> None:
    """Drop a database and the change stream's replication slot in it (a slot keeps its
    database from being dropped)."""
    with psycopg.connect(admin_dsn, autocommit=True) as connection:
        for _ in range(100):
            row = connection.execute(
                "SELECT count(*) FILTER (WHERE active_pid IS NOT NULL),"
                " count(pg_terminate_backend(active_pid)) FROM pg_replication_slots"
                " WHERE database = %s",
                (name,),
            ).fetchone()
            if row is None or row[0] == 0:
                break
            time.sleep(0.05)
        connection.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
            " WHERE database = %s",
            (name,),
        )
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
