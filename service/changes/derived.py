"""The tables derived from ``bookings``, and the SQL that keeps each one exact.

Every derived table is defined here twice over: how to fold a batch of booking changes into it
(``fold_statements``, run by the change-stream consumer) and how to compute it from scratch
(``recompute_sql``, used by ``rollups rebuild`` and ``rollups verify``). The writers of
``bookings`` never touch these tables.

- Counters (``platform_day_rollups``, ``platform_hour_rollups``, ``service_day_rollups``,
  ``service_month_rollups``, ``professional_day_rollups``, ``professional_month_rollups``):
  bookings per status and completed revenue per UTC bucket. Folded as deltas (+1 for a row's
  new version, -1 for its old one); exact because every change is applied exactly once (the
  position advances in the same transaction, see ``service.changes.stream``).
- ``client_visit_days (client_id, day, bookings)``: each client's UTC visit days, counted; also
  deltas. ``client_visit_pairs (day, prev_day, clients)`` is derived from it: the clients whose
  visit days moved lose their old pairs and gain their new ones, both read from
  ``client_visit_days`` in the same transaction, so the pairs always match the days.
- First bookings (``client_first_bookings``, ``salon_client_first_bookings``,
  ``professional_client_first_bookings``): the earliest ``scheduled_at`` per key. A new version
  earlier than the stored one replaces it; a key that lost the version holding its first
  booking is recomputed from ``bookings``. A recomputation sees every commit up to its own
  snapshot; a change committed later reaches the consumer in a later batch and is applied
  again the same way, so each key is exact once the stream has caught up.

Platform-wide figures use the UTC calendar (docs/api.md, "Report definitions").
"""

from __future__ import annotations

import functools

STATUSES = ("pending", "confirmed", "completed", "cancelled", "no_show")
VALUES = (*STATUSES, "revenue_cents")

UTC_TIME = "scheduled_at AT TIME ZONE 'UTC'"
UTC_DAY = f"({UTC_TIME})::date"
UTC_MONTH = f"date_trunc('month', {UTC_TIME})::date"

# counter table: its key columns and their expressions over a booking row
COUNTERS: dict[str, tuple[tuple[str, str], ...]] = {
    "platform_day_rollups": (("day", UTC_DAY),),
    "platform_hour_rollups": (
        ("day", UTC_DAY),
        ("hour", f"extract(hour FROM {UTC_TIME})::smallint"),
    ),
    "service_day_rollups": (("day", UTC_DAY), ("service_id", "service_id")),
    "service_month_rollups": (("month", UTC_MONTH), ("service_id", "service_id")),
    "professional_day_rollups": (("day", UTC_DAY), ("professional_id", "professional_id")),
    "professional_month_rollups": (("month", UTC_MONTH), ("professional_id", "professional_id")),
}

# first-booking table: its key columns
FIRSTS: dict[str, tuple[str, ...]] = {
    "client_first_bookings": ("client_id",),
    "salon_client_first_bookings": ("salon_id", "client_id"),
    "professional_client_first_bookings": ("professional_id", "client_id"),
}

VISIT_TABLES = ("client_visit_days", "client_visit_pairs")
TABLES = (*COUNTERS, *VISIT_TABLES, *FIRSTS)

# The batch being folded, netted (see stream.py): one row per distinct booking version with
# ``n``, the number of times it was added (+) or removed (-) in the batch, never 0.
BATCH = "stream_delta"
DELTA = f"SELECT * FROM {BATCH}"
# First-booking versions the batch's transactions added (n = +1) or removed (n = -1), each
# transaction netted on its own (see ``stream.Batch``).
FIRSTS_BATCH = "stream_firsts"


# -- counters ------------------------------------------------------------------------------


def _counter_rows(source: str, keys: tuple[tuple[str, str], ...], signed: bool) -> str:
    """Per key of ``keys``: the status counts and completed revenue of ``source``'s rows."""
    names = ", ".join(name for name, _ in keys)
    expressions = ", ".join(f"{expression} AS {name}" for name, expression in keys)
    weight = "n" if signed else "1"
    sums = ", ".join(
        f"coalesce(sum({weight}) FILTER (WHERE status = '{status}'), 0)::int AS {status}"
        for status in STATUSES
    )
    revenue = (
        f"coalesce(sum({weight} * price_cents) FILTER (WHERE status = 'completed'), 0)::bigint"
        " AS revenue_cents"
    )
    n = "n, " if signed else ""
    return f"""
        SELECT {names}, {sums}, {revenue}
        FROM (SELECT {n}status, price_cents, {expressions} FROM ({source}) AS s) AS keyed
        GROUP BY {names}
    """


