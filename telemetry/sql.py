"""SQL statement telemetry: a span per statement, its duration and rows, slow-query reports.

A new connection of the pool is a ``connect`` span of its own (the request that waited for it
is its parent), with ``db.system.name``, ``server.address``, ``server.port`` and
``db.namespace``.

Spans come from ``opentelemetry-instrumentation-sqlalchemy`` (its ``EngineTracer``, attached
per engine so that several apps in one process each keep their own tracer provider). Our
hooks, which run before its span ends, rename the span after the query (the
``query_name`` execution option, e.g. ``report.dashboard``) and add
``db.query.summary`` and ``db.response.returned_rows``. They also record
``db.client.operation.duration`` (``db.system.name``, ``db.namespace``, ``db.operation.name``,
``db.query.summary``, ``server.address``, ``server.port``, and ``error.type`` on a failed or
timed-out statement; a sampled statement's trace and span ids as its bucket's exemplar) and
``db.client.response.returned_rows``, feed the stats
aggregator (every statement, sampled or not), and for a statement slower than the threshold
write one structured JSON log line with the trace and span ids and add a ``slow_query`` span
event. The statement text recorded has placeholders only; parameter values never leave.
"""

from __future__ import annotations

import json
import logging
import re
import time
from functools import lru_cache
from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.sqlalchemy.engine import (
    EngineTracer,
    _after_cur_exec,
    _handle_error,
)
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.metrics import NoOpMeterProvider
from sqlalchemy import event
from sqlalchemy.engine import Engine

from telemetry import attributes as attr
from telemetry.context import current_request
from telemetry.exemplars import exemplar_context
from telemetry.metrics import Instruments, PoolGauges
from telemetry.stats import StatsAggregator

logger = logging.getLogger("salon_reports.slow_query")

UNNAMED_QUERY = "sql.other"


_TOP_LEVEL = re.compile(r"\(|\)|\b(SELECT|INSERT|UPDATE|DELETE|MERGE)\b", re.IGNORECASE)


@lru_cache(maxsize=512)
def operation_name(statement: str) -> str | None:
    """The statement's operation (``db.operation.name``): the first top-level verb after any
    ``WITH`` list, so a CTE query is the ``SELECT`` (or ``INSERT`` ...) it ends in."""
    depth = 0
    for match in _TOP_LEVEL.finditer(statement):
        token = match.group(0)
        if token == "(":
            depth += 1
        elif token == ")":
            depth -= 1
        elif depth == 0:
            return token.upper()
    return None


