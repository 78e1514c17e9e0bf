"""Request dependencies, defined once as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.auth import InvalidToken, Principal
from service.errors import APIError
from service.resources import Resources


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