def fold_counter(table: str) -> str:
    keys = COUNTERS[table]
    names = ", ".join(name for name, _ in keys)
    nonzero = " OR ".join(f"{value} <> 0" for value in VALUES)
    return f"""
        INSERT INTO {table} AS t ({names}, {", ".join(VALUES)})
        SELECT * FROM ({_counter_rows(DELTA, keys, signed=True)}) AS delta
        WHERE {nonzero}
        ORDER BY {names}
        ON CONFLICT ({names}) DO UPDATE SET
            {", ".join(f"{value} = t.{value} + EXCLUDED.{value}" for value in VALUES)}
    """


def recompute_counter(table: str) -> str:
    return _counter_rows("SELECT * FROM bookings", COUNTERS[table], signed=False)


# -- visit days and pairs ----------------------------------------------------------------------

_PREV_DAY = "coalesce(lag(day) OVER (PARTITION BY client_id ORDER BY day), '-infinity')"

# The pairs change only where a client's set of visit days changes: the pairs of the moved
# clients before (from client_visit_days) and after (the same plus the batch's deltas) are
# compared, and only the difference is written; then the days themselves are updated.
FOLD_VISITS = (
    f"""
    WITH delta AS (
        SELECT client_id, {UTC_DAY} AS day, sum(n)::int AS bookings
        FROM ({DELTA}) AS b GROUP BY 1, 2 HAVING sum(n) <> 0
    ),
    moved AS (  -- clients with a day that appears or disappears; the others keep their pairs
        SELECT DISTINCT delta.client_id FROM delta
        LEFT JOIN client_visit_days AS held
            ON held.client_id = delta.client_id AND held.day = delta.day
        WHERE (coalesce(held.bookings, 0) > 0) <> (coalesce(held.bookings, 0) + delta.bookings > 0)
    ),
    before AS (
        SELECT client_id, day, bookings FROM client_visit_days
        WHERE client_id IN (SELECT client_id FROM moved)
    ),
    after AS (
        SELECT client_id, day FROM (
            SELECT client_id, day, sum(bookings) AS bookings
            FROM (
                SELECT * FROM before
                UNION ALL
                SELECT * FROM delta WHERE client_id IN (SELECT client_id FROM moved)
            ) AS both_days
            GROUP BY 1, 2
        ) AS summed WHERE bookings > 0
    ),
    pairs AS (
        SELECT day, {_PREV_DAY} AS prev_day, -1 AS sign FROM before
        UNION ALL
        SELECT day, {_PREV_DAY} AS prev_day, 1 AS sign FROM after
    )
    INSERT INTO client_visit_pairs AS t (day, prev_day, clients)
    SELECT day, prev_day, sum(sign)::int FROM pairs
    GROUP BY day, prev_day HAVING sum(sign) <> 0
    ORDER BY day, prev_day
    ON CONFLICT (day, prev_day) DO UPDATE SET clients = t.clients + EXCLUDED.clients
    """,
    f"""
    INSERT INTO client_visit_days AS t (client_id, day, bookings)
    SELECT client_id, {UTC_DAY}, sum(n) FROM ({DELTA}) AS b
    GROUP BY 1, 2 HAVING sum(n) <> 0
    ORDER BY 1, 2
    ON CONFLICT (client_id, day) DO UPDATE SET bookings = t.bookings + EXCLUDED.bookings
    """,
    f"""
    DELETE FROM client_visit_days d USING (
        SELECT DISTINCT client_id, {UTC_DAY} AS day FROM ({DELTA}) AS b
    ) AS touched
    WHERE d.client_id = touched.client_id AND d.day = touched.day AND d.bookings = 0
    """,
)

RECOMPUTE_VISIT_DAYS = (
    f"SELECT client_id, {UTC_DAY} AS day, count(*)::int AS bookings FROM bookings GROUP BY 1, 2"
)
RECOMPUTE_VISIT_PAIRS = f"""
    SELECT day, prev_day, count(*)::int AS clients FROM (
        SELECT day, {_PREV_DAY} AS prev_day
        FROM (SELECT DISTINCT client_id, {UTC_DAY} AS day FROM bookings) AS days
    ) AS pairs
    GROUP BY day, prev_day
"""


# -- first bookings ------------------------------------------------------------------------------


