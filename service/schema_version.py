"""Whether the database schema is the one this code was written for (the Alembic head).

The head comes from the migration scripts shipped with the code, read once at start; the
database's revision from its ``alembic_version`` table. ``/readyz`` answers 503 until the two
agree, and the server logs it loudly at start.
"""

from __future__ import annotations

import asyncio
import logging

from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.db import MIGRATIONS_DIR

logger = logging.getLogger("service.schema")

START_CHECK_TIMEOUT_SECONDS = 5.0
MIGRATE_ADVICE = "run `salon-reports migrate`"


def expected_revisions() -> frozenset[str]:
    """The head revision(s) of the migration scripts."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return frozenset(ScriptDirectory.from_config(config).get_heads())


async def database_revisions(connection: AsyncConnection) -> frozenset[str] | None:
    """The revisions recorded in the database; None when it was never migrated."""
    # to_regclass: no error (which would abort the transaction) when the table is missing.
    if not await connection.scalar(text("SELECT to_regclass('alembic_version') IS NOT NULL")):
        return None
    rows = await connection.execute(text("SELECT version_num FROM alembic_version"))
    return frozenset(str(row[0]) for row in rows)


def _names(revisions: frozenset[str]) -> str:
    return ", ".join(sorted(revisions)) or "none"


def schema_problem(current: frozenset[str] | None, expected: frozenset[str]) -> str | None:
    """Why the schema does not fit this code, or None when it is at the head."""
    if current == expected:
        return None
    if current is None:
        return f"the database was never migrated (no alembic_version table); {MIGRATE_ADVICE}"
    return (
        f"the database schema is at revision {_names(current)}, this code needs "
        f"{_names(expected)}; {MIGRATE_ADVICE} with this version"
    )


async def log_schema_state(engine: AsyncEngine, expected: frozenset[str]) -> None:
    """At start: an error in the log when the schema is not at the head (never raises)."""
    try:
        async with asyncio.timeout(START_CHECK_TIMEOUT_SECONDS):
            async with engine.connect() as connection:
                current = await database_revisions(connection)
    except Exception as error:
        logger.warning(
            "could not read the database schema revision at start (%s); /readyz will tell",
            type(error).__name__,
        )
        return
    problem = schema_problem(current, expected)
    if problem is not None:
        logger.error(
            "DATABASE SCHEMA NOT AT HEAD: %s. /readyz answers 503 and reports fail until then.",
            problem,
        )
