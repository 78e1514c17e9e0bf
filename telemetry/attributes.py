"""Span and metric attribute keys, in one place.

Semantic-convention keys where one exists; the service's own start with ``report.``,
``salon.`` or ``cache.``. No attribute ever carries a parameter value, a token, an email or
a client's name: ids of salons are the only tenant data recorded.
"""

from __future__ import annotations

# HTTP (semantic conventions)
HTTP_REQUEST_METHOD = "http.request.method"
HTTP_ROUTE = "http.route"
HTTP_RESPONSE_STATUS_CODE = "http.response.status_code"
URL_PATH = "url.path"
URL_SCHEME = "url.scheme"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
USER_AGENT_ORIGINAL = "user_agent.original"
ERROR_TYPE = "error.type"

# Database (semantic conventions)
DB_SYSTEM_NAME = "db.system.name"
DB_NAMESPACE = "db.namespace"
DB_OPERATION_NAME = "db.operation.name"
DB_QUERY_TEXT = "db.query.text"
DB_QUERY_SUMMARY = "db.query.summary"
DB_RESPONSE_RETURNED_ROWS = "db.response.returned_rows"
DB_CLIENT_CONNECTION_STATE = "db.client.connection.state"
DB_CLIENT_CONNECTION_POOL_NAME = "db.client.connection.pool.name"

# The service's own
REPORT_NAME = "report.name"
SALON_ID = "salon.id"
CACHE_RESULT = "cache.result"
CACHE_HIT = "cache.hit"
CACHE_OPERATION = "cache.operation"

POSTGRESQL = "postgresql"
