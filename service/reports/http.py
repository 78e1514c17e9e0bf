"""The request machinery of the report endpoints, kept out of the route module.

The report endpoints read their parameters from the request themselves, through the query
models here, instead of declaring them as FastAPI parameters and dependencies: on a cached
request FastAPI's dependency solving cost more than everything else together. The OpenAPI
document declares them from the same models (``documented``), with the bearer scheme. Here
too: the checks a query string must pass (``check_query``), the period (``parse_period``),
who may read what (``authorise_report``), the response with its validators
(``report_response``) and the cache-clear body, read only once the caller is an admin.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, Generic, Literal, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.datastructures import QueryParams
from starlette.responses import Response

from service.auth import Principal
from service.cache import CacheResult, Outcome
from service.deps import authenticate
from service.errors import APIError
from service.reports.names import ReportName
from service.reports.params import (
    EARLIEST_DATE,
    LATEST_DATE,
    MAX_PERIOD_DAYS,
    Granularity,
    Period,
    Scope,
    Status,
    default_period,
)
from service.reports.service import ReportService

MAX_ID = 2**63 - 1  # ids are PostgreSQL bigints
# In a JSON body an integer beyond 2**53 is not interoperable (RFC 8259 section 6): parsers,
# FastAPI's OpenAPI models included, read it as a float, and 2**63 - 1 becomes 2**63.
MAX_JSON_ID = 2**53 - 1
# A day from EARLIEST_DATE (1900-01-01) to LATEST_DATE (9998-12-31), spelt YYYY-MM-DD in ASCII
# digits; the calendar itself (no February 30) is the `date` format's part.
DATE_PATTERN = (
    r"^(19[0-9]{2}|[2-8][0-9]{3}|9[0-8][0-9]{2}|99[0-8][0-9]|999[0-8])"
    r"-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$"
)
MAX_CLEAR_BODY_BYTES = 4096
INTEGER_PARAMETERS = frozenset({"salon_id", "professional_id", "service_id", "limit"})
PLAIN_DECIMAL = re.compile(r"[0-9]+")
MAX_QUERY_BYTES = 2048  # the longest honest query (every parameter, a cursor) is under 400


# -- query parameters -------------------------------------------------------------------


class _Query(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)  # unknown parameters are ignored


class SalonQuery(_Query):
    salon_id: int | None = Field(
        None, ge=1, le=MAX_ID, description="The salon; omit for platform-wide (admins only)."
    )


def _day(description: str) -> Any:
    return Field(
        None, pattern=DATE_PATTERN, json_schema_extra={"format": "date"}, description=description
    )


class PeriodQuery(SalonQuery):
    start: str | None = _day(
        "First day, inclusive (YYYY-MM-DD, salon-local, 1900-01-01 to 9998-12-31). Not after "
        "`end`, at most 366 days in all; alone, the period ends today (salon-local)."
    )
    end: str | None = _day(
        "Last day, inclusive (YYYY-MM-DD, salon-local, 1900-01-01 to 9998-12-31); alone, the "
        "period is the 30 days ending then (from 1900-01-01 at the earliest). Default: today."
    )


class BookingsQuery(PeriodQuery):
    granularity: Granularity = "day"
    professional_id: int | None = Field(None, ge=1, le=MAX_ID)
    service_id: int | None = Field(None, ge=1, le=MAX_ID)
    status: Status | None = None


class ProfessionalsQuery(PeriodQuery):
    limit: int = Field(50, ge=1, le=200)
    cursor: str | None = Field(
        None,
        max_length=200,
        description="Opaque: the `next_cursor` of the previous page (anything else is a 400).",
    )


Q = TypeVar("Q", bound=SalonQuery)
P = TypeVar("P", bound=PeriodQuery)


def documented(model: type[_Query]) -> dict[str, Any]:
    """OpenAPI for a report operation: its query parameters and the bearer scheme.

    An optional parameter is omitted, never null (a query string cannot say null): the schema
    is the non-null branch alone.
    """
    parameters = []
    for name, schema in model.model_json_schema()["properties"].items():
        branches = schema.pop("anyOf", None)
        if branches is not None:
            [value] = [branch for branch in branches if branch.get("type") != "null"]
            schema = {**value, **schema}
        description = schema.pop("description", None)
        parameter: dict[str, Any] = {"name": name, "in": "query", "required": False}
        if description:
            parameter["description"] = description
        parameters.append({**parameter, "schema": schema})
    return {"parameters": parameters, "security": [{"HTTPBearer": []}]}


def read_query(request: Request, model: type[Q]) -> Q:
    """The request's parameters as ``model``; 422 (as FastAPI words it) when they are invalid."""
    return validate_query(request.query_params, model)