class SqlTelemetry:
    """Attach to one (sync) engine; ``detach()`` removes our hooks."""

    def __init__(
        self,
        engine: Engine,
        *,
        tracer_provider: trace.TracerProvider,
        instruments: Instruments,
        stats: StatsAggregator,
        slow_query_ms: float,
        pool: PoolGauges | None = None,
    ) -> None:
        self.engine = engine
        self.pool = pool
        self.instruments = instruments
        self.stats = stats
        self.slow_query_ms = slow_query_ms
        # Listen before the instrumentation does: listeners run in registration order, and
        # ours must see the statement's span before the instrumentation's hook ends it.
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)
        event.listen(engine, "handle_error", self._failed)
        # A new connection (the pool's first use, a replacement after an error): its own span,
        # so a slow first request says where its time went.
        event.listen(engine, "do_connect", self._connecting)
        event.listen(engine, "connect", self._connected)
        self._connect_tracer = tracer_provider.get_tracer("salon-reports")
        # Which server and database (primary and replica engines differ here).
        url = engine.url
        self._server_attributes: dict[str, str | int] = {
            attr.SERVER_ADDRESS: url.host or "localhost",
            attr.SERVER_PORT: url.port or 5432,
            attr.DB_NAMESPACE: url.database or "",
        }
        self._connect_attributes = {attr.DB_SYSTEM_NAME: attr.POSTGRESQL, **self._server_attributes}
        # The ROLLBACK a connection gets when it goes back to the pool (or from an explicit
        # rollback): a round trip no statement span covers. A span under a recording parent.
        self._rollback_attributes = {
            **self._connect_attributes,
            attr.DB_QUERY_TEXT: "ROLLBACK",
            attr.DB_OPERATION_NAME: "ROLLBACK",
            attr.DB_QUERY_SUMMARY: "ROLLBACK",
        }
        dialect = engine.dialect
        self._do_rollback = dialect.do_rollback
        dialect.do_rollback = self._rollback  # type: ignore[method-assign]
        unused = NoOpMeterProvider().get_meter("unused").create_up_down_counter("unused")
        self._tracer = EngineTracer(  # type: ignore[no-untyped-call]
            tracer_provider.get_tracer("opentelemetry.instrumentation.sqlalchemy"),
            engine,
            unused,
        )

    def _rollback(self, dbapi_connection: Any) -> None:
        if not trace.get_current_span().is_recording() or not is_instrumentation_enabled():
            self._do_rollback(dbapi_connection)
            return
        with self._connect_tracer.start_as_current_span(
            "ROLLBACK", kind=trace.SpanKind.CLIENT, attributes=self._rollback_attributes
        ):
            self._do_rollback(dbapi_connection)

    def detach(self) -> None:
        self.engine.dialect.do_rollback = self._do_rollback  # type: ignore[method-assign]
        event.remove(self.engine, "before_cursor_execute", self._before)
        event.remove(self.engine, "after_cursor_execute", self._after)
        event.remove(self.engine, "handle_error", self._failed)
        event.remove(self.engine, "do_connect", self._connecting)
        event.remove(self.engine, "connect", self._connected)
        for identifier, listener in (
            ("before_cursor_execute", self._tracer._before_cur_exec),
            ("after_cursor_execute", _after_cur_exec),
            ("handle_error", _handle_error),
            ("connect", self._tracer._pool_connect),
            ("close", self._tracer._pool_close),
            ("checkin", self._tracer._pool_checkin),
            ("checkout", self._tracer._pool_checkout),
        ):
            if event.contains(self.engine, identifier, listener):
                event.remove(self.engine, identifier, listener)

    @staticmethod
    def _connecting(_dialect: Any, record: Any, _cargs: Any, _cparams: Any) -> None:
        record.info["_reports_connect_started"] = time.time_ns()

    def _connected(self, _dbapi_connection: Any, record: Any) -> None:
        """The span of a connection just made: from the driver's connect to the pool's."""
        started = record.info.pop("_reports_connect_started", None)
        if started is None:
            return
        ended = time.time_ns()
        span = self._connect_tracer.start_span(
            "connect",
            kind=trace.SpanKind.CLIENT,
            start_time=started,
            attributes=self._connect_attributes,
        )
        span.end(end_time=ended)
        if self.pool is not None:
            self.pool.record_create((ended - started) / 1e9)

    @staticmethod
    def _before(
        _conn: Any, _cursor: Any, _statement: str, _params: Any, context: Any, _many: bool
    ) -> None:
        context._reports_started = time.perf_counter()

    def _failed(self, exception_context: Any) -> None:
        """A statement that failed (a statement timeout, say) still took its time: record it,
        with ``error.type`` (the SQLSTATE, e.g. ``57014`` for a cancelled statement, or the
        exception's class)."""
        context = exception_context.execution_context
        if context is None:
            return
        error = exception_context.original_exception
        context._reports_error_type = getattr(error, "sqlstate", None) or type(error).__name__
        self._after(None, None, exception_context.statement or "", None, context, False)

    def _after(
        self, _conn: Any, cursor: Any, statement: str, _params: Any, context: Any, _many: bool
    ) -> None:
        started = getattr(context, "_reports_started", None)
        if started is None:
            return
        context._reports_started = None  # once per statement, whether it succeeded or not
        seconds = time.perf_counter() - started
        name = str(context.execution_options.get("query_name") or UNNAMED_QUERY)
        rowcount = getattr(cursor, "rowcount", None)
        rows = rowcount if isinstance(rowcount, int) else -1
        labels = {attr.DB_SYSTEM_NAME: attr.POSTGRESQL, attr.DB_QUERY_SUMMARY: name}
        operation = operation_name(statement)
        duration_labels: dict[str, str | int] = {**self._server_attributes, **labels}
        if operation is not None:
            duration_labels[attr.DB_OPERATION_NAME] = operation
        error_type = getattr(context, "_reports_error_type", None)
        if error_type is not None:
            duration_labels[attr.ERROR_TYPE] = error_type
        span = getattr(context, "_otel_span", None)
        # The statement's span, if sampled, is the exemplar of its bucket.
        self.instruments.db_duration.record(
            seconds, duration_labels, context=exemplar_context(span)
        )
        if rows >= 0:
            self.instruments.db_rows.record(rows, labels)

        span_context = span.get_span_context() if span is not None else None
        request = current_request.get()
        trace_id = None
        if span_context is not None and span_context.is_valid:
            trace_id = format(span_context.trace_id, "032x")
        elif request is not None:
            trace_id = request.trace_id
        if span is not None and span.is_recording():
            span.update_name(name)
            span.set_attribute(attr.DB_QUERY_SUMMARY, name)
            if operation is not None:
                span.set_attribute(attr.DB_OPERATION_NAME, operation)
            if rows >= 0:
                span.set_attribute(attr.DB_RESPONSE_RETURNED_ROWS, rows)

        route = request.route if request is not None else None
        milliseconds = seconds * 1000
        self.stats.record_query(name, milliseconds, rows, trace_id, route)
        if request is not None:
            request.queries.add(statement)
        if milliseconds >= self.slow_query_ms:
            self._report_slow(name, milliseconds, rows, trace_id, span_context, route, span)

    def _report_slow(
        self,
        name: str,
        milliseconds: float,
        rows: int,
        trace_id: str | None,
        span_context: Any,
        route: str | None,
        span: Any,
    ) -> None:
        span_id = None
        if span_context is not None and span_context.is_valid:
            span_id = format(span_context.span_id, "016x")
        logger.warning(
            json.dumps(
                {
                    "event": "slow_query",
                    "query": name,
                    "duration_ms": round(milliseconds, 1),
                    "threshold_ms": self.slow_query_ms,
                    "rows": rows,
                    "route": route,
                    "trace_id": trace_id,
                    "span_id": span_id,
                }
            )
        )
        if span is not None and span.is_recording():
            span.add_event(
                "slow_query", {"duration_ms": milliseconds, "threshold_ms": self.slow_query_ms}
            )
