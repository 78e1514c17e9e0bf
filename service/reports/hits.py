"""The cache-hit path: report requests this worker holds in its local cache tier, answered
before FastAPI's routing, validation and response machinery.

``CachedReportHits`` is a pure ASGI middleware, inside ``TelemetryMiddleware`` (so the span,
``X-Trace-Id``, the metrics and the stats are those of every request). It answers a ``GET`` of
a cached report (dashboard, bookings, professionals) only when everything about it is
ordinary, and then answers exactly as the endpoint would (same status, headers and body;
``tests/reports/test_hits.py`` compares them byte for byte):

- one ``Authorization: Bearer`` header whose token verifies (``TokenVerifier`` remembers the
  ones it verified) and whose role and salons allow the report (``authorise_report``);
- a query string that passes the endpoint's own checks (``check_query_string`` and the query
  model), remembered by its raw bytes;
- a salon whose time zone this worker already knows (``ReportService.known_scope``), the
  change stream current, the cache trusted and the entry fresh in the local tier
  (``ReportCache.local_hit``); the key is built as the endpoint builds it (``cache_key``) and
  remembered by (report, raw query, role, time zone, salon-local day).

It also answers the one refusal a flood makes by the thousand: ``429 tenant_throttled`` for a
miss of a tenant whose fair share is running and whose queue is full in this worker
(``FairScheduler.full``), when everything above holds, the request is not sampled for tracing,
and the cache confirms that the endpoint would start a computation here (``ReportCache.
would_fill``: in neither tier, one ``MGET`` as the endpoint makes it, none in flight, no change
pending). The refusal is the scheduler's own (``refuse_if_full``: counted, and delayed when it
repeats, ``FairScheduler.hold``), answered with the bytes and headers of the endpoint's 429
(rendered once by ``error_response``). A hit is never refused: an entry in either tier falls
through to the endpoint, which serves it. A sampled request's refusal is left to the endpoint,
whose cache span it keeps.

Anything else (no token, a bad one, a query the endpoint refuses, an unknown or not yet looked
up salon, a method other than GET, a repeated header, a local miss of a tenant under its share)
falls through to FastAPI untouched, which answers as before: errors keep their single source.
The endpoint leaves the same marks for telemetry (``report_name``, ``salon_id``,
``cache_result`` in the request state, the matched route in the scope); so does this path.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fastapi.exceptions import RequestValidationError
from opentelemetry import trace
from starlette.datastructures import QueryParams

from service.auth import InvalidToken, Principal
from service.cache import CacheKey, CacheResult
from service.errors import APIError, error_response
from service.fairness import Tenant, TenantThrottled
from service.paths import API_PREFIX
from service.reports.http import (
    BookingsQuery,
    PeriodQuery,
    ProfessionalsQuery,
    authorise_report,
    check_query_string,
    etag_matches,
    parse_period,
    validate_query,
)
from service.reports.names import ReportName
from service.reports.params import BookingFilters, Period, Scope, local_today
from service.reports.service import (
    bookings_params,
    cache_key,
    dashboard_params,
    decode_cursor,
    professionals_params,
)
from telemetry import attributes as attr

Scope_ = dict[str, Any]
Receive = Callable[..., Any]
Send = Callable[..., Any]
MEMO_ENTRIES = 4096  # remembered query strings and keys, each; forgotten at once when full
HIT = CacheResult.HIT
HIT_HEADER = HIT.header.encode()
JSON = b"application/json"
VARY = b"Authorization"


def _dashboard(query: Any, period: Period) -> dict[str, Any]:
    return dashboard_params(period)


def _bookings(query: Any, period: Period) -> dict[str, Any]:
    filters = BookingFilters(
        professional_id=query.professional_id, service_id=query.service_id, status=query.status
    )
    return bookings_params(period, query.granularity, filters)


def _professionals(query: Any, period: Period) -> dict[str, Any]:
    after_id = decode_cursor(query.cursor) if query.cursor is not None else None
    return professionals_params(period, query.limit, after_id)


# path -> (report, its query model, its normalised cache parameters)
REPORTS: dict[str, tuple[ReportName, type[PeriodQuery], Callable[..., dict[str, Any]]]] = {
    f"{API_PREFIX}/{ReportName.DASHBOARD.value}": (ReportName.DASHBOARD, PeriodQuery, _dashboard),
    f"{API_PREFIX}/{ReportName.BOOKINGS.value}": (ReportName.BOOKINGS, BookingsQuery, _bookings),
    f"{API_PREFIX}/{ReportName.PROFESSIONALS.value}": (
        ReportName.PROFESSIONALS,
        ProfessionalsQuery,
        _professionals,
    ),
}
_UNUSUAL = object()  # a memo's answer for "the endpoint decides"


def _leave_for_telemetry(
    scope: Scope_, name: ReportName, salon_id: int | None, route: Any
) -> dict[str, Any]:
    """What the endpoint leaves for telemetry (the report, the salon, the route); the
    request's state, for more."""
    state: dict[str, Any] | None = scope.get("state")
    if state is None:
        state = scope["state"] = {}
    state["report_name"] = name.value
    state["salon_id"] = salon_id
    scope["route"] = route
    return state