def validate_query(params: QueryParams, model: type[Q]) -> Q:
    try:
        return model.model_validate(dict(params))
    except ValidationError as error:
        raise RequestValidationError(
            [{**detail, "loc": ("query", *detail["loc"])} for detail in error.errors()]
        ) from None


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
        start_day = max(end_day - timedelta(days=default.days - 1), EARLIEST_DATE)
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
    check_query_string(request.url.query, request.query_params)


def check_query_string(query: str, params: QueryParams) -> None:
    """``check_query`` of a raw query string and its parameters."""
    if len(query) > MAX_QUERY_BYTES:
        raise APIError(414, "uri_too_long", f"the query string is over {MAX_QUERY_BYTES} bytes")
    items = params.multi_items()
    names = [name for name, _ in items]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise APIError(422, "validation_error", f"{', '.join(repeated)}: may be given only once")
    for name, value in items:
        if name in INTEGER_PARAMETERS and not PLAIN_DECIMAL.fullmatch(value):
            raise APIError(422, "validation_error", f"{name}: write it in plain digits, like 42")


@dataclass(frozen=True, slots=True)
class ReportCall(Generic[Q]):
    """An authorised report request: who asks, with which parameters, for which scope."""

    principal: Principal
    reports: ReportService
    query: Q
    scope: Scope


async def authorised(request: Request, report: ReportName, model: type[Q]) -> ReportCall[Q]:
    """Name the report for telemetry, authenticate, read and check the parameters, authorise,
    resolve the salon: 401, then 422 / 414, then 403, then 404."""
    request.state.report_name = report.value  # telemetry keeps plain strings
    principal = await authenticate(request)
    query = read_query(request, model)
    check_query(request)
    salon_id = query.salon_id
    authorise_report(principal, salon_id)
    reports: ReportService = request.app.state.resources.reports
    scope = await reports.resolve_scope(salon_id)
    request.state.salon_id = salon_id
    return ReportCall(principal, reports, query, scope)


async def begin(
    request: Request, report: ReportName, model: type[P]
) -> tuple[ReportCall[P], Period]:
    """``authorised`` plus the period asked for."""
    call = await authorised(request, report, model)
    today = call.reports.today(call.scope)
    return call, parse_period(call.query.start, call.query.end, today)


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
        # The body depends on who asks (role and salons in the token): a shared browser cache
        # must not answer one user's request with another's copy.
        "Vary": "Authorization",
        "Server-Timing": (
            f"cache;dur={outcome.cache_ms:.1f}, db;dur={outcome.compute_ms:.1f}, "
            f"total;dur={total_ms:.1f}"
        ),
    }
    if cacheable:  # what the telemetry counts as a cache lookup
        request.state.cache_result = outcome.result
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None and etag_matches(if_none_match, entry.etag):
        return Response(status_code=304, headers=headers)
    return Response(entry.body, media_type="application/json", headers=headers)


ENTITY_TAG = re.compile(r'(?:W/)?"([^"]*)"')


def etag_matches(header: str, etag: str) -> bool:
    """``If-None-Match`` against our (strong) ETag with the weak comparison (RFC 9110 13.1.2):
    ``*``, or any listed tag whose opaque part equals ours, ``W/`` or not. A proxy that
    compresses the body may turn the ETag weak (nginx does); the client sends that back."""
    if header.strip() == "*":
        return True
    opaque = etag.removeprefix("W/")
    return any(f'"{tag}"' == opaque for tag in ENTITY_TAG.findall(header))


# -- the cache clear ----------------------------------------------------------------------


class CacheClearRequest(BaseModel):
    # Strict: `true` or `"7"` is not salon 7; a typo must not clear another scope.
    model_config = ConfigDict(extra="forbid", strict=True)

    report: Literal[ReportName.DASHBOARD, ReportName.BOOKINGS, ReportName.PROFESSIONALS] | None = (
        Field(None, description="Only this report; omit for all.")
    )
    salon_id: int | None = Field(
        None, ge=1, le=MAX_JSON_ID, description="Only this salon (at most 2^53 - 1: JSON numbers)."
    )

    @field_validator("salon_id", mode="before")
    @classmethod
    def _integral_number(cls, value: Any) -> Any:
        """7.0 is the JSON number 7 (and a JSON Schema integer); 7.5, `true` and "7" are not."""
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value


class CacheClearResponse(BaseModel):
    deleted: int


async def read_clear_request(request: Request) -> CacheClearRequest:
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
