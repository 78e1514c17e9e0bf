"""A lean ASGI middleware: one server span per request, its metrics and its stats.

The stock ASGI instrumentation opens three spans per request (the server span plus one per
``http.send`` / ``http.receive``) and costs more than this service's whole cached path; this
middleware opens one. Per request it:

- continues an incoming W3C ``traceparent``, opens a SERVER span named by route template
  (``GET /api/v1/optimized-reports/dashboard``), with ``http.request.method``, ``url.scheme``,
  ``http.route``, ``http.response.status_code``, and what the endpoint left in
  ``request.state``: ``report.name``, ``salon.id``, ``cache.result`` and ``cache.hit``;
- never records text the client chose: a path no route matches is named ``unmatched`` (span
  name, ``http.route``, metrics, stats) and ``url.path`` is recorded only when it is the route
  template itself; a method outside the HTTP standard ones is recorded as ``_OTHER``;
- adds ``X-Trace-Id`` to the response;
- records ``http.server.request.duration`` and feeds the stats aggregator and the error
  budgets' counter (every request, whatever the sampler decided); a sampled request's trace
  and span ids become the exemplar of its bucket (``telemetry/exemplars.py``);
- records an exception on the span (status ERROR, exception event) and lets the app's
  handlers answer the client; 5xx responses also mark the span as an error;
- reports N+1 patterns: five or more identical statements in one request.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from telemetry import attributes as attr
from telemetry.context import RequestContext, current_request
from telemetry.exemplars import exemplar_context
from telemetry.metrics import Instruments
from telemetry.nplusone import statement_fingerprint
from telemetry.stats import StatsAggregator
from telemetry.stats.slo import SloCounter

logger = logging.getLogger("salon_reports.n_plus_one")

Scope = dict[str, Any]
Receive = Any
Send = Any
N_PLUS_ONE_THRESHOLD = 5
UNMATCHED_ROUTE = "unmatched"
# The semantic conventions' known methods; anything else is recorded as "_OTHER".
KNOWN_METHODS = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"}
)
OTHER_METHOD = "_OTHER"


class _HeaderCarrier:
    """Read-only view of ASGI headers for the propagator (no dict copy)."""

    __slots__ = ("headers",)

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.headers = headers

    def get(self, key: str) -> list[str] | None:
        wanted = key.encode("latin-1")
        for name, value in self.headers:
            if name == wanted:
                return [value.decode("latin-1")]
        return None


class _CarrierGetter:
    def get(self, carrier: _HeaderCarrier, key: str) -> list[str] | None:
        return carrier.get(key)

    def keys(self, carrier: _HeaderCarrier) -> list[str]:
        return [name.decode("latin-1") for name, _ in carrier.headers]


_GETTER = _CarrierGetter()


class TelemetryMiddleware:
    def __init__(
        self,
        app: Any,
        *,
        tracer: trace.Tracer,
        instruments: Instruments,
        stats: StatsAggregator,
        slo: SloCounter | None = None,
    ) -> None:
        self.app = app
        self.tracer = tracer
        self.instruments = instruments
        self.stats = stats
        self.slo = slo

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        method = scope["method"] if scope["method"] in KNOWN_METHODS else OTHER_METHOD
        headers = scope.get("headers") or []
        parent = None
        for name, _ in headers:
            if name == b"traceparent":
                parent = propagate.extract(_HeaderCarrier(headers), getter=_GETTER)  # type: ignore[arg-type]
                break
        # No attributes at the start: the SDK would check and copy them for the 90 % of spans
        # that a 0.1 sampler drops (no sampler here reads them); set once it records. No
        # url.path yet: until a route matches, the path is whatever the client wrote
        # (`GET /someone@example.com`).
        span = self.tracer.start_span(method, context=parent, kind=SpanKind.SERVER)
        if span.is_recording():
            span.set_attribute(attr.HTTP_REQUEST_METHOD, method)
            span.set_attribute(attr.URL_SCHEME, scope.get("scheme", "http"))
        span_context = span.get_span_context()
        trace_id = format(span_context.trace_id, "032x") if span_context.is_valid else None
        request = RequestContext(scope=scope, trace_id=trace_id)
        token = current_request.set(request)
        status_code = 500
        trace_header = trace_id.encode() if trace_id is not None else None

        async def send_with_trace_id(message: dict[str, Any]) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
                if trace_header is not None:
                    message["headers"] = [
                        *message.get("headers", ()),
                        (b"x-trace-id", trace_header),
                    ]
            await send(message)

        try:
            # The exception is recorded once, below, with its error.type.
            with trace.use_span(
                span, end_on_exit=False, record_exception=False, set_status_on_exception=False
            ):
                await self.app(scope, receive, send_with_trace_id)
        except Exception as error:
            status_code = 500
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
            span.set_attribute(attr.ERROR_TYPE, type(error).__qualname__)
            raise
        finally:
            current_request.reset(token)
            self._finish(span, scope, method, status_code, started, request)

    def _finish(
        self,
        span: trace.Span,
        scope: Scope,
        method: str,
        status_code: int,
        started: float,
        request: RequestContext,
    ) -> None:
        route = request.route or UNMATCHED_ROUTE
        seconds = time.perf_counter() - started
        self.instruments.request_duration.record(
            seconds,
            {
                attr.HTTP_REQUEST_METHOD: method,
                attr.HTTP_ROUTE: route,
                attr.HTTP_RESPONSE_STATUS_CODE: status_code,
            },
            # The span is no longer current here: hand it over, so a sampled request leaves
            # its trace id as the bucket's exemplar (and an unsampled one leaves none).
            context=exemplar_context(span),
        )
        self.stats.record_request(f"{method} {route}", status_code, seconds * 1000)
        if self.slo is not None:
            self.slo.record(route, status_code, seconds)
        state = scope.get("state") or {}
        cache_result = state.get("cache_result")
        if cache_result is not None:
            report_name = state.get("report_name", "unknown")
            self.stats.record_cache(report_name, str(cache_result))
            self.instruments.count_cache(report_name, str(cache_result))
        self._check_n_plus_one(request, f"{method} {route}")
        if span.is_recording():
            span.update_name(f"{method} {route}")
            span.set_attribute(attr.HTTP_ROUTE, route)
            if route == scope.get("path"):  # a template without parameters: nothing chosen
                span.set_attribute(attr.URL_PATH, route)
            span.set_attribute(attr.HTTP_RESPONSE_STATUS_CODE, status_code)
            report = state.get("report_name")
            if report is not None:
                span.set_attribute(attr.REPORT_NAME, report)
            salon_id = state.get("salon_id")
            if salon_id is not None:
                span.set_attribute(attr.SALON_ID, salon_id)
            if cache_result is not None:
                span.set_attribute(attr.CACHE_RESULT, str(cache_result))
                span.set_attribute(attr.CACHE_HIT, str(cache_result) in ("hit", "stale"))
            if status_code >= 500:
                span.set_status(Status(StatusCode.ERROR))
        span.end()

    def _check_n_plus_one(self, request: RequestContext, route: str) -> None:
        if request.queries.total < N_PLUS_ONE_THRESHOLD:
            return
        for statement, count in request.queries.detections(N_PLUS_ONE_THRESHOLD).items():
            fingerprint = statement_fingerprint(statement)
            self.stats.record_n_plus_one(route, fingerprint, count, request.trace_id)
            logger.warning(
                json.dumps(
                    {
                        "event": "n_plus_one",
                        "route": route,
                        "statement": fingerprint,
                        "count": count,
                        "trace_id": request.trace_id,
                    }
                )
            )
