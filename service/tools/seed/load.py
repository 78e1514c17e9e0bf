"""Loading a plan into the database: ``seed_database``, one transaction, written with COPY.

Appending: on a database that already has data, new salons, users, professionals, services,
bookings and audit events get ids after the current maxima (no admins are added if some exist),
and the identity sequences are moved past them. ``if_empty`` skips seeding when bookings exist.
Everything happens in one transaction, under locks that let readers carry on.

Speed: rows are produced in tight loops as preformatted COPY text. When ``users``, ``bookings``
or ``audit_events`` is empty, its secondary indexes and unique constraints (and the bookings'
foreign keys) are dropped before the load and recreated from their catalog definitions before
the commit; ``bookings`` and ``audit_events`` are truncated in the same transaction and written
with ``COPY … FREEZE``, so that they are all-visible at once. The tables are vacuumed and
analysed at the end.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from datetime import UTC, date, datetime
from typing import LiteralString

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from service.db import libpq_url
from service.tools.seed.audit import other_audit_lines
from service.tools.seed.bookings import BookingRows
from service.tools.seed.catalog import COPY_BATCH, EMAIL_PREFIX, TABLES
from service.tools.seed.entities import Start, Timestamps
from service.tools.seed.plan import Plan


def seed_database(
    database_url: str,
    *,
    bookings: int,
    salons: int,
    days: int,
    seed: int,
    if_empty: bool = False,
    progress: bool = False,
    today: date | None = None,
) -> str:
    """Generate and load a dataset; returns a one-line summary.

    ``today`` (default: the current UTC date) anchors the period, which ends ``FUTURE_DAYS``
    after it. With ``if_empty`` nothing happens when bookings exist; otherwise new rows are
    appended with ids after the current maxima.
    """
    if bookings < 0 or salons < 1 or days < 1:
        raise ValueError("need bookings >= 0, salons >= 1 and days >= 1")
    started = time.perf_counter()
    today = today or datetime.now(UTC).date()
    with (
        psycopg.connect(libpq_url(database_url)) as connection,
        Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=not progress,
        ) as bar,
    ):
        # EXCLUSIVE: readers carry on, other writers wait until the commit, so the emptiness
        # check and the id ranges below stay true while loading.
        connection.execute(
            "LOCK TABLE salons, users, professionals, services, bookings, audit_events"
            " IN EXCLUSIVE MODE"
        )
        existing = _count(connection, "bookings")
        if if_empty and existing:
            connection.rollback()
            return f"database already has {existing:,} bookings; nothing seeded (--if-empty)"
        plan = Plan(
            random_seed=seed,
            bookings=bookings,
            salons=salons,
            days=days,
            today=today,
            start=_current_maxima(connection),
        )
        counts = _load(plan, connection, bar, bookings_empty=existing == 0)
        connection.commit()
    _vacuum(database_url)
    elapsed = time.perf_counter() - started
    first, last = plan.first_date, plan.last_date
    return (
        f"seeded {counts['bookings']:,} bookings, {counts['salons']:,} salons,"
        f" {counts['professionals']:,} professionals, {counts['services']:,} services,"
        f" {counts['users']:,} users, {counts['audit_events']:,} audit events"
        f" ({first.isoformat()} .. {last.isoformat()}, seed {seed})"
        f" in {elapsed:.1f} s ({counts['bookings'] / max(elapsed, 1e-9):,.0f} bookings/s)"
    )


def _count(connection: psycopg.Connection[TupleRow], table: LiteralString) -> int:
    row = connection.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
    result = row.fetchone()
    return int(result[0]) if result else 0


def _current_maxima(connection: psycopg.Connection[TupleRow]) -> Start:
    row = connection.execute(
        "SELECT (SELECT coalesce(max(id), 0) FROM salons),"
        " (SELECT coalesce(max(id), 0) FROM users),"
        " (SELECT coalesce(max(id), 0) FROM professionals),"
        " (SELECT coalesce(max(id), 0) FROM services),"
        " (SELECT coalesce(max(id), 0) FROM bookings),"
        " (SELECT coalesce(max(id), 0) FROM audit_events),"
        " EXISTS (SELECT 1 FROM users WHERE role = 'admin')"
    ).fetchone()
    assert row is not None
    salons, users, professionals, services, bookings, audit_events = (int(v) for v in row[:6])
    return Start(
        salons=salons,
        users=users,
        professionals=professionals,
        services=services,
        bookings=bookings,
        audit_events=audit_events,
        has_admins=bool(row[6]),
    )


def _load(
    plan: Plan,
    connection: psycopg.Connection[TupleRow],
    bar: Progress,
    *,
    bookings_empty: bool,
) -> dict[str, int]:
    """Plan, then write every table; returns the rows written per table."""
    steps = bar.add_task("planning", total=None)
    counts, client_choices = plan.run()
    bar.remove_task(steps)
    timestamps = Timestamps()

    cursor = connection.cursor()
    cursor.execute("SET LOCAL maintenance_work_mem = '512MB'")
    cursor.execute("SET LOCAL statement_timeout = 0")  # index builds may take a while
    # Bulk loads into empty tables: secondary indexes (and the bookings' foreign keys) are
    # built once at the end rather than maintained row by row.
    deferred: list[sql.SQL | sql.Composed] = []
    freeze: dict[str, bool] = {}
    for table, empty, foreign_keys in (
        ("users", _count(connection, "users") == 0, False),
        ("bookings", bookings_empty, True),
        ("audit_events", _count(connection, "audit_events") == 0, False),
    ):
        if empty:
            restore, freeze[table] = _set_aside(cursor, table, foreign_keys=foreign_keys)
            deferred += restore

    _copy(cursor, "salons", ("id", "name", "timezone", "created_at"), _salon_rows(plan, timestamps))
    _copy(cursor, "users", ("id", "role", "email", "created_at"), _user_rows(plan, timestamps))
    _copy(
        cursor,
        "professionals",
        ("id", "salon_id", "user_id", "name", "is_active", "created_at"),
        _professional_rows(plan, timestamps),
    )
    _copy(
        cursor,
        "services",
        ("id", "salon_id", "category", "name", "price_cents", "duration_min"),
        _service_rows(plan),
    )

    task = bar.add_task("bookings", total=plan.total_bookings)
    rows = BookingRows(plan, timestamps)
    _copy(
        cursor,
        "bookings",
        (
            "id",
            "salon_id",
            "client_id",
            "professional_id",
            "service_id",
            "scheduled_at",
            "status",
            "price_cents",
            "created_at",
            "updated_at",
            "completed_at",
            "cancelled_at",
        ),
        rows.chunks(counts, client_choices, bar, task),
        freeze=freeze.get("bookings", False),
    )
    audit_lines = list(rows.audit.chunks())
    audit_lines.extend(other_audit_lines(plan, rows.audit.last_id, timestamps))
    audit_count = sum(chunk.count("\n") for chunk in audit_lines)
    _copy(
        cursor,
        "audit_events",
        ("id", "entity_type", "entity_id", "event_type", "actor_id", "payload", "created_at"),
        audit_lines,
        freeze=freeze.get("audit_events", False),
    )
    if deferred:
        task = bar.add_task("indexes and constraints", total=len(deferred))
        for statement in deferred:
            cursor.execute(statement)
            bar.advance(task)
    for table in TABLES:
        cursor.execute(
            sql.SQL(
                "SELECT setval(pg_get_serial_sequence({name}, 'id'), coalesce(max(id), 0) + 1,"
                " false) FROM {table}"
            ).format(name=sql.Literal(table), table=sql.Identifier(table))
        )
    return {
        "salons": len(plan.salons),
        "users": len(plan.users),
        "professionals": sum(len(s.professionals) for s in plan.salons),
        "services": sum(len(s.services) for s in plan.salons),
        "bookings": plan.total_bookings,
        "audit_events": audit_count,
    }


def _copy(
    cursor: psycopg.Cursor[TupleRow],
    table: LiteralString,
    columns: tuple[LiteralString, ...],
    chunks: Iterable[str],
    *,
    freeze: bool = False,
) -> None:
    statement = sql.SQL("COPY {table} ({columns}) FROM STDIN{options}").format(
        table=sql.Identifier(table),
        columns=sql.SQL(", ").join(map(sql.Identifier, columns)),
        options=sql.SQL(" WITH (FREEZE)" if freeze else ""),
    )
    with cursor.copy(statement) as copy:
        for chunk in chunks:
            copy.write(chunk)


def _salon_rows(plan: Plan, timestamps: Timestamps) -> Iterator[str]:
    fmt = timestamps.format
    yield "".join(f"{s.id}\t{s.name}\t{s.timezone}\t{fmt(s.created_at)}\n" for s in plan.salons)


def _user_rows(plan: Plan, timestamps: Timestamps) -> Iterator[str]:
    fmt = timestamps.format
    for offset in range(0, len(plan.users), COPY_BATCH):
        yield "".join(
            f"{u.id}\t{u.role}\t{EMAIL_PREFIX[u.role]}{u.id}@example.test\t{fmt(u.created_at)}\n"
            for u in plan.users[offset : offset + COPY_BATCH]
        )


def _professional_rows(plan: Plan, timestamps: Timestamps) -> Iterator[str]:
    fmt = timestamps.format
    for salon in plan.salons:
        yield "".join(
            f"{p.id}\t{salon.id}\t{plan.users[p.user].id}\t{p.name}"
            f"\t{'t' if p.end_day >= plan.days else 'f'}\t{fmt(p.created_at)}\n"
            for p in salon.professionals
        )


def _service_rows(plan: Plan) -> Iterator[str]:
    for salon in plan.salons:
        yield "".join(
            f"{s.id}\t{salon.id}\t{salon.categories[s.category]}\t{s.name}"
            f"\t{s.price_cents}\t{s.duration_min}\n"
            for s in salon.services
        )


def _set_aside(
    cursor: psycopg.Cursor[TupleRow], table: LiteralString, *, foreign_keys: bool
) -> tuple[list[sql.SQL | sql.Composed], bool]:
    """Drop what slows a bulk load into the empty ``table`` and truncate it for COPY FREEZE.

    Set aside: every index but the primary key, unique constraints no foreign key relies on,
    and (with ``foreign_keys``) the table's own foreign keys. Returns the statements that put
    them back, from their catalog definitions, and whether the table could be truncated
    (nothing may reference it), which COPY FREEZE requires.
    """
    restore: list[sql.SQL | sql.Composed] = []
    name = sql.Identifier(table)
    indexes = cursor.execute(
        "SELECT i.relname, pg_get_indexdef(x.indexrelid) FROM pg_index x"
        " JOIN pg_class i ON i.oid = x.indexrelid"
        " WHERE x.indrelid = %s::regclass"
        " AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid)"
        " ORDER BY i.relname",
        (table,),
    ).fetchall()
    constraints = cursor.execute(
        "SELECT c.conname, pg_get_constraintdef(c.oid) FROM pg_constraint c"
        " WHERE c.conrelid = %(table)s::regclass"
        " AND (c.contype = 'f' AND %(foreign_keys)s"
        "  OR c.contype = 'u' AND NOT EXISTS (SELECT 1 FROM pg_constraint f"
        "   WHERE f.contype = 'f' AND f.confrelid = c.conrelid AND f.conindid = c.conindid))"
        " ORDER BY c.contype DESC, c.conname",
        {"table": table, "foreign_keys": foreign_keys},
    ).fetchall()
    for index_name, _ in indexes:
        cursor.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(index_name)))
    for constraint_name, _ in constraints:
        cursor.execute(
            sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                name, sql.Identifier(constraint_name)
            )
        )
    # TRUNCATE needs nothing to reference the table; then COPY can write frozen rows.
    referenced = cursor.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE confrelid = %s::regclass)", (table,)
    ).fetchone()
    truncated = bool(referenced and not referenced[0])
    if truncated:
        cursor.execute(sql.SQL("TRUNCATE {}").format(name))
    # The definitions come from the catalog, not from user input.
    restore += [sql.SQL(definition) for _, definition in indexes]
    restore += [
        sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
            name, sql.Identifier(constraint_name), sql.SQL(definition)
        )
        for constraint_name, definition in constraints
    ]
    return restore, truncated


def _vacuum(database_url: str) -> None:
    """Visibility map and statistics, so index-only scans and plans are right at once."""
    with psycopg.connect(libpq_url(database_url), autocommit=True) as connection:
        connection.execute(
            sql.SQL("VACUUM (ANALYZE) {}").format(sql.SQL(", ").join(map(sql.Identifier, TABLES)))
        )
