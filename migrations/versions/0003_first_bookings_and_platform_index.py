"""First bookings per client, per (salon, client) and per (professional, client); a covering
index for platform-wide periods.

"New clients" (first booking ever in scope falls in the period) and "returning clients" of a
professional were computed with one index probe per client of the period: 80,000 probes for a
platform-wide month on 1 M bookings. These tables hold each first booking, kept exact by
statement-level triggers on ``bookings`` (whoever writes), so the reports count new clients
with one index range scan. A client is new in [start, end) exactly when its first booking is
in [start, end).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# table, its key columns
FIRSTS = {
    "client_first_bookings": ("client_id",),
    "salon_client_first_bookings": ("salon_id", "client_id"),
    "professional_client_first_bookings": ("professional_id", "client_id"),
}


def _refresh_sql(table: str, keys: tuple[str, ...], source: str) -> str:
    """Recompute the first booking of every key that appears in ``source``."""
    columns = ", ".join(keys)
    match = " AND ".join(f"f.{k} = a.{k}" for k in keys)
    match_b = " AND ".join(f"b.{k} = a.{k}" for k in keys)
    return f"""
        WITH affected AS (SELECT DISTINCT {columns} FROM {source}),
        recomputed AS (
            SELECT a.*, (SELECT min(b.scheduled_at) FROM bookings b WHERE {match_b}) AS first_at
            FROM affected a
        ),
        gone AS (
            DELETE FROM {table} f USING recomputed a
            WHERE {match} AND a.first_at IS NULL
        )
        INSERT INTO {table} ({columns}, first_at)
        SELECT {columns}, first_at FROM recomputed WHERE first_at IS NOT NULL
        ON CONFLICT ({columns}) DO UPDATE SET first_at = EXCLUDED.first_at;
    """


def _insert_sql(table: str, keys: tuple[str, ...]) -> str:
    columns = ", ".join(keys)
    return f"""
        INSERT INTO {table} ({columns}, first_at)
        SELECT {columns}, min(scheduled_at) FROM new_rows GROUP BY {columns}
        ON CONFLICT ({columns}) DO UPDATE
            SET first_at = LEAST({table}.first_at, EXCLUDED.first_at);
    """


def upgrade() -> None:
    for table, keys in FIRSTS.items():
        columns = ", ".join(keys)
        op.execute(
            f"""
            CREATE TABLE {table} (
                {", ".join(f"{k} bigint NOT NULL" for k in keys)},
                first_at timestamptz NOT NULL,
                PRIMARY KEY ({columns})
            )
            """
        )
        op.execute(
            f"INSERT INTO {table} ({columns}, first_at) "
            f"SELECT {columns}, min(scheduled_at) FROM bookings GROUP BY {columns}"
        )
    op.execute("CREATE INDEX idx_client_first_bookings_first ON client_first_bookings (first_at)")
    op.execute(
        "CREATE INDEX idx_salon_client_first_bookings_first"
        " ON salon_client_first_bookings (salon_id, first_at)"
    )
    op.execute(
        "CREATE INDEX idx_professional_client_first_bookings_first"
        " ON professional_client_first_bookings (first_at) INCLUDE (professional_id)"
    )
    op.execute(
        "CREATE INDEX idx_professional_client_first_bookings_professional"
        " ON professional_client_first_bookings (professional_id, first_at)"
    )

    create_triggers()
    # Platform-wide periods: an index-only scan by time, like the per-salon covering index.
    op.execute(
        "CREATE INDEX idx_bookings_scheduled_covering ON bookings (scheduled_at)"
        " INCLUDE (salon_id, status, price_cents, client_id, service_id, professional_id)"
    )


def create_triggers() -> None:
    """The statement-level triggers that keep the tables exact (also re-created by 0005's
    downgrade)."""
    on_insert = "\n".join(_insert_sql(t, k) for t, k in FIRSTS.items())
    on_change_old = "\n".join(_refresh_sql(t, k, "old_rows") for t, k in FIRSTS.items())
    on_change_both = "\n".join(
        _refresh_sql(
            t,
            k,
            f"(SELECT {', '.join(k)} FROM old_rows UNION SELECT {', '.join(k)}"
            f" FROM new_rows) AS both_rows",
        )
        for t, k in FIRSTS.items()
    )
    op.execute(
        f"""
        CREATE FUNCTION bookings_firsts_insert() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            {on_insert}
            RETURN NULL;
        END $$;
        CREATE FUNCTION bookings_firsts_update() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            {on_change_both}
            RETURN NULL;
        END $$;
        CREATE FUNCTION bookings_firsts_delete() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            {on_change_old}
            RETURN NULL;
        END $$;
        CREATE FUNCTION bookings_firsts_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            {" ".join(f"DELETE FROM {table};" for table in FIRSTS)}
            RETURN NULL;
        END $$;
        CREATE TRIGGER bookings_firsts_insert AFTER INSERT ON bookings
            REFERENCING NEW TABLE AS new_rows
            FOR EACH STATEMENT EXECUTE FUNCTION bookings_firsts_insert();
        CREATE TRIGGER bookings_firsts_update AFTER UPDATE ON bookings
            REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
            FOR EACH STATEMENT EXECUTE FUNCTION bookings_firsts_update();
        CREATE TRIGGER bookings_firsts_delete AFTER DELETE ON bookings
            REFERENCING OLD TABLE AS old_rows
            FOR EACH STATEMENT EXECUTE FUNCTION bookings_firsts_delete();
        CREATE TRIGGER bookings_firsts_truncate AFTER TRUNCATE ON bookings
            FOR EACH STATEMENT EXECUTE FUNCTION bookings_firsts_truncate();
        """
    )


def drop_triggers() -> None:
    for name in ("insert", "update", "delete", "truncate"):
        op.execute(f"DROP TRIGGER IF EXISTS bookings_firsts_{name} ON bookings")
        op.execute(f"DROP FUNCTION IF EXISTS bookings_firsts_{name}()")


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS idx_bookings_scheduled_covering")
    drop_triggers()
    for table in FIRSTS:
        op.execute(f"DROP TABLE IF EXISTS {table}")
