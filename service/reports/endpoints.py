"""The report routes: parse, authorise, shape the response (``http``); no SQL, no cache."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.deps import AdminDep, ResourcesDep
from service.errors import error_responses
from service.paths import API_PREFIX
from service.reports.http import (
    BookingsQuery,
    CacheClearRequest,
    CacheClearResponse,
    PeriodQuery,
    ProfessionalsQuery,
    SalonQuery,
    authorised,
    begin,
    documented,
    read_clear_request,
    report_response,
)
from service.reports.names import ReportName
from service.reports.params import BookingFilters
from service.reports.schemas import (
    BookingsReport,
    DashboardReport,
    ProfessionalsReport,
    RealtimeReport,
)
from service.reports.service import decode_cursor

router = APIRouter(prefix=API_PREFIX, tags=["reports"])

ERRORS = error_responses(400, 401, 403, 404, 414, 422, 429, 503)


@router.get(
    "/dashboard",
    response_model=DashboardReport,
    responses=ERRORS,
    openapi_extra=documented(PeriodQuery),
)
async def dashboard(request: Request) -> Response:
    """Totals, rates, clients, top services and the daily series of a period."""
    started = time.perf_counter()
    call, period = await begin(request, ReportName.DASHBOARD, PeriodQuery)
    outcome = await call.reports.dashboard(call.principal, call.scope, period)
    return report_response(request, outcome, started)


@router.get(
    "/bookings",
    response_model=BookingsReport,
    responses=ERRORS,
    openapi_extra=documented(BookingsQuery),
)
async def bookings(request: Request) -> Response:
    """Bookings over time (day, week or month), by category and by local hour."""
    started = time.perf_counter()
    call, period = await begin(request, ReportName.BOOKINGS, BookingsQuery)
    query = call.query
    filters = BookingFilters(
        professional_id=query.professional_id, service_id=query.service_id, status=query.status
    )
    outcome = await call.reports.bookings(
        call.principal, call.scope, period, query.granularity, filters
    )
    return report_response(request, outcome, started)


@router.get(
    "/professionals",
    response_model=ProfessionalsReport,
    responses=ERRORS,
    openapi_extra=documented(ProfessionalsQuery),
)
async def professionals(request: Request) -> Response:
    """Per-professional performance with client retention, keyset-paginated."""
    started = time.perf_counter()
    call, period = await begin(request, ReportName.PROFESSIONALS, ProfessionalsQuery)
    query = call.query
    after_id = decode_cursor(query.cursor) if query.cursor is not None else None
    outcome = await call.reports.professionals(
        call.principal, call.scope, period, query.limit, after_id
    )
    return report_response(request, outcome, started)


@router.get(
    "/realtime",
    response_model=RealtimeReport,
    responses=ERRORS,
    openapi_extra=documented(SalonQuery),
)
async def realtime(request: Request) -> Response:
    """Today's bookings by status and revenue so far (salon-local day); never cached."""
    started = time.perf_counter()
    call = await authorised(request, ReportName.REALTIME, SalonQuery)
    outcome = await call.reports.realtime(call.principal, call.scope)
    return report_response(request, outcome, started, cacheable=False)


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
    body = await read_clear_request(request)
    deleted = await resources.reports.clear_cache(body.report, body.salon_id)
    return CacheClearResponse(deleted=deleted)
