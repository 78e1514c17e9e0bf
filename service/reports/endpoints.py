"""HTTP surface of the reports: parse, authorise, shape the response. No SQL here."""

from __future__ import annotations

import json
import re
import time
from datetime import date, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import Response

from service.auth import Principal
from service.cache import CacheResult, Outcome
from service.deps import AdminDep, PrincipalDep, ReportServiceDep, ResourcesDep
from service.errors import APIError
from service.invalidation import broadcast_clear
from service.reports.params import (
    EARLIEST_DATE,
    LATEST_DATE,
    MAX_PERIOD_DAYS,
    BookingFilters,
    Granularity,
    Period,
    Scope,
    Status,
    default_period,
)
from service.reports.schemas import (
    BookingsReport,
    DashboardReport,
    ProfessionalsReport,
    RealtimeReport,
    error_responses,
)
from service.reports.service import ReportService, decode_cursor

PREFIX = "/api/v1/optimized-reports"
MAX_ID = 2**63 - 1
ISO_DATE = r"^\d{4}-\d{2}-\d{2}$"
MAX_CLEAR_BODY_BYTES = 4096
INTEGER_PARAMETERS = frozenset({"salon_id", "professional_id", "service_id", "limit"})
PLAIN_DECIMAL = re.compile(r"[0-9]+")
MAX_QUERY_BYTES = 2048  # the longest honest query (every parameter, a cursor) is under 400

router = APIRouter(prefix=PREFIX, tags=["reports"])

ERRORS = error_responses(400, 401, 403, 404, 414, 422, 503)

SalonQuery = Annotated[
    int | None,
    Query(ge=1, le=MAX_ID, description="The salon; omit for platform-wide (admins only)."),
]
StartQuery = Annotated[
    str | None,
    Query(pattern=ISO_DATE, description="First day, inclusive (YYYY-MM-DD, salon-local)."),
]
EndQuery = Annotated[
    str | None,
    Query(pattern=ISO_DATE, description="Last day, inclusive (YYYY-MM-DD, salon-local)."),
]


