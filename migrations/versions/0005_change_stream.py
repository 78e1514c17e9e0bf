"""Move report maintenance off the writers' transactions: the change stream replaces the
triggers on ``bookings``.

Until now every write to ``bookings`` ran our statement-level triggers (NOTIFY, the three
first-booking tables, the platform rollups) inside the writer's own transaction: 3.5-60x
slower writes and deadlocks under concurrent writers. From this revision on, the derived tables
are maintained by the service's change-stream consumer, which reads committed changes from a
logical replication slot (wal2json) and folds them outside any writer's transaction
(``service.changes``). This revision:

- drops every trigger and trigger function of 0002, 0003 and 0004;
- sets ``REPLICA IDENTITY FULL`` on ``bookings``, ``services``, ``professionals`` and
  ``salons``, so that an update or delete carries the row's old values to the stream (a move
  must subtract from the old day's counters);
- adds ``client_visit_days`` (each client's UTC visit days, counted; the visit pairs are kept
  from it), filled from ``bookings``;
- adds ``change_stream_position``: one row with the stream's state, its slot and the position
  up to which the derived tables reflect ``bookings``. It starts ``uninitialised``: the first
  consumer (``salon-reports serve``, ``follow`` or ``rollups rebuild``) creates the slot and
  rebuilds the derived tables from one snapshot, so the writes committed between this
  migration and that moment are counted exactly once.

The derived tables are exact when this revision commits (the dropped triggers kept them so
until then, in the same transaction). Downgrading re-creates the triggers, recomputes every
derived table from ``bookings`` and drops the slot (stop the service first: a slot that is in
use cannot be dropped).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import importlib

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

REPLICATED = ("bookings", "services", "professionals", "salons")
UTC_DAY = "(scheduled_at AT TIME ZONE 'UTC')::date"


def _previous(name: str):  # type: ignore[no-untyped-def]
    return importlib.import_module(f"migrations.versions.{name}")


NOTIFY = "0002_bookings_change_notify"
FIRSTS = "0003_first_bookings_and_platform_index"
ROLLUPS = "0004_platform_rollups"


def upgrade() -> None:
    for module in (NOTIFY, FIRSTS, ROLLUPS):
        _previous(module).drop_triggers()
    for table in REPLICATED:
        op.execute(f"ALTER TABLE {table} REPLICA IDENTITY FULL")
    op.execute(
        """
        CREATE TABLE client_visit_days (
            client_id bigint NOT NULL,
            day date NOT NULL,
            bookings integer NOT NULL,
            PRIMARY KEY (client_id, day) INCLUDE (bookings)
        )
        """
    )
    op.execute(
        f"INSERT INTO client_visit_days (client_id, day, bookings)"
        f" SELECT client_id, {UTC_DAY}, count(*) FROM bookings GROUP BY 1, 2"
    )
    op.execute(
        """
        CREATE TABLE change_stream_position (
            singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
            state text NOT NULL CHECK (state IN ('uninitialised', 'current', 'lost')),
            reason text,
            slot_name text,
            applied_lsn pg_lsn,
            rebuild_snapshot pg_snapshot,
            rebuild_lsn pg_lsn,
            changed_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute(
        "INSERT INTO change_stream_position (state, reason) VALUES ('uninitialised',"
        " 'the change stream has not been started yet')"
    )


def downgrade() -> None:
    # The slot goes first: nothing may fold changes into tables the triggers now keep.
    op.execute(
        "SELECT pg_drop_replication_slot(s.slot_name) FROM change_stream_position p"
        " JOIN pg_replication_slots s ON s.slot_name = p.slot_name"
    )
    op.execute("DROP TABLE change_stream_position")
    op.execute("DROP TABLE client_visit_days")
    for table in REPLICATED:
        op.execute(f"ALTER TABLE {table} REPLICA IDENTITY DEFAULT")
    # Writers wait from here to the commit: the tables are recomputed from one state.
    op.execute("LOCK TABLE bookings IN SHARE MODE")
    firsts, rollups = _previous(FIRSTS), _previous(ROLLUPS)
    for table, keys in firsts.FIRSTS.items():
        columns = ", ".join(keys)
        op.execute(f"DELETE FROM {table}")
        op.execute(
            f"INSERT INTO {table} ({columns}, first_at)"
            f" SELECT {columns}, min(scheduled_at) FROM bookings GROUP BY {columns}"
        )
    for table in rollups.TABLES:
        op.execute(f"DELETE FROM {table}")
    rollups.fill_tables()
    for module in (NOTIFY, FIRSTS, ROLLUPS):
        _previous(module).create_triggers()