class CachedReportHits:
    def __init__(self, app: Any) -> None:
        self.app = app
        self._queries: dict[tuple[str, bytes], Any] = {}
        self._keys: dict[tuple[str, bytes, str, str, Any], Any] = {}
        # The route FastAPI matched for each report path, as its endpoint left it in the scope
        # (telemetry names requests by it); learnt from the first request FastAPI answered.
        self._routes: dict[str, Any] = {}
        self.enabled = True  # tests switch it off to compare with the endpoint's answer
        self.answered = 0
        self.refused = 0
        # The endpoint's 429, rendered once: (its Retry-After) -> (body, headers).
        self._refusals: dict[str, tuple[bytes, list[tuple[bytes, bytes]]]] = {}

    async def __call__(self, scope: Scope_, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and self.enabled:
            report = REPORTS.get(scope["path"])
            if report is not None:
                if await self._answer(scope, send, report):
                    return
                await self.app(scope, receive, send)
                if scope["path"] not in self._routes:
                    route = scope.get("route")
                    if getattr(route, "path", None) == scope["path"]:
                        self._routes[scope["path"]] = route
                return
        await self.app(scope, receive, send)

    async def _answer(
        self,
        scope: Scope_,
        send: Send,
        report: tuple[ReportName, type[PeriodQuery], Callable[..., dict[str, Any]]],
    ) -> bool:
        """Answer from the local tier and return True, or return False having sent nothing."""
        started = time.perf_counter()
        authorization = if_none_match = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                if authorization is not None:
                    return False
                authorization = value
            elif name == b"if-none-match":
                if if_none_match is not None:
                    return False
                if_none_match = value
        if authorization is None or authorization[:7].lower() != b"bearer ":
            return False
        app = scope["app"]
        resources = app.state.resources
        try:
            principal = resources.tokens.verify(authorization[7:].decode("latin-1").strip())
        except (InvalidToken, UnicodeDecodeError):
            return False
        name, model, params_of = report
        raw = scope["query_string"]
        query = self._query(name, raw, model)
        if query is _UNUSUAL:
            return False
        salon_id = query.salon_id
        try:
            authorise_report(principal, salon_id)
        except APIError:
            return False
        reports = resources.reports
        route = self._routes.get(scope["path"])
        if route is None or not reports.stream.current:
            return False
        known = reports.known_scope(salon_id)
        if known is None:
            return False
        key = self._key(name, raw, principal, known, query, params_of)
        if key is _UNUSUAL:
            return False
        cache = reports.cache
        lookup_started = time.perf_counter()
        entry = cache.local_hit(key)
        if entry is None:
            return await self._refuse(scope, send, reports, principal, salon_id, key, name, route)
        done = time.perf_counter()
        parent = trace.get_current_span().get_span_context()
        if not parent.is_valid or parent.trace_flags.sampled:  # the span ReportCache.fetch makes
            with cache.tracer.start_as_current_span(
                "cache.get", attributes={attr.REPORT_NAME: name, attr.CACHE_OPERATION: "get"}
            ) as span:
                if span.is_recording():
                    span.set_attribute(attr.CACHE_RESULT, HIT.value)
                    span.set_attribute(attr.CACHE_HIT, True)
        _leave_for_telemetry(scope, name, salon_id, route)["cache_result"] = HIT
        headers = [
            (b"etag", entry.etag.encode()),
            (b"cache-control", b"private, max-age=%d" % entry.seconds_left(time.time())),
            (b"x-cache", HIT_HEADER),
            (b"vary", VARY),
            (
                b"server-timing",
                b"cache;dur=%.1f, db;dur=0.0, total;dur=%.1f"
                % ((done - lookup_started) * 1000, (done - started) * 1000),
            ),
        ]
        self.answered += 1
        if if_none_match is not None and etag_matches(if_none_match.decode("latin-1"), entry.etag):
            await send({"type": "http.response.start", "status": 304, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return True
        body = entry.body
        headers.append((b"content-length", b"%d" % len(body)))
        headers.append((b"content-type", JSON))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return True

    async def _refuse(
        self,
        scope: Scope_,
        send: Send,
        reports: Any,
        principal: Principal,
        salon_id: int | None,
        key: CacheKey,
        name: ReportName,
        route: Any,
    ) -> bool:
        """Answer the endpoint's 429 and return True when the endpoint would refuse this
        miss before computing it (the module docstring); else return False, having sent
        nothing."""
        fairness = reports.fairness
        tenant = Tenant.of(principal, salon_id)
        if not fairness.full(tenant):
            return False  # within its share: the endpoint computes it
        parent = trace.get_current_span().get_span_context()
        if not parent.is_valid or parent.trace_flags.sampled:
            return False
        if not await reports.cache.would_fill(key) or not reports.stream.current:
            return False
        try:
            fairness.refuse_if_full(tenant)  # again: the round trip may have freed a share
        except TenantThrottled as refusal:
            _leave_for_telemetry(scope, name, salon_id, route)
            await fairness.hold(refusal)
            body, headers = self._rendered(refusal)
            self.refused += 1
            await send({"type": "http.response.start", "status": 429, "headers": list(headers)})
            await send({"type": "http.response.body", "body": body})
            return True
        return False

    def _rendered(self, refusal: TenantThrottled) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        retry_after = refusal.headers["Retry-After"]
        found = self._refusals.get(retry_after)
        if found is None:
            response = error_response(
                refusal.status_code, refusal.code, refusal.message, refusal.headers
            )
            found = self._refusals[retry_after] = (bytes(response.body), response.raw_headers)
        return found

    def _query(self, name: str, raw: bytes, model: type[PeriodQuery]) -> Any:
        """The parsed query, or ``_UNUSUAL`` when the endpoint would refuse it."""
        memo = self._queries
        found = memo.get((name, raw), None)
        if found is not None:
            return found
        try:
            text = raw.decode("latin-1")
            params = QueryParams(text)
            check_query_string(text, params)
            found = validate_query(params, model)
        except (APIError, RequestValidationError, UnicodeDecodeError):
            found = _UNUSUAL
        if len(memo) >= MEMO_ENTRIES:
            memo.clear()
        memo[(name, raw)] = found
        return found

    def _key(
        self,
        name: ReportName,
        raw: bytes,
        principal: Principal,
        known: Scope,
        query: Any,
        params_of: Callable[..., dict[str, Any]],
    ) -> Any:
        """The cache key, or ``_UNUSUAL`` when the endpoint would refuse the period or cursor."""
        today = local_today(known.timezone)
        memo_key = (name.value, raw, principal.scope_key, known.timezone, today)
        memo = self._keys
        found = memo.get(memo_key)
        if found is not None:
            return found
        key: CacheKey | object
        try:
            period = parse_period(query.start, query.end, today)
            key = cache_key(name, principal, known, params_of(query, period))
        except APIError:
            key = _UNUSUAL
        if len(memo) >= MEMO_ENTRIES:
            memo.clear()
        memo[memo_key] = key
        return key
