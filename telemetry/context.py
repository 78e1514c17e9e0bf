"""The request being served, visible to the SQL hooks without passing it down the stack."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from telemetry.nplusone import RequestQueryTracker


@dataclass(slots=True)
class RequestContext:
    scope: dict[str, Any]
    trace_id: str | None
    queries: RequestQueryTracker = field(default_factory=RequestQueryTracker)

    @property
    def route(self) -> str | None:
        route = self.scope.get("route")
        path = getattr(route, "path", None)
        return path if isinstance(path, str) else None


current_request: ContextVar[RequestContext | None] = ContextVar("current_request", default=None)
