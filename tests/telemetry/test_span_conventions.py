"""SQL and Redis spans speak the stable database conventions, and a new connection is a span.

Jaeger, Tempo and span metrics group database spans by the stable attributes, the ones our
metrics already use; the pre-stable names (db.statement, db.system, db.name, db.user,
net.peer.name, db.redis.database_index) must be gone. A request that has to open a connection
shows it as a ``connect`` span of its own trace, before its first statement.
"""

from __future__ import annotations

from typing import Any

from opentelemetry.trace import SpanKind

from tests.conftest import Api

STABLE_SQL = {
    "db.system.name",
    "db.namespace",
    "db.query.text",
    "db.operation.name",
    "db.query.summary",
    "server.address",
    "server.port",
}
STABLE_REDIS = STABLE_SQL
OLD = {
    "db.statement",
    "db.system",
    "db.name",
    "db.user",
    "net.peer.name",
    "net.peer.port",
    "db.redis.database_index",
}


def _clients(api: Api) -> tuple[list[Any], list[Any]]:
    spans = [s for s in api.spans.get_finished_spans() if s.kind is SpanKind.CLIENT]
    sql = [s for s in spans if s.attributes.get("db.system.name") == "postgresql"]
    redis = [s for s in spans if s.attributes.get("db.system.name") == "redis"]
    return sql, redis


async def test_sql_and_redis_spans_carry_the_stable_database_conventions(
    api: Api, data: dict[str, int]
) -> None:
    api.spans.clear()
    assert (await api.report("dashboard", salon_id=data["lisbon"])).status_code == 200
    sql, redis = _clients(api)
    statements = [s for s in sql if s.name not in ("connect", "ROLLBACK")]
    assert statements
    # A connection going back to the pool is rolled back: a statement of its own.
    rollbacks = [s for s in sql if s.name == "ROLLBACK"]
    assert rollbacks
    for span in rollbacks:
        assert set(span.attributes) >= STABLE_SQL, dict(span.attributes)
        assert span.attributes["db.operation.name"] == "ROLLBACK"
    assert redis
    for span in statements:
        assert set(span.attributes) >= STABLE_SQL, (span.name, dict(span.attributes))
        assert not set(span.attributes) & OLD, (span.name, dict(span.attributes))
        assert span.attributes["db.query.summary"] == span.name
        assert span.attributes["db.operation.name"] == "SELECT"
    for span in redis:
        assert set(span.attributes) >= STABLE_REDIS, (span.name, dict(span.attributes))
        assert not set(span.attributes) & OLD, (span.name, dict(span.attributes))
        assert span.attributes["db.query.summary"] == span.name
        assert "?" in span.attributes["db.query.text"] or " " not in span.name  # no values


async def test_a_new_connection_is_a_span_of_the_request_that_opened_it(
    api: Api, data: dict[str, int]
) -> None:
    await api.resources.read_engine.dispose()  # the next statement needs a new connection
    api.spans.clear()
    assert (await api.report("realtime", salon_id=data["lisbon"])).status_code == 200
    spans = api.spans.get_finished_spans()
    (server,) = [s for s in spans if s.kind is SpanKind.SERVER]
    connects = [s for s in spans if s.name == "connect"]
    assert len(connects) == 1, [s.name for s in spans]
    (connect,) = connects
    assert connect.context.trace_id == server.context.trace_id
    assert connect.parent is not None
    assert set(connect.attributes) >= {"db.system.name", "server.address", "server.port"}
    statements = [
        s for s in spans if s.attributes.get("db.query.summary", "").startswith("report.")
    ]
    assert statements
    assert connect.end_time <= min(s.start_time for s in statements)
    assert server.start_time <= connect.start_time