def fold_first(table: str) -> tuple[str, str]:
    """Two statements: a new version earlier than the key's first booking becomes it; then the
    keys that lost the version holding their first booking (or never had one) are recomputed
    from ``bookings``. The second reads the table as it is now, which may already hold later
    changes; each of those comes in a later batch and is applied the same way, so the stored
    first booking is exact once the stream has caught up."""
    keys = FIRSTS[table]
    columns = ", ".join(keys)
    on_table = " AND ".join(f"f.{key} = r.{key}" for key in keys)
    on_bookings = " AND ".join(f"b.{key} = a.{key}" for key in keys)
    on_removed = " AND ".join(f"f.{key} = o.{key}" for key in keys)
    earlier = f"""
        INSERT INTO {table} AS t ({columns}, first_at)
        SELECT {columns}, min(scheduled_at) FROM {FIRSTS_BATCH} WHERE n > 0
        GROUP BY {columns}
        ORDER BY {columns}
        ON CONFLICT ({columns}) DO UPDATE SET first_at = EXCLUDED.first_at
            WHERE EXCLUDED.first_at < t.first_at
    """
    recount = f"""
        WITH affected AS (
            SELECT DISTINCT {columns} FROM {FIRSTS_BATCH} AS o
            WHERE n < 0 AND NOT EXISTS (
                SELECT FROM {table} f WHERE {on_removed} AND f.first_at < o.scheduled_at
            )
        ),
        recomputed AS (
            SELECT a.*, (SELECT min(b.scheduled_at) FROM bookings b WHERE {on_bookings})
                AS first_at
            FROM affected a
        ),
        gone AS (
            DELETE FROM {table} f USING recomputed r WHERE {on_table} AND r.first_at IS NULL
        )
        INSERT INTO {table} AS t ({columns}, first_at)
        SELECT {columns}, first_at FROM recomputed WHERE first_at IS NOT NULL
        ORDER BY {columns}
        ON CONFLICT ({columns}) DO UPDATE SET first_at = EXCLUDED.first_at
            WHERE t.first_at IS DISTINCT FROM EXCLUDED.first_at  -- most changes keep it
    """
    return earlier, recount


def recompute_first(table: str) -> str:
    columns = ", ".join(FIRSTS[table])
    return f"SELECT {columns}, min(scheduled_at) AS first_at FROM bookings GROUP BY {columns}"


# -- a batch -------------------------------------------------------------------------------------


@functools.cache
def fold_script(*, truncated: bool, versions: bool, firsts: bool) -> str:
    """Every statement that folds a batch, as one script (no parameters: one round trip).

    ``truncated``: bookings were truncated in the batch, so the derived tables start from empty;
    ``versions``: the batch's netted versions are in ``BATCH`` (counters and visit days);
    ``firsts``: first-booking versions are in ``FIRSTS_BATCH``."""
    statements: list[str] = []
    if truncated:
        statements += [f"DELETE FROM {table}" for table in TABLES]
    if versions:
        statements += [fold_counter(table) for table in COUNTERS]
        statements += FOLD_VISITS
    if firsts:
        for table in FIRSTS:
            statements += fold_first(table)
    return ";\n".join(statements)


# -- whole tables ----------------------------------------------------------------------------------


def recompute_sql(table: str) -> str:
    """``table`` computed from ``bookings`` from scratch (rows in the table's column order)."""
    if table in COUNTERS:
        return recompute_counter(table)
    if table in FIRSTS:
        return recompute_first(table)
    if table == "client_visit_days":
        return RECOMPUTE_VISIT_DAYS
    assert table == "client_visit_pairs", table
    return RECOMPUTE_VISIT_PAIRS


def stored_sql(table: str) -> str:
    """What ``table`` holds, in the same columns as ``recompute_sql`` and without the rows
    that mean nothing (a counter that went back to zero may stay)."""
    if table in COUNTERS:
        names = ", ".join(name for name, _ in COUNTERS[table])
        nonzero = " OR ".join(f"{value} <> 0" for value in VALUES)
        return f"SELECT {names}, {', '.join(VALUES)} FROM {table} WHERE {nonzero}"
    if table in FIRSTS:
        return f"SELECT {', '.join(FIRSTS[table])}, first_at FROM {table}"
    if table == "client_visit_days":
        return "SELECT client_id, day, bookings FROM client_visit_days"
    # pairs that went back to zero stay, like counters
    return "SELECT day, prev_day, clients FROM client_visit_pairs WHERE clients <> 0"


def columns_of(table: str) -> str:
    if table in COUNTERS:
        return ", ".join([*(name for name, _ in COUNTERS[table]), *VALUES])
    if table in FIRSTS:
        return ", ".join([*FIRSTS[table], "first_at"])
    if table == "client_visit_days":
        return "client_id, day, bookings"
    return "day, prev_day, clients"
