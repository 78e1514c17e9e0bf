"""The server span of ``telemetry/middleware.py``: no client-chosen text, a trace id on every
response (an unhandled 500 included)."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from tests.conftest import Api

PREFIX = "/api/v1/optimized-reports"


def server_spans(api: Api) -> list[ReadableSpan]:
    return [span for span in api.spans.get_finished_spans() if span.kind is SpanKind.SERVER]


def recorded_text(span: ReadableSpan) -> str:
    """Everything a span exports as text: name, attributes, events."""
    parts = [span.name, *(f"{key}={value}" for key, value in (span.attributes or {}).items())]
    for event in span.events:
        parts.append(event.name)
        parts.extend(f"{key}={value}" for key, value in (event.attributes or {}).items())
    return "\n".join(parts)


@pytest.mark.parametrize(
    "path", ["/someone@example.com", "/api/v1/optimized-reports/someone@example.com"]
)
async def test_an_unmatched_path_is_not_recorded(api: Api, path: str) -> None:
    response = await api.get(path)
    assert response.status_code == 404
    [server] = server_spans(api)
    assert "someone" not in recorded_text(server)
    assert "example.com" not in recorded_text(server)
    assert server.name == "GET unmatched"
    assert server.attributes is not None
    assert server.attributes["http.route"] == "unmatched"
    assert "url.path" not in server.attributes
    assert response.headers["x-trace-id"] == format(server.context.trace_id, "032x")
    metrics = await api.get("/metrics")
    stats = await api.get(f"{PREFIX}/performance/stats", api.token("ops"))
    assert stats.status_code == 200
    for exposition in (metrics.text, stats.text):
        assert "someone" not in exposition
        assert 'http_route="unmatched"' in exposition or "GET unmatched" in exposition


async def test_a_made_up_method_is_recorded_as_other(api: Api) -> None:
    response = await api.http.request("SOMEONE", f"{PREFIX}/dashboard")
    assert response.status_code == 405
    [server] = server_spans(api)
    assert "SOMEONE" not in recorded_text(server)
    assert server.attributes is not None
    assert server.attributes["http.request.method"] == "_OTHER"
    assert "SOMEONE" not in (await api.get("/metrics")).text


async def test_a_matched_route_keeps_its_path(api: Api) -> None:
    response = await api.get("/healthz")
    assert response.status_code == 200
    [server] = server_spans(api)
    assert server.name == "GET /healthz"
    assert server.attributes is not None
    assert server.attributes["url.path"] == "/healthz"
    assert server.attributes["http.route"] == "/healthz"


async def test_an_unhandled_error_answers_with_the_trace_id(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13: a 500 was answered outside the middleware, without X-Trace-Id to quote."""
    from service import performance

    def broken(*_: Any, **__: Any) -> dict[str, Any]:
        raise RuntimeError("boom")

    monkeypatch.setattr(performance, "local_snapshot", broken)
    response = await api.get(f"{PREFIX}/performance/stats", api.token("ops"))
    assert response.status_code == 500, response.text
    assert response.json() == {
        "error": {"code": "internal_error", "message": "internal server error"}
    }
    assert "boom" not in response.text
    [server] = server_spans(api)
    assert response.headers["x-trace-id"] == format(server.context.trace_id, "032x")
    assert server.status.status_code is StatusCode.ERROR
    assert server.attributes is not None
    assert server.attributes["http.response.status_code"] == 500
    assert server.attributes["error.type"] == "RuntimeError"
    [exception] = [event for event in server.events if event.name == "exception"]
    assert exception.attributes is not None
    assert exception.attributes["exception.type"] == "RuntimeError"
