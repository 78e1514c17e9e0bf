"""The stable database conventions on the Redis instrumentation's spans.

``opentelemetry-instrumentation-redis`` with ``OTEL_SEMCONV_STABILITY_OPT_IN=database,http``
(``telemetry.setup``) writes ``db.system.name``, ``db.query.text`` (arguments replaced by
``?``), ``server.address`` and ``server.port``; this hook, run before each span ends, adds
what it leaves out: ``db.operation.name`` (the command, or ``PIPELINE``), ``db.query.summary``
(the span's name: the command, or the pipeline's commands) and ``db.namespace`` (the database
index).
"""

from __future__ import annotations

from typing import Any

from opentelemetry.trace import Span

from telemetry import attributes as attr


def complete_redis_span(span: Span, instance: Any, _response: Any) -> None:
    if not span.is_recording():
        return
    name = str(getattr(span, "name", "") or "")
    pipeline = hasattr(instance, "command_stack")
    span.set_attribute(attr.DB_OPERATION_NAME, "PIPELINE" if pipeline else name.split(" ")[0])
    if name:
        span.set_attribute(attr.DB_QUERY_SUMMARY, name)
    pool = getattr(instance, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None) or {}
    span.set_attribute(attr.DB_NAMESPACE, str(kwargs.get("db", 0)))
