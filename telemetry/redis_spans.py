"""The stable database conventions on the Redis instrumentation's spans.

``opentelemetry-instrumentation-redis`` with ``OTEL_SEMCONV_STABILITY_OPT_IN=database,http``
(``telemetry.setup``) writes ``db.system.name``, ``db.query.text`` (arguments replaced by
``?``), ``server.address`` and ``server.port``; this hook, run before each span ends, adds
what it leaves out: ``db.operation.name`` (the command, or ``PIPELINE``), ``db.query.summary``
(the span's name: the command, or the pipeline's commands) and ``db.namespace`` (the database
index).

``trace_connections`` makes each new connection of a client's pool a ``connect`` span (CLIENT,
``db.system.name=redis``, ``db.namespace``, ``server.address``, ``server.port``), a child of
the command that had to open it — only under a span that records: background work, which is
not traced, opens its connections without one.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.trace import Span, SpanKind

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


def trace_connections(client: Any, tracer: trace.Tracer) -> bool:
    """Make the new connections of ``client``'s pool ``connect`` spans; ``False`` for a client
    without one pool (a cluster client: its connections are not traced apart)."""
    pool = getattr(client, "connection_pool", None)
    base = getattr(pool, "connection_class", None)
    if pool is None or base is None:
        return False

    class TracedConnection(base):  # type: ignore[valid-type,misc]
        async def connect_check_health(self, *args: Any, **kwargs: Any) -> None:
            if (
                self.is_connected
                or not trace.get_current_span().is_recording()
                or not is_instrumentation_enabled()
            ):
                await super().connect_check_health(*args, **kwargs)
                return
            attributes: dict[str, str | int] = {
                attr.DB_SYSTEM_NAME: "redis",
                attr.DB_NAMESPACE: str(getattr(self, "db", 0)),
            }
            host, port = getattr(self, "host", None), getattr(self, "port", None)
            if host is not None:
                attributes[attr.SERVER_ADDRESS] = str(host)
            if port is not None:
                attributes[attr.SERVER_PORT] = int(port)
            with tracer.start_as_current_span(
                "connect", kind=SpanKind.CLIENT, attributes=attributes
            ):
                await super().connect_check_health(*args, **kwargs)

    TracedConnection.__name__ = TracedConnection.__qualname__ = f"Traced{base.__name__}"
    pool.connection_class = TracedConnection
    return True
