"""Platform-wide rollups: per UTC hour, per (day or month, service), per (day or month,
professional), and the client visit pairs that count distinct clients exactly.

Platform-wide reports read every booking of the period: a year is ~900,000 rows on 1 M
bookings, 1.7 to 2.0 s however good the index. These tables hold the same figures pre-aggregated,
kept exact by statement-level triggers on ``bookings`` (whoever writes, in the same
transaction), so a platform-wide year reads a few tens of thousands of small rows instead.
Platform-wide reports use the UTC calendar (docs/api.md, "Report definitions"), so every bucket is a UTC day, hour or
month.

- ``platform_day_rollups (day)``: bookings per status and completed revenue; gives the totals
  and the daily / weekly / monthly series. ``platform_hour_rollups (day, hour)``: the same per
  UTC hour, for the split by hour.
- ``service_day_rollups (day, service_id)`` and ``service_month_rollups (month, service_id)``:
  the same per service; a period reads its whole months from the monthly table and its ragged
  edges from the daily one (top services, split by category).
- ``professional_day_rollups`` / ``professional_month_rollups``: the same per professional
  (the revenue ranking of every professional).
- ``client_visit_pairs (day, prev_day)``: for each day a client has a booking on, the previous
  such day of the same client (``-infinity`` for the first), counted. A client has a booking in
  [A, B] exactly when exactly one of its visit days d in [A, B] has prev_day < A (the first
  one), so ``sum(clients) WHERE day BETWEEN A AND B AND prev_day < A`` is the exact number of
  distinct clients, and with ``prev_day = '-infinity'`` the number of new ones. ~63,000 rows for
  1 M bookings.

Counters are maintained with deltas (+1 per new row, -1 per old row), which commute, so
concurrent writers need nothing more than the row locks of the upsert. Visit pairs depend on
each client's other visits, so the trigger takes a transaction-scoped advisory lock per
affected client (one exclusive lock for bulk writes of more than 64 clients) before it reads
them; with READ COMMITTED writers (PostgreSQL's default) the next statement then sees every
committed visit of those clients. Writers running REPEATABLE READ or SERIALIZABLE would not,
so writers of ``bookings`` must use READ COMMITTED.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

STATUSES = ("pending", "confirmed", "completed", "cancelled", "no_show")
UTC_DAY = "(scheduled_at AT TIME ZONE 'UTC')::date"

# table: (key column, its type, its expression over a booking row)
COUNTERS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "platform_day_rollups": (("day", "date", UTC_DAY),),
    "platform_hour_rollups": (
        ("day", "date", UTC_DAY),
        ("hour", "smallint", "extract(hour FROM scheduled_at AT TIME ZONE 'UTC')::smallint"),
    ),
    "service_day_rollups": (
        ("day", "date", UTC_DAY),
        ("service_id", "bigint", "service_id"),
    ),
    "service_month_rollups": (
        ("month", "date", "date_trunc('month', scheduled_at AT TIME ZONE 'UTC')::date"),
        ("service_id", "bigint", "service_id"),
    ),
    "professional_day_rollups": (
        ("day", "date", UTC_DAY),
        ("professional_id", "bigint", "professional_id"),
    ),
    "professional_month_rollups": (
        ("month", "date", "date_trunc('month', scheduled_at AT TIME ZONE 'UTC')::date"),
        ("professional_id", "bigint", "professional_id"),
    ),
}
TABLES = (*COUNTERS, "client_visit_pairs")

# Advisory lock keys (two-int form) of the visit-pair maintenance: ('S','R','V','P')
# shared/exclusive for the whole table, ('S','R','V','C') per client.
VISITS_LOCK = 0x53525650
CLIENT_LOCK = 0x53525643
BULK_CLIENTS = 64

TRANSITIONS = {
    "insert": ("new_rows",),
    "update": ("new_rows", "old_rows"),
    "delete": ("old_rows",),
}


def _changes(sources: tuple[str, ...]) -> str:
    """Every changed booking with +1 (its new version) or -1 (its old one); ``bookings``, for
    the first fill, counts every booking once."""
    columns = "scheduled_at, status, price_cents, service_id, professional_id"
    signs = {"new_rows": 1, "old_rows": -1, "bookings": 1}
    return " UNION ALL ".join(
        f"SELECT {signs[source]} AS sign, {columns} FROM {source}" for source in sources
    )


def _counter_upsert(table: str, sources: tuple[str, ...]) -> str:
    keys = COUNTERS[table]
    names = ", ".join(name for name, _, _ in keys)
    expressions = ", ".join(f"{expression} AS {name}" for name, _, expression in keys)
    sums = ", ".join(
        f"coalesce(sum(sign) FILTER (WHERE status = '{status}'), 0)::int AS {status}"
        for status in STATUSES
    )
    values = [*STATUSES, "revenue_cents"]
    return f"""
        INSERT INTO {table} AS t ({names}, {", ".join(values)})
        SELECT * FROM (
            SELECT {names}, {sums},
                   coalesce(sum(sign * price_cents) FILTER (WHERE status = 'completed'), 0)
                       AS revenue_cents
            FROM (SELECT sign, status, price_cents, {expressions}
                  FROM ({_changes(sources)}) AS c) AS keyed
            GROUP BY {names}
        ) AS delta
        WHERE {" OR ".join(f"{value} <> 0" for value in values)}
        ORDER BY {names}
        ON CONFLICT ({names}) DO UPDATE SET
            {", ".join(f"{value} = t.{value} + EXCLUDED.{value}" for value in values)};
    """


def _visit_days(alias: str) -> str:
    return f"({alias}.scheduled_at AT TIME ZONE 'UTC')::date"


def _visit_pairs_update(sources: tuple[str, ...]) -> str:
    """Recount the visit pairs of the clients whose visit days may have changed.

    A client's pairs before the statement come from its bookings as they were (the table now,
    without this statement's new versions, plus its old ones), after from the table now; the
    difference is applied.
    """
    identity = f"id, client_id, {UTC_DAY} AS day"
    if sources == ("new_rows", "old_rows"):
        # an update moves visit days only when it changes the client or the day
        touched = f"""
            (SELECT {identity} FROM new_rows EXCEPT SELECT {identity} FROM old_rows)
            UNION (SELECT {identity} FROM old_rows EXCEPT SELECT {identity} FROM new_rows)
        """
    else:
        touched = f"SELECT {identity} FROM {sources[0]}"
    before = [
        f"SELECT b.client_id, {_visit_days('b')} AS day FROM bookings b"
        " JOIN affected a ON a.client_id = b.client_id"
        + (
            " WHERE NOT EXISTS (SELECT FROM new_rows n WHERE n.id = b.id)"
            if "new_rows" in sources
            else ""
        )
    ]
    if "old_rows" in sources:
        before.append(
            f"SELECT o.client_id, {_visit_days('o')} AS day FROM old_rows o"
            " JOIN affected a ON a.client_id = o.client_id"
        )
    pairs = "coalesce(lag(day) OVER (PARTITION BY client_id ORDER BY day), '-infinity')"
    return f"""
        SELECT array_agg(DISTINCT client_id ORDER BY client_id) INTO changed_clients
        FROM ({touched}) AS touched;
        IF changed_clients IS NULL THEN
            RETURN NULL;
        END IF;
        IF cardinality(changed_clients) > {BULK_CLIENTS} THEN
            PERFORM pg_advisory_xact_lock({VISITS_LOCK}, 0);
        ELSE
            PERFORM pg_advisory_xact_lock_shared({VISITS_LOCK}, 0);
            FOREACH changed_client IN ARRAY changed_clients LOOP
                PERFORM pg_advisory_xact_lock({CLIENT_LOCK}, (changed_client % 2147483647)::int);
            END LOOP;
        END IF;
        -- a new statement, so a new snapshot: every committed visit of these clients
        WITH affected AS (SELECT unnest(changed_clients) AS client_id),
        days_after AS (
            SELECT DISTINCT b.client_id, {_visit_days("b")} AS day
            FROM bookings b JOIN affected a ON a.client_id = b.client_id
        ),
        days_before AS (
            SELECT DISTINCT client_id, day FROM ({" UNION ALL ".join(before)}) AS d
        ),
        pairs AS (
            SELECT day, {pairs} AS prev_day, 1 AS sign FROM days_after
            UNION ALL
            SELECT day, {pairs} AS prev_day, -1 AS sign FROM days_before
        )
        INSERT INTO client_visit_pairs AS t (day, prev_day, clients)
        SELECT day, prev_day, sum(sign)::int FROM pairs
        GROUP BY day, prev_day HAVING sum(sign) <> 0
        ORDER BY day, prev_day
        ON CONFLICT (day, prev_day) DO UPDATE SET clients = t.clients + EXCLUDED.clients;
    """


def _create_tables() -> None:
    counts = ", ".join(f"{status} integer NOT NULL DEFAULT 0" for status in STATUSES)
    for table, keys in COUNTERS.items():
        names = ", ".join(name for name, _, _ in keys)
        columns = ", ".join(f"{name} {kind} NOT NULL" for name, kind, _ in keys)
        values = ", ".join([*STATUSES, "revenue_cents"])
        op.execute(
            f"""
            CREATE TABLE {table} (
                {columns}, {counts}, revenue_cents bigint NOT NULL DEFAULT 0,
                PRIMARY KEY ({names}) INCLUDE ({values})  -- index-only range scans
            )
            """
        )
    op.execute(
        """
        CREATE TABLE client_visit_pairs (
            day date NOT NULL,
            prev_day date NOT NULL,
            clients integer NOT NULL,
            PRIMARY KEY (day, prev_day) INCLUDE (clients)
        )
        """
    )


def fill_tables() -> None:
    for table in COUNTERS:
        op.execute(_counter_upsert(table, ("bookings",)))
    op.execute(
        f"""
        INSERT INTO client_visit_pairs (day, prev_day, clients)
        SELECT day, prev_day, count(*) FROM (
            SELECT day,
                   coalesce(lag(day) OVER (PARTITION BY client_id ORDER BY day), '-infinity')
                       AS prev_day
            FROM (SELECT DISTINCT client_id, {UTC_DAY} AS day FROM bookings) AS days
        ) AS pairs
        GROUP BY day, prev_day
        """
    )


def create_triggers() -> None:
    """The statement-level triggers that keep the rollups exact (also re-created by 0005's
    downgrade)."""
    for event, sources in TRANSITIONS.items():
        counters = "\n".join(_counter_upsert(table, sources) for table in COUNTERS)
        op.execute(
            f"""
            CREATE FUNCTION bookings_rollups_{event}() RETURNS trigger LANGUAGE plpgsql AS $$
            DECLARE
                changed_clients bigint[];
                changed_client bigint;
            BEGIN
                {counters}
                {_visit_pairs_update(sources)}
                RETURN NULL;
            END $$;
            """
        )
    op.execute(
        f"""
        CREATE FUNCTION bookings_rollups_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            {" ".join(f"DELETE FROM {table};" for table in TABLES)}
            RETURN NULL;
        END $$;
        CREATE TRIGGER bookings_rollups_insert AFTER INSERT ON bookings
            REFERENCING NEW TABLE AS new_rows
            FOR EACH STATEMENT EXECUTE FUNCTION bookings_rollups_insert();
        CREATE TRIGGER bookings_rollups_update AFTER UPDATE ON bookings
            REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
            FOR EACH STATEMENT EXECUTE FUNCTION bookings_rollups_update();
        CREATE TRIGGER bookings_rollups_delete AFTER DELETE ON bookings
            REFERENCING OLD TABLE AS old_rows
            FOR EACH STATEMENT EXECUTE FUNCTION bookings_rollups_delete();
        CREATE TRIGGER bookings_rollups_truncate AFTER TRUNCATE ON bookings
            FOR EACH STATEMENT EXECUTE FUNCTION bookings_rollups_truncate();
        """
    )


def drop_triggers() -> None:
    for event in (*TRANSITIONS, "truncate"):
        op.execute(f"DROP TRIGGER IF EXISTS bookings_rollups_{event} ON bookings")
        op.execute(f"DROP FUNCTION IF EXISTS bookings_rollups_{event}()")


def upgrade() -> None:
    _create_tables()
    fill_tables()
    create_triggers()
    # A platform-wide page of professionals counts its clients from here (index-only).
    op.execute(
        "CREATE INDEX idx_bookings_professional_scheduled_covering"
        " ON bookings (professional_id, scheduled_at) INCLUDE (client_id, status)"
    )


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS idx_bookings_professional_scheduled_covering")
    drop_triggers()
    for table in TABLES:
        op.execute(f"DROP TABLE IF EXISTS {table}")