def _parse_date(value: str, name: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise APIError(422, "validation_error", f"{name}: not a calendar date") from None


def _check_range(day: date, name: str) -> date:
    if not EARLIEST_DATE <= day <= LATEST_DATE:
        raise APIError(
            422,
            "validation_error",
            f"{name}: must be between {EARLIEST_DATE.isoformat()} and {LATEST_DATE.isoformat()}",
        )
    return day


def parse_period(start: str | None, end: str | None, today: date) -> Period:
    """The period asked for, or the 30 days ending today; 422 when it makes no sense."""
    default = default_period(today)
    end_day = _check_range(_parse_date(end, "end"), "end") if end is not None else default.end
    if start is not None:
        start_day = _check_range(_parse_date(start, "start"), "start")
    elif end is not None:
        start_day = _check_range(end_day - timedelta(days=default.days - 1), "start")
    else:
        start_day = default.start
    if start_day > end_day:
        raise APIError(422, "validation_error", "start must not be after end")
    period = Period(start_day, end_day)
    if period.days > MAX_PERIOD_DAYS:
        raise APIError(
            422, "validation_error", f"the period may span at most {MAX_PERIOD_DAYS} days"
        )
    return period


def authorise_report(principal: Principal, salon_id: int | None) -> None:
    if principal.role == "ops":
        raise APIError(403, "forbidden", "ops tokens do not give access to business data")
    if principal.role == "owner":
        if salon_id is None:
            raise APIError(403, "forbidden", "platform-wide reports are for admins; pass salon_id")
        if salon_id not in principal.salon_ids:
            raise APIError(403, "forbidden", "this salon is not in the token's scope")


def check_query(request: Request) -> None:
    """Refuse a query string whose meaning a proxy, a log or a rate limiter could read otherwise.

    414 for a query far longer than any honest one; 422 for a parameter given twice (a proxy
    checking the first ``salon_id`` while the service serves the last would be a hole) and for
    an integer spelt other than ASCII digits (pydantic reads "+7", " 7" and "1_0" as numbers).
    Leading zeros stay allowed: "07" is 7 to every reader, and shares 7's cache entry. Unknown
    parameters are ignored, as HTTP caches and cache-busters expect.
    """
    if len(request.url.query) > MAX_QUERY_BYTES:
        raise APIError(414, "uri_too_long", f"the query string is over {MAX_QUERY_BYTES} bytes")
    items = request.query_params.multi_items()
    names = [name for name, _ in items]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise APIError(422, "validation_error", f"{', '.join(repeated)}: may be given only once")
    for name, value in items:
        if name in INTEGER_PARAMETERS and not PLAIN_DECIMAL.fullmatch(value):
            raise APIError(422, "validation_error", f"{name}: write it in plain digits, like 42")


async def _scope(
    request: Request, reports: ReportService, principal: Principal, salon_id: int | None
) -> Scope:
    check_query(request)
    authorise_report(principal, salon_id)
    scope = await reports.resolve_scope(salon_id)
    request.state.salon_id = salon_id
    return scope


async def _begin(
    request: Request,
    report: str,
    reports: ReportService,
    principal: Principal,
    salon_id: int | None,
    start: str | None,
    end: str | None,
) -> tuple[Scope, Period]:
    """Name the report for telemetry, authorise, resolve the salon, parse the period."""
    request.state.report_name = report
    scope = await _scope(request, reports, principal, salon_id)
    return scope, parse_period(start, end, reports.today(scope))


def report_response(
    request: Request, outcome: Outcome, started: float, *, cacheable: bool = True
) -> Response:
    """Serve stored bytes with validators, freshness and timings; 304 when the client has them."""
    entry = outcome.entry
    now = time.time()
    max_age = entry.seconds_left(now) if outcome.result is not CacheResult.BYPASS else 0
    total_ms = (time.perf_counter() - started) * 1000
    headers = {
        "ETag": entry.etag,
        "Cache-Control": f"private, max-age={max_age}",
        "X-Cache": outcome.result.header,
        "Server-Timing": (
            f"cache;dur={outcome.cache_ms:.1f}, db;dur={outcome.compute_ms:.1f}, "
            f"total;dur={total_ms:.1f}"
        ),
    }
    if cacheable:  # what the telemetry counts as a cache lookup
        request.state.cache_result = outcome.result
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None and _etag_matches(if_none_match, entry.etag):
        return Response(status_code=304, headers=headers)
    return Response(entry.body, media_type="application/json", headers=headers)


def _etag_matches(header: str, etag: str) -> bool:
    candidates = {part.strip() for part in header.split(",")}
    return "*" in candidates or etag in candidates


@router.get("/dashboard", response_model=DashboardReport, responses=ERRORS)
async def dashboard(
    request: Request,
    principal: PrincipalDep,
    reports: ReportServiceDep,
    salon_id: SalonQuery = None,
    start: StartQuery = None,
    end: EndQuery = None,
) -> Response:
    """Totals, rates, clients, top services and the daily series of a period."""
    started = time.perf_counter()
    scope, period = await _begin(request, "dashboard", reports, principal, salon_id, start, end)
    outcome = await reports.dashboard(principal, scope, period)
    return report_response(request, outcome, started)


@router.get("/bookings", response_model=BookingsReport, responses=ERRORS)
async def bookings(
    request: Request,
    principal: PrincipalDep,
    reports: ReportServiceDep,
    salon_id: SalonQuery = None,
    start: StartQuery = None,
    end: EndQuery = None,
    granularity: Granularity = "day",
    professional_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    service_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    status: Status | None = None,
) -> Response:
    """Bookings over time (day, week or month), by category and by local hour."""
    started = time.perf_counter()
    scope, period = await _begin(request, "bookings", reports, principal, salon_id, start, end)
    filters = BookingFilters(professional_id=professional_id, service_id=service_id, status=status)
    outcome = await reports.bookings(principal, scope, period, granularity, filters)
    return report_response(request, outcome, started)


@router.get("/professionals", response_model=ProfessionalsReport, responses=ERRORS)
async def professionals(
    request: Request,
    principal: PrincipalDep,
    reports: ReportServiceDep,
    salon_id: SalonQuery = None,
    start: StartQuery = None,
    end: EndQuery = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    """Per-professional performance with client retention, keyset-paginated."""
    started = time.perf_counter()
    scope, period = await _begin(request, "professionals", reports, principal, salon_id, start, end)
    after_id = decode_cursor(cursor) if cursor is not None else None
    outcome = await reports.professionals(principal, scope, period, limit, after_id)
    return report_response(request, outcome, started)


@router.get("/realtime", response_model=RealtimeReport, responses=ERRORS)
async def realtime(
    request: Request,
    principal: PrincipalDep,
    reports: ReportServiceDep,
    salon_id: SalonQuery = None,
) -> Response:
    """Today's bookings by status and revenue so far (salon-local day); never cached."""
    started = time.perf_counter()
    request.state.report_name = "realtime"
    scope = await _scope(request, reports, principal, salon_id)
    outcome = await reports.realtime(scope)
    return report_response(request, outcome, started, cacheable=False)


class CacheClearRequest(BaseModel):
    # Strict: `true` or `"7"` is not salon 7; a typo must not clear another scope.
    model_config = ConfigDict(extra="forbid", strict=True)

    report: Literal["dashboard", "bookings", "professionals"] | None = Field(
        None, description="Only this report; omit for all."
    )
    salon_id: int | None = Field(None, ge=1, le=MAX_ID, description="Only this salon.")


class CacheClearResponse(BaseModel):
    deleted: int


async def _clear_request(request: Request) -> CacheClearRequest:
    """The optional JSON body, read only once the caller is known to be an admin.

    FastAPI would parse a declared body before any dependency runs, answering a stranger's
    malformed JSON with 422 instead of 401; so the body is declared in OpenAPI and read here.
    """
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_CLEAR_BODY_BYTES:
            raise APIError(413, "payload_too_large", "the body is larger than a cache-clear needs")
    if not raw.strip():
        return CacheClearRequest()
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise APIError(
            415, "unsupported_media_type", "the body must be JSON (Content-Type: application/json)"
        )
    try:
        document = json.loads(raw, object_pairs_hook=_without_repeated_keys)
    except RepeatedKey as error:
        raise APIError(422, "validation_error", f"body: {error}") from None
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError included
        raise APIError(422, "validation_error", "body: not valid JSON") from None
    if not isinstance(document, dict):
        raise APIError(422, "validation_error", "body: must be a JSON object")
    try:
        return CacheClearRequest.model_validate(document)
    except ValidationError as error:
        raise RequestValidationError(
            [{**detail, "loc": ("body", *detail["loc"])} for detail in error.errors()]
        ) from None


class RepeatedKey(ValueError):
    pass


def _without_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON parsers keep the last of two equal keys; which one counts must not be a guess."""
    names = [name for name, _ in pairs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise RepeatedKey(f"{', '.join(repeated)} given more than once")
    return dict(pairs)


@router.post(
    "/cache/clear",
    response_model=CacheClearResponse,
    responses=error_responses(401, 403, 413, 415, 422, 503),
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": CacheClearRequest.model_json_schema()}},
        }
    },
)
async def clear_cache(_: AdminDep, request: Request, resources: ResourcesDep) -> CacheClearResponse:
    """Drop cached reports by report and/or salon; with neither, everything (admins only)."""
    body = await _clear_request(request)
    deleted = await resources.cache.clear(body.report, body.salon_id)
    await broadcast_clear(resources.engine, body.report, body.salon_id)
    return CacheClearResponse(deleted=deleted)
