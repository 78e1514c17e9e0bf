"""The report SQL: one statement per report, nothing else.

Each report is a single PostgreSQL statement (CTEs, ``FILTER``, window functions) that reads
the period once through the covering index ``idx_bookings_salon_scheduled_covering`` and does
every aggregation in the database. Calendar days, weeks, months and hours are the scope's local
ones (``AT TIME ZONE``); the period's bounds are passed as instants computed by
``Period.bounds``. The SQL text is assembled only from the constant fragments below, never from
caller input; every value is a bound parameter.

Platform-wide reports (UTC calendar) read the rollups of migration 0004 instead of the
bookings of the period: the daily platform table for totals and series, the hourly one for
the split by hour, the monthly and daily
service and professional tables for per-service and per-professional totals (whole months
from the monthly table, the ragged edges from the daily one, added, or subtracted from their
whole month when that reads fewer days, see ``rollup_ranges``), and the
client visit pairs for exact distinct and new client counts. A platform-wide year thus reads
tens of thousands of small rows instead of ~900,000 bookings. Two parts stay on ``bookings``:
the ``bookings`` report filtered by professional or service (an index range of one
professional's or service's rows) and the client counts of the professionals on the page.

Every statement ends with a static comment naming its query (``named_statement``:
``/*db.query.summary='report.dashboard'*/``), so the database's own views (logs,
``pg_stat_activity``, ``pg_stat_statements``) name it as its spans and metrics do.

Each function returns plain Python values (dates as ``date``, rates as ``float``) in the shapes
of ``service.reports.schemas``, without ``meta``; ``service.reports.service`` adds the rest.

Longer than the other modules on purpose: every report statement, per salon and platform-wide,
with the fragments they share, is in this one file, so that whoever looks for "the dashboard
SQL" opens one file (the repository file of a polar-style domain folder).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from sqlalchemy import TextClause, text
from sqlalchemy.ext.asyncio import AsyncConnection

from service.reports.names import ReportName
from service.reports.params import (
    STATUSES,
    BookingFilters,
    Granularity,
    Period,
    Scope,
    Status,
)

# The name of each statement in spans, metrics and the stats (``db.query.summary``).
QUERY_NAMES: dict[str, str] = {
    **{str(report): f"report.{report}" for report in ReportName},
    "salon": "salon.lookup",
}

_STATUS_COUNTS = ",\n".join(
    f"count(*) FILTER (WHERE status = '{status}') AS {status}" for status in STATUSES
)
_REVENUE = "coalesce(sum(price_cents) FILTER (WHERE status = 'completed'), 0)"


def _in_scope(scope: Scope, alias: str) -> str:
    return "TRUE" if scope.is_platform else f"{alias}.salon_id = :salon_id"


def _period_rows(scope: Scope, columns: str, extra: str = "") -> str:
    return f"""
        SELECT {columns}
        FROM bookings b
        WHERE {_in_scope(scope, "b")}
          AND b.scheduled_at >= :start_at AND b.scheduled_at < :end_at {extra}
    """


def _bind(scope: Scope, period: Period, **extra: Any) -> dict[str, Any]:
    start_at, end_at = period.bounds(scope.timezone)
    params: dict[str, Any] = {
        "tz": scope.timezone,
        "start_at": start_at,
        "end_at": end_at,
        "start_date": period.start,
        "end_date": period.end,
        **extra,
    }
    if scope.is_platform:
        params.update(rollup_ranges(period))
    else:
        params["salon_id"] = scope.salon_id
    return params


def _next_month(month: date) -> date:
    return (month.replace(day=28) + timedelta(days=4)).replace(day=1)


def rollup_ranges(period: Period) -> dict[str, date]:
    """The period as a run of whole months plus or minus a few single days, half-open each.

    Each ragged end is read whichever way touches fewer days: its own days from the daily
    rollup, or its whole month from the monthly one minus the month's days outside the period
    (subtracted: the counters are plain sums, so this is exact). 2026-01-15 .. 2026-04-10 is
    the days [01-15, 02-01), the months [02-01, 04-01) and the days [04-01, 04-11);
    2025-12-03 .. 2026-12-02 is the months [2025-12-01, 2026-12-01) minus the days
    [12-01, 12-03), plus the days [2026-12-01, 12-03) — 2 + 2 days instead of 29 + 2. A period
    inside one month is its days, or the month minus the days on either side. Empty ranges
    have from = to.
    """
    start, after_end = period.start, period.end + timedelta(days=1)
    start_month, end_month = start.replace(day=1), after_end.replace(day=1)
    head = (start, start)
    tail = (after_end, after_end)
    cut_head = (start, start)
    cut_tail = (after_end, after_end)
    if start_month == end_month:  # inside one month
        month_after = _next_month(start_month)
        inside = (after_end - start).days
        outside = (start - start_month).days + (month_after - after_end).days
        if outside < inside:
            months = (start_month, month_after)
            cut_head, cut_tail = (start_month, start), (after_end, month_after)
        else:
            months, head = (start_month, start_month), (start, after_end)
    else:
        month_from, month_to = start_month, end_month
        if start != start_month:
            month_after = _next_month(start_month)
            if (start - start_month).days < (month_after - start).days:
                cut_head = (start_month, start)
            else:
                month_from, head = month_after, (start, month_after)
        if after_end != end_month:
            month_after = _next_month(end_month)
            if (month_after - after_end).days < (after_end - end_month).days:
                month_to, cut_tail = month_after, (after_end, month_after)
            else:
                tail = (end_month, after_end)
        months = (month_from, month_to)
    return {
        "month_from": months[0],
        "month_to": months[1],
        "head_from": head[0],
        "head_to": head[1],
        "tail_from": tail[0],
        "tail_to": tail[1],
        "cut_head_from": cut_head[0],
        "cut_head_to": cut_head[1],
        "cut_tail_from": cut_tail[0],
        "cut_tail_to": cut_tail[1],
    }


def query_comment(name: str) -> str:
    """The static sqlcommenter comment naming a query: ``/*db.query.summary='report.dashboard'*/``.

    It names the statement in PostgreSQL's logs, ``pg_stat_activity`` and
    ``pg_stat_statements`` after the ``db.query.summary`` of its spans and metrics. Static (no
    trace id): the text of a query stays the same from call to call, so the server still
    prepares it once and ``pg_stat_statements`` keeps one entry for it."""
    return f"/*db.query.summary='{QUERY_NAMES[name]}'*/"


def named_statement(name: str, sql: str) -> TextClause:
    """``sql`` with the comment naming it appended, and its name as ``query_name`` (telemetry)."""
    return text(f"{sql}\n{query_comment(name)}").execution_options(query_name=QUERY_NAMES[name])


def _status_counts(row: Any) -> dict[str, int]:
    return {status: int(getattr(row, status)) for status in STATUSES}


def _dates(items: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    for item in items:
        item[key] = date.fromisoformat(item[key])
    return items


def _new_clients(scope: Scope) -> str:
    """Clients whose first booking in scope falls in the period (migration 0003's tables)."""
    if scope.is_platform:
        return """
            SELECT count(*) AS new_clients FROM client_first_bookings f
            WHERE f.first_at >= :start_at AND f.first_at < :end_at
        """
    return """
        SELECT count(*) AS new_clients FROM salon_client_first_bookings f
        WHERE f.salon_id = :salon_id AND f.first_at >= :start_at AND f.first_at < :end_at
    """


# The daily series and the final row of the dashboard, after CTEs ``totals``, ``clients``,
# ``new_clients``, ``top_services`` and ``per_day``.
_DASHBOARD_TAIL = """
    daily AS (
        SELECT d.day, coalesce(p.bookings, 0) AS bookings, coalesce(p.completed, 0) AS completed,
               coalesce(p.revenue_cents, 0) AS revenue_cents
        FROM generate_series(CAST(:start_date AS date), CAST(:end_date AS date),
                             interval '1 day') AS d(day)
        LEFT JOIN per_day p ON p.day = d.day::date
    )
    SELECT t.*, c.unique_clients, n.new_clients,
           round(t.completed::numeric / nullif(t.bookings_total, 0), 4) AS completion_rate,
           round(t.cancelled::numeric / nullif(t.bookings_total, 0), 4) AS cancellation_rate,
           round(t.no_show::numeric / nullif(t.bookings_total, 0), 4) AS no_show_rate,
           round(t.revenue_cents::numeric / nullif(t.completed, 0)) AS average_ticket_cents,
           (SELECT coalesce(json_agg(json_build_object(
                        'service_id', service_id, 'name', name, 'bookings', bookings,
                        'revenue_cents', revenue_cents)
                    ORDER BY bookings DESC, revenue_cents DESC, service_id), '[]')
            FROM top_services) AS top_services,
           (SELECT json_agg(json_build_object(
                        'date', day::date, 'bookings', bookings, 'completed', completed,
                        'revenue_cents', revenue_cents) ORDER BY day)
            FROM daily) AS daily
    FROM totals t CROSS JOIN clients c CROSS JOIN new_clients n
"""


# The zero-filled series, the split by hour and the final row of the bookings report, after
# CTEs ``per_bucket``, ``by_category`` and ``per_hour``.
_BOOKINGS_TAIL = """
    series AS (
        SELECT k.bucket_start::date AS bucket_start, coalesce(p.bookings, 0) AS bookings,
               coalesce(p.completed, 0) AS completed, coalesce(p.cancelled, 0) AS cancelled,
               coalesce(p.no_show, 0) AS no_show, coalesce(p.revenue_cents, 0) AS revenue_cents
        FROM generate_series(date_trunc(:unit, CAST(:start_date AS timestamp)),
                             CAST(:end_date AS timestamp),
                             CAST('1 ' || :unit AS interval)) AS k(bucket_start)
        LEFT JOIN per_bucket p ON p.bucket_start = k.bucket_start::date
    ),
    by_hour AS (
        SELECT h.hour, coalesce(p.bookings, 0) AS bookings
        FROM generate_series(0, 23) AS h(hour) LEFT JOIN per_hour p ON p.hour = h.hour
    )
    SELECT
        (SELECT json_agg(json_build_object(
                    'bucket_start', bucket_start, 'bookings', bookings, 'completed', completed,
                    'cancelled', cancelled, 'no_show', no_show, 'revenue_cents', revenue_cents)
                ORDER BY bucket_start)
         FROM series) AS series,
        (SELECT coalesce(json_agg(json_build_object(
                    'category', category, 'bookings', bookings, 'revenue_cents', revenue_cents)
                ORDER BY bookings DESC, category), '[]')
         FROM by_category) AS by_category,
        (SELECT json_agg(json_build_object('hour', hour, 'bookings', bookings) ORDER BY hour)
         FROM by_hour) AS by_hour
"""


# Per professional, from ``professional_clients`` (professional, client, completed bookings):
# clients, those with >= 1 and >= 2 completed bookings; then the figures of the report: the
# counts from ``pp`` (per_professional) and the client figures, with ``nc`` the professional's
# new clients.
_CLIENT_STATS = """
    client_stats AS (
        SELECT professional_id,
               count(*) AS unique_clients,
               count(*) FILTER (WHERE completed >= 2) AS retained_clients,
               count(*) FILTER (WHERE completed >= 1) AS served_clients
        FROM professional_clients
        GROUP BY professional_id
    )"""
_PROFESSIONAL_COUNTS = """
               coalesce(pp.bookings, 0) AS bookings,
               coalesce(pp.completed, 0) AS completed,
               coalesce(pp.cancelled, 0) AS cancelled,
               coalesce(pp.no_show, 0) AS no_show,
               coalesce(pp.revenue_cents, 0) AS revenue_cents"""
_CLIENT_FIGURES = """
               coalesce(cs.unique_clients, 0) AS unique_clients,
               coalesce(cs.unique_clients, 0) - coalesce(nc.new_clients, 0)
                   AS returning_clients,
               coalesce(round(cs.retained_clients::numeric / nullif(cs.served_clients, 0), 4), 0)
                   AS client_retention_rate"""


# -- platform-wide, from the rollups (migration 0004) --------------------------------------

_COUNTERS = (*STATUSES, "revenue_cents")


@dataclass(frozen=True, slots=True)
class _Selected:
    """Rollup expressions for the bookings a report counts: all, or one status's."""

    status: Status | None = None

    def count(self, status: Status) -> str:
        return status if self.status in (None, status) else "0"

    @property
    def bookings(self) -> str:
        return " + ".join(STATUSES) if self.status is None else self.status

    @property
    def revenue_cents(self) -> str:
        return "revenue_cents" if self.status in (None, "completed") else "0"

    def columns(self) -> str:
        """bookings, one column per status, revenue_cents."""
        counts = ", ".join(f"{self.count(status)} AS {status}" for status in STATUSES)
        return f"{self.bookings} AS bookings, {counts}, {self.revenue_cents} AS revenue_cents"


def _rollup_days(selected: _Selected) -> str:
    """The platform's daily rollup rows of the period (UTC days)."""
    return f"""
        SELECT day, {selected.columns()}
        FROM platform_day_rollups
        WHERE day >= :start_date AND day <= :end_date
    """


def _rollup_totals(dimension: str, selected: _Selected) -> str:
    """Per-service or per-professional totals of the period: its months from the monthly
    rollup, plus its head and tail days and minus the days of those months outside the period
    from the daily one (``rollup_ranges``); keys with no bookings left out.
    """
    key = f"{dimension}_id"
    columns = ", ".join(_COUNTERS)
    negated = ", ".join(f"-{column}" for column in _COUNTERS)
    sums = ", ".join(f"sum({column}) AS {column}" for column in _COUNTERS)
    return f"""
        SELECT {key}, {selected.columns()}
        FROM (
            SELECT {key}, {sums} FROM (
                SELECT {key}, {columns} FROM {dimension}_month_rollups
                WHERE month >= :month_from AND month < :month_to
                UNION ALL
                SELECT {key}, {columns} FROM {dimension}_day_rollups
                WHERE day >= :head_from AND day < :head_to
                UNION ALL
                SELECT {key}, {columns} FROM {dimension}_day_rollups
                WHERE day >= :tail_from AND day < :tail_to
                UNION ALL
                SELECT {key}, {negated} FROM {dimension}_day_rollups
                WHERE day >= :cut_head_from AND day < :cut_head_to
                UNION ALL
                SELECT {key}, {negated} FROM {dimension}_day_rollups
                WHERE day >= :cut_tail_from AND day < :cut_tail_to
            ) AS buckets
            GROUP BY {key}
        ) AS totals
        WHERE {selected.bookings} > 0
    """


def _platform_dashboard_sql() -> str:
    everything = _Selected()
    return f"""
    WITH days AS MATERIALIZED ({_rollup_days(everything)}),
    totals AS (
        SELECT coalesce(sum(bookings), 0) AS bookings_total,
               {", ".join(f"coalesce(sum({s}), 0) AS {s}" for s in STATUSES)},
               coalesce(sum(revenue_cents), 0) AS revenue_cents
        FROM days
    ),
    visits AS (
        -- the first visit day in the period of each client of the period (see migration 0004)
        SELECT coalesce(sum(clients), 0) AS unique_clients,
               coalesce(sum(clients) FILTER (WHERE prev_day = '-infinity'), 0) AS new_clients
        FROM client_visit_pairs
        WHERE day >= :start_date AND day <= :end_date AND prev_day < :start_date
    ),
    clients AS (SELECT unique_clients FROM visits),
    new_clients AS (SELECT new_clients FROM visits),
    top_services AS (
        SELECT p.service_id, s.name, p.bookings, p.revenue_cents
        FROM ({_rollup_totals("service", everything)}
              ORDER BY bookings DESC, revenue_cents DESC, service_id
              LIMIT 5) p
        JOIN services s ON s.id = p.service_id
    ),
    per_day AS (SELECT day, bookings, completed, revenue_cents FROM days),
    {_DASHBOARD_TAIL}
    """


def dashboard_sql(scope: Scope) -> str:
    if scope.is_platform:
        return _platform_dashboard_sql()
    return f"""
    WITH period AS MATERIALIZED ({
        _period_rows(
            scope,
            "b.client_id, b.service_id, b.status, b.price_cents,"
            " (b.scheduled_at AT TIME ZONE :tz)::date AS day",
        )
    }),
    totals AS (
        SELECT count(*) AS bookings_total,
               {_STATUS_COUNTS},
               {_REVENUE} AS revenue_cents
        FROM period
    ),
    clients AS (
        SELECT count(*) AS unique_clients FROM (SELECT client_id FROM period GROUP BY client_id) c
    ),
    new_clients AS ({_new_clients(scope)}),
    top_services AS (
        SELECT p.service_id, s.name, p.bookings, p.revenue_cents
        FROM (
            SELECT service_id, count(*) AS bookings, {_REVENUE} AS revenue_cents
            FROM period GROUP BY service_id
            ORDER BY bookings DESC, revenue_cents DESC, service_id
            LIMIT 5
        ) p
        JOIN services s ON s.id = p.service_id
    ),
    per_day AS (
        SELECT day, count(*) AS bookings,
               count(*) FILTER (WHERE status = 'completed') AS completed,
               {_REVENUE} AS revenue_cents
        FROM period GROUP BY day
    ),
    {_DASHBOARD_TAIL}
    """


async def dashboard_metrics(conn: AsyncConnection, scope: Scope, period: Period) -> dict[str, Any]:
    """Totals, rates, client counts, top services and the daily series of one period."""
    result = await conn.execute(
        named_statement(ReportName.DASHBOARD, dashboard_sql(scope)),
        _bind(scope, period),
    )
    row = result.one()
    unique_clients = int(row.unique_clients)
    new_clients = int(row.new_clients)
    return {
        "bookings_total": int(row.bookings_total),
        "by_status": _status_counts(row),
        "completion_rate": float(row.completion_rate or 0),
        "cancellation_rate": float(row.cancellation_rate or 0),
        "no_show_rate": float(row.no_show_rate or 0),
        "revenue_cents": int(row.revenue_cents),
        "average_ticket_cents": int(row.average_ticket_cents or 0),
        "unique_clients": unique_clients,
        "new_clients": new_clients,
        "returning_clients": unique_clients - new_clients,
        "top_services": row.top_services,
        "daily": _dates(row.daily, "date"),
    }


def _platform_bookings_sql(status: Status | None) -> str:
    selected = _Selected(status)
    return f"""
    WITH per_bucket AS (
        SELECT date_trunc(:unit, day::timestamp)::date AS bucket_start, sum(bookings) AS bookings,
               sum(completed) AS completed, sum(cancelled) AS cancelled, sum(no_show) AS no_show,
               sum(revenue_cents) AS revenue_cents
        FROM ({_rollup_days(selected)}) AS days GROUP BY 1
    ),
    by_category AS (
        SELECT s.category, sum(p.bookings) AS bookings, sum(p.revenue_cents) AS revenue_cents
        FROM ({_rollup_totals("service", selected)}) p
        JOIN services s ON s.id = p.service_id
        GROUP BY s.category
    ),
    per_hour AS (
        SELECT hour, sum({selected.bookings}) AS bookings
        FROM platform_hour_rollups
        WHERE day >= :start_date AND day <= :end_date
        GROUP BY hour
    ),
    {_BOOKINGS_TAIL}
    """


def _uses_rollups(scope: Scope, filters: BookingFilters) -> bool:
    """Platform-wide and not narrowed to one professional or service (their own index)."""
    return scope.is_platform and filters.professional_id is None and filters.service_id is None


def bookings_sql(scope: Scope, filters: BookingFilters) -> str:
    if _uses_rollups(scope, filters):
        return _platform_bookings_sql(filters.status)
    conditions = []
    if filters.professional_id is not None:
        conditions.append("AND b.professional_id = :professional_id")
    if filters.service_id is not None:
        conditions.append("AND b.service_id = :service_id")
    if filters.status is not None:
        conditions.append("AND b.status = :status")
    return f"""
    WITH period AS MATERIALIZED ({
        _period_rows(
            scope,
            "b.service_id, b.status, b.price_cents, b.scheduled_at AT TIME ZONE :tz AS local_at",
            " ".join(conditions),
        )
    }),
    per_bucket AS (
        SELECT date_trunc(:unit, local_at)::date AS bucket_start, count(*) AS bookings,
               count(*) FILTER (WHERE status = 'completed') AS completed,
               count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
               count(*) FILTER (WHERE status = 'no_show') AS no_show,
               {_REVENUE} AS revenue_cents
        FROM period GROUP BY 1
    ),
    by_category AS (
        SELECT s.category, sum(p.bookings) AS bookings, sum(p.revenue_cents) AS revenue_cents
        FROM (
            SELECT service_id, count(*) AS bookings, {_REVENUE} AS revenue_cents
            FROM period GROUP BY service_id
        ) p
        JOIN services s ON s.id = p.service_id
        GROUP BY s.category
    ),
    per_hour AS (
        SELECT extract(hour FROM local_at)::int AS hour, count(*) AS bookings
        FROM period GROUP BY 1
    ),
    {_BOOKINGS_TAIL}
    """


async def booking_metrics(
    conn: AsyncConnection,
    scope: Scope,
    period: Period,
    granularity: Granularity,
    filters: BookingFilters,
) -> dict[str, Any]:
    """Time series by day, week or month, plus the split by category and by local hour."""
    params = _bind(
        scope,
        period,
        unit=granularity,
        professional_id=filters.professional_id,
        service_id=filters.service_id,
        status=filters.status,
    )
    result = await conn.execute(
        named_statement(ReportName.BOOKINGS, bookings_sql(scope, filters)), params
    )
    row = result.one()
    return {
        "granularity": granularity,
        "series": _dates(row.series, "bucket_start"),
        "by_category": row.by_category,
        "by_hour": row.by_hour,
    }


def _platform_professionals_sql() -> str:
    """Every professional's totals and revenue rank from the rollups; the client counts, which
    need each professional's own clients, only for the page, from the covering index
    ``idx_bookings_professional_scheduled_covering``."""
    return f"""
    WITH per_professional AS ({_rollup_totals("professional", _Selected())}),
    ranked AS (
        SELECT pr.id AS professional_id, pr.name,
               {_PROFESSIONAL_COUNTS},
               rank() OVER (ORDER BY coalesce(pp.revenue_cents, 0) DESC) AS revenue_rank
        FROM professionals pr
        LEFT JOIN per_professional pp ON pp.professional_id = pr.id
        WHERE pr.is_active OR pp.professional_id IS NOT NULL
    ),
    page AS MATERIALIZED (
        SELECT * FROM ranked
        WHERE professional_id > coalesce(CAST(:after_id AS bigint), 0)
        ORDER BY professional_id
        LIMIT :page_rows
    ),
    professional_clients AS (
        SELECT b.professional_id, b.client_id,
               count(*) FILTER (WHERE b.status = 'completed') AS completed
        FROM page p
        JOIN bookings b ON b.professional_id = p.professional_id
        WHERE b.scheduled_at >= :start_at AND b.scheduled_at < :end_at
        GROUP BY b.professional_id, b.client_id
    ),
    {_CLIENT_STATS},
    new_to_professional AS (
        SELECT f.professional_id, count(*) AS new_clients
        FROM page p
        JOIN professional_client_first_bookings f ON f.professional_id = p.professional_id
        WHERE f.first_at >= :start_at AND f.first_at < :end_at
        GROUP BY f.professional_id
    )
    SELECT p.professional_id, p.name, p.bookings, p.completed, p.cancelled, p.no_show,
           p.revenue_cents, {_CLIENT_FIGURES}, p.revenue_rank
    FROM page p
    LEFT JOIN client_stats cs ON cs.professional_id = p.professional_id
    LEFT JOIN new_to_professional nc ON nc.professional_id = p.professional_id
    ORDER BY p.professional_id
    """


def professionals_sql(scope: Scope) -> str:
    if scope.is_platform:
        return _platform_professionals_sql()
    return _salon_professionals_sql(scope)


def _salon_professionals_sql(scope: Scope) -> str:
    """One salon's professionals, from its bookings of the period (index-only)."""
    return f"""
    WITH period AS MATERIALIZED ({
        _period_rows(scope, "b.professional_id, b.client_id, b.status, b.price_cents")
    }),
    per_professional AS (
        SELECT professional_id, count(*) AS bookings,
               count(*) FILTER (WHERE status = 'completed') AS completed,
               count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
               count(*) FILTER (WHERE status = 'no_show') AS no_show,
               {_REVENUE} AS revenue_cents
        FROM period
        GROUP BY professional_id
    ),
    professional_clients AS (
        SELECT professional_id, client_id,
               count(*) FILTER (WHERE status = 'completed') AS completed
        FROM period
        GROUP BY professional_id, client_id
    ),
    {_CLIENT_STATS},
    new_to_professional AS (
        -- clients whose first booking with the professional falls in the period
        -- (migration 0003); the others of the period are returning
        SELECT f.professional_id, count(*) AS new_clients
        FROM professional_client_first_bookings f
        WHERE f.first_at >= :start_at AND f.first_at < :end_at
          AND f.professional_id IN (SELECT id FROM professionals WHERE salon_id = :salon_id)
        GROUP BY f.professional_id
    ),
    ranked AS (
        SELECT pr.id AS professional_id, pr.name,
               {_PROFESSIONAL_COUNTS},
               {_CLIENT_FIGURES},
               rank() OVER (ORDER BY coalesce(pp.revenue_cents, 0) DESC) AS revenue_rank
        FROM professionals pr
        LEFT JOIN per_professional pp ON pp.professional_id = pr.id
        LEFT JOIN client_stats cs ON cs.professional_id = pr.id
        LEFT JOIN new_to_professional nc ON nc.professional_id = pr.id
        WHERE pr.salon_id = :salon_id AND (pr.is_active OR pp.professional_id IS NOT NULL)
    )
    SELECT * FROM ranked
    WHERE professional_id > coalesce(CAST(:after_id AS bigint), 0)
    ORDER BY professional_id
    LIMIT :page_rows
    """


async def professional_performance(
    conn: AsyncConnection,
    scope: Scope,
    period: Period,
    *,
    limit: int,
    after_id: int | None,
) -> dict[str, Any]:
    """One keyset page of per-professional figures, ranked by revenue across the whole scope."""
    params = _bind(scope, period, after_id=after_id, page_rows=limit + 1)
    result = await conn.execute(
        named_statement(ReportName.PROFESSIONALS, professionals_sql(scope)), params
    )
    rows = result.all()
    items = [
        {
            "professional_id": int(row.professional_id),
            "name": row.name,
            "bookings": int(row.bookings),
            "completed": int(row.completed),
            "cancelled": int(row.cancelled),
            "no_show": int(row.no_show),
            "revenue_cents": int(row.revenue_cents),
            "unique_clients": int(row.unique_clients),
            "returning_clients": int(row.returning_clients),
            "client_retention_rate": float(row.client_retention_rate),
            "revenue_rank": int(row.revenue_rank),
        }
        for row in rows[:limit]
    ]
    next_after_id = items[-1]["professional_id"] if len(rows) > limit else None
    return {"items": items, "next_after_id": next_after_id}


def realtime_sql(scope: Scope) -> str:
    return f"""
    SELECT count(*) AS bookings_total, {_STATUS_COUNTS}, {_REVENUE} AS revenue_cents
    FROM ({_period_rows(scope, "b.status, b.price_cents")}) AS today
    """


async def realtime_metrics(conn: AsyncConnection, scope: Scope, today: date) -> dict[str, Any]:
    """Today's (local) bookings by status and the revenue completed so far."""
    period = Period(start=today, end=today)
    result = await conn.execute(
        named_statement(ReportName.REALTIME, realtime_sql(scope)),
        _bind(scope, period),
    )
    row = result.one()
    return {
        "bookings_total": int(row.bookings_total),
        "by_status": _status_counts(row),
        "revenue_cents": int(row.revenue_cents),
    }


async def salon_timezone(conn: AsyncConnection, salon_id: int) -> str | None:
    """The salon's time zone, or None when there is no such salon."""
    result = await conn.execute(
        named_statement("salon", "SELECT timezone FROM salons WHERE id = :salon_id"),
        {"salon_id": salon_id},
    )
    value = result.scalar_one_or_none()
    return None if value is None else str(value)
