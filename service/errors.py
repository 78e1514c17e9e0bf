"""JSON errors: every failure leaves as ``{"error": {"code", "message"}}``, never HTML.

The errors, their JSON body, the OpenAPI declaration of that body (``error_responses``) and the
handlers that turn every failure into it.

An unhandled exception is answered by ``AnswerUnhandledErrors``, inside the telemetry
middleware, so that its 500 carries ``X-Trace-Id`` like every other response; the exception
then goes on up, for the server span to record it and for Starlette to log it.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

logger = logging.getLogger("service.errors")

DATABASE_RETRY_AFTER_SECONDS = 2


class APIError(Exception):
    """An error with an HTTP status, a stable machine-readable code and a human message."""

    def __init__(
        self, status_code: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.headers = headers or {}


class DatabaseUnavailable(APIError):
    def __init__(self, message: str = "the database is unavailable; retry shortly") -> None:
        super().__init__(
            503,
            "database_unavailable",
            message,
            {"Retry-After": str(DATABASE_RETRY_AFTER_SECONDS)},
        )


class CacheUnavailable(APIError):
    """An operation on the cache itself (the admin clear) while Redis cannot be reached."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(
            503,
            "cache_unavailable",
            "the cache (Redis) cannot be reached, so it was not cleared; retry shortly",
            {"Retry-After": str(max(1, math.ceil(retry_after)))},
        )


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    code: str
    message: str


class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    error: ErrorDetail


ERROR_DESCRIPTIONS = {
    400: "Malformed cursor",
    401: "Missing, invalid or expired token",
    403: "Valid token, but the salon or report is out of its scope",
    404: "Unknown salon",
    414: "Query string too long",
    413: "The body is too large",
    415: "The body is not JSON",
    422: "Invalid parameters (or a parameter given twice)",
    429: "This salon is over its share of report computations (its queue is full or its turn "
    "did not come in time): `tenant_throttled`; retry after the Retry-After header. Cached "
    "reports are still served",
    503: "Database unavailable (retry after the Retry-After header)",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` declaring the JSON error body for each of ``statuses``."""
    return {
        status: {
            "model": ErrorBody,
            "description": ERROR_DESCRIPTIONS[status],
            **({"headers": RETRY_AFTER} if status == 429 else {}),
        }
        for status in statuses
    }


RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer", "minimum": 1},
    }
}


def error_response(
    status_code: int, code: str, message: str, headers: dict[str, str] | None = None
) -> Response:
    body = orjson.dumps({"error": {"code": code, "message": message}})
    return Response(body, status_code=status_code, media_type="application/json", headers=headers)


def _describe_validation(errors: list[Any]) -> str:
    parts = []
    for error in errors[:5]:
        location = ".".join(str(part) for part in error.get("loc", ()) if part != "query")
        parts.append(f"{location}: {error.get('msg', 'invalid')}" if location else error["msg"])
    return "; ".join(parts) or "invalid request"


def database_error(error: Exception) -> APIError:
    """Map a database failure to the error the client sees."""
    if isinstance(error, PoolTimeoutError):
        return DatabaseUnavailable("all database connections are busy; retry shortly")
    if isinstance(error, DBAPIError) and "statement timeout" in str(error.orig):
        return DatabaseUnavailable("the report query timed out; retry shortly")
    return DatabaseUnavailable()


class AnswerUnhandledErrors:
    """ASGI middleware: answer an exception no handler took with the JSON 500, then re-raise.

    Starlette answers such an exception in its outermost middleware, outside every middleware
    the app adds, so that answer would carry no trace id.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            if not started:  # otherwise the client gets a cut response, as it would anyway
                answer = error_response(500, "internal_error", "internal server error")
                await answer(scope, receive, send)
            raise


def install_error_handlers(app: FastAPI) -> None:
    """The JSON handlers, and ``AnswerUnhandledErrors`` as the innermost middleware so far:
    call this before adding the telemetry middleware, which must wrap it."""

    async def on_api_error(_: Request, error: Exception) -> Response:
        assert isinstance(error, APIError)
        return error_response(error.status_code, error.code, error.message, error.headers)

    async def on_validation_error(_: Request, error: Exception) -> Response:
        assert isinstance(error, RequestValidationError)
        return error_response(422, "validation_error", _describe_validation(list(error.errors())))

    async def on_http_error(_: Request, error: Exception) -> Response:
        assert isinstance(error, StarletteHTTPException)
        codes = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}
        code = codes.get(error.status_code, "http_error")
        return error_response(error.status_code, code, str(error.detail), dict(error.headers or {}))

    async def on_database_error(_: Request, error: Exception) -> Response:
        logger.warning("database unavailable: %s", type(error).__name__)
        api_error = database_error(error)
        return error_response(
            api_error.status_code, api_error.code, api_error.message, api_error.headers
        )

    async def on_unexpected(_: Request, error: Exception) -> Response:
        logger.exception("unhandled error", exc_info=error)
        return error_response(500, "internal_error", "internal server error")

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(OperationalError, on_database_error)
    app.add_exception_handler(PoolTimeoutError, on_database_error)
    app.add_exception_handler(Exception, on_unexpected)
    app.add_middleware(AnswerUnhandledErrors)
