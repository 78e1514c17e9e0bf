"""Request dependencies, defined once as ``Annotated`` aliases."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncEngine

from service.auth import InvalidToken, Principal, TokenVerifier
from service.cache import ReportCache
from service.cache.listener import InvalidationListener
from service.changes.consumer import ChangeConsumer, StreamMonitor, StreamStatus
from service.config import Settings
from service.errors import APIError
from service.reports.service import ReportService
from service.schema_version import expected_revisions
from telemetry.setup import Telemetry

if TYPE_CHECKING:
    from service.performance import StatsPublisher
    from telemetry.sql import SqlTelemetry


@dataclass
class Resources:
    """Everything the app creates in its lifespan and tears down after."""

    settings: Settings
    engine: AsyncEngine
    read_engine: AsyncEngine
    cache: ReportCache
    reports: ReportService
    listener: InvalidationListener | None
    telemetry: Telemetry
    tokens: TokenVerifier
    publisher: StatsPublisher | None = None
    sql_hooks: list[SqlTelemetry] = field(default_factory=list)
    schema_heads: frozenset[str] = field(default_factory=expected_revisions)  # read at start
    stream: StreamStatus = field(default_factory=lambda: StreamStatus())
    stream_monitor: StreamMonitor | None = None
    consumer: ChangeConsumer | None = None


# Every dependency is `async def`: a plain `def` one is run in a worker thread, which costs
# more than everything else on a cached request.
async def get_resources(request: Request) -> Resources:
    resources: Resources = request.app.state.resources
    return resources


ResourcesDep = Annotated[Resources, Depends(get_resources)]

_bearer = HTTPBearer(auto_error=False, description="A token from `salon-reports token`.")


def _verify(resources: Resources, credentials: HTTPAuthorizationCredentials | None) -> Principal:
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise APIError(401, "unauthorized", "missing bearer token", challenge)
    try:
        return resources.tokens.verify(credentials.credentials)
    except InvalidToken:
        raise APIError(401, "unauthorized", "invalid or expired token", challenge) from None


async def get_principal(
    resources: ResourcesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    return _verify(resources, credentials)


async def authenticate(request: Request) -> Principal:
    """``get_principal`` without the dependency machinery, for the report endpoints' hot path
    (their OpenAPI declares the same bearer scheme; see ``service.reports.endpoints``)."""
    return _verify(request.app.state.resources, await _bearer(request))


PrincipalDep = Annotated[Principal, Depends(get_principal)]


async def get_report_service(resources: ResourcesDep) -> ReportService:
    return resources.reports


ReportServiceDep = Annotated[ReportService, Depends(get_report_service)]


async def require_admin(principal: PrincipalDep) -> Principal:
    if principal.role != "admin":
        raise APIError(403, "forbidden", "this operation is for admins")
    return principal


AdminDep = Annotated[Principal, Depends(require_admin)]


async def require_operator(principal: PrincipalDep) -> Principal:
    if principal.role not in ("admin", "ops"):
        raise APIError(403, "forbidden", "performance statistics are for admins and ops")
    return principal


OperatorDep = Annotated[Principal, Depends(require_operator)]
