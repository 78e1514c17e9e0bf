"""Notify listeners of every change to bookings: one NOTIFY per statement with the salon ids.

Any writer (the app, a batch job, psql) fires these statement-level triggers, so the
service's cache invalidation does not depend on who wrote. Transition tables keep a bulk
COPY or UPDATE to one notification listing the distinct salons touched.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

CHANNEL = "bookings_changed"


def upgrade() -> None:
    create_triggers()


def create_triggers() -> None:
    """The NOTIFY triggers (also re-created by 0005's downgrade)."""
    op.execute(
        f"""
        CREATE FUNCTION notify_bookings_changed() RETURNS trigger
        LANGUAGE plpgsql AS $$
        DECLARE
            salon_list text;
        BEGIN
            IF TG_OP = 'INSERT' THEN
                SELECT string_agg(DISTINCT salon_id::text, ',') INTO salon_list FROM new_rows;
            ELSIF TG_OP = 'DELETE' THEN
                SELECT string_agg(DISTINCT salon_id::text, ',') INTO salon_list FROM old_rows;
            ELSE
                SELECT string_agg(DISTINCT salon_id::text, ',') INTO salon_list
                FROM (SELECT salon_id FROM new_rows UNION SELECT salon_id FROM old_rows) AS s;
            END IF;
            IF salon_list IS NULL THEN
                RETURN NULL;
            END IF;
            -- NOTIFY payloads are limited to 8000 bytes: a huge batch invalidates everything.
            IF length(salon_list) > 7000 THEN
                salon_list := '*';
            END IF;
            PERFORM pg_notify('{CHANNEL}', salon_list);
            RETURN NULL;
        END
        $$;
        """
    )
    op.execute(
        """
        CREATE TRIGGER bookings_notify_insert AFTER INSERT ON bookings
            REFERENCING NEW TABLE AS new_rows
            FOR EACH STATEMENT EXECUTE FUNCTION notify_bookings_changed();
        CREATE TRIGGER bookings_notify_update AFTER UPDATE ON bookings
            REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
            FOR EACH STATEMENT EXECUTE FUNCTION notify_bookings_changed();
        CREATE TRIGGER bookings_notify_delete AFTER DELETE ON bookings
            REFERENCING OLD TABLE AS old_rows
            FOR EACH STATEMENT EXECUTE FUNCTION notify_bookings_changed();
        """
    )
    # TRUNCATE has no transition table: it invalidates everything.
    op.execute(
        f"""
        CREATE FUNCTION notify_bookings_truncated() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('{CHANNEL}', '*');
            RETURN NULL;
        END
        $$;
        CREATE TRIGGER bookings_notify_truncate AFTER TRUNCATE ON bookings
            FOR EACH STATEMENT EXECUTE FUNCTION notify_bookings_truncated();
        """
    )


def downgrade() -> None:
    drop_triggers()


def drop_triggers() -> None:
    for trigger in ("insert", "update", "delete", "truncate"):
        op.execute(f"DROP TRIGGER IF EXISTS bookings_notify_{trigger} ON bookings")
    op.execute("DROP FUNCTION IF EXISTS notify_bookings_changed()")
    op.execute("DROP FUNCTION IF EXISTS notify_bookings_truncated()")
