"""The cache-hit path (``service.reports.hits``): the same answers as the endpoints, byte for
byte; everything unusual left to FastAPI; every request it answers traced and counted."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from service.health import AnswerLiveness
from service.reports.hits import CachedReportHits
from tests.conftest import Api

PREFIX = "/api/v1/optimized-reports"
# Timings and the trace id differ between any two answers; everything else must not.
VARYING = {"server-timing", "x-trace-id"}
SERVER_TIMING = re.compile(r"cache;dur=\d+\.\d, db;dur=\d+\.\d, total;dur=\d+\.\d")


def hits_of(api: Api) -> CachedReportHits:
    api.app.middleware_stack = api.app.middleware_stack or api.app.build_middleware_stack()
    layer: Any = api.app.middleware_stack
    while not isinstance(layer, CachedReportHits):
        layer = layer.app
    return layer


async def by_endpoint(api: Api, *args: Any, **kwargs: Any) -> httpx.Response:
    """The same request, answered by FastAPI (the hit path switched off)."""
    hits = hits_of(api)
    hits.enabled = False
    try:
        return await api.get(*args, **kwargs)
    finally:
        hits.enabled = True


def assert_same(fast: httpx.Response, slow: httpx.Response) -> None:
    assert fast.status_code == slow.status_code
    assert fast.content == slow.content
    names = [name for name, _ in fast.headers.raw]
    assert names == [name for name, _ in slow.headers.raw]  # same headers, same order
    for response in (fast, slow):
        assert SERVER_TIMING.fullmatch(response.headers["server-timing"])
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-trace-id"])
    fixed = [(n, v) for n, v in fast.headers.raw if n.decode() not in VARYING]
    assert fixed == [(n, v) for n, v in slow.headers.raw if n.decode() not in VARYING]


def report_cases(data: dict[str, int]) -> list[tuple[str, dict[str, Any]]]:
    salon = data["lisbon"]
    return [
        ("dashboard", {"salon_id": salon}),
        ("dashboard", {"salon_id": salon, "start": "2024-01-01", "end": "2024-03-31"}),
        ("bookings", {"salon_id": salon, "granularity": "week", "status": "completed"}),
        ("professionals", {"salon_id": salon, "limit": 1}),
        ("dashboard", {}),  # platform-wide, for an admin
    ]


@pytest.mark.parametrize("role", ["owner", "admin"])
async def test_a_hit_is_answered_byte_for_byte_as_the_endpoint_answers_it(
    api: Api, data: dict[str, int], role: str
) -> None:
    hits = hits_of(api)
    token = api.token(role, [data["lisbon"]] if role == "owner" else None)
    for report, params in report_cases(data):
        if role == "owner" and "salon_id" not in params:
            continue
        path = f"{PREFIX}/{report}"
        first = await api.get(path, token, params=params)  # a miss: stored, kept locally
        assert first.headers["x-cache"] == "MISS"
        answered = hits.answered
        fast = await api.get(path, token, params=params)
        assert hits.answered == answered + 1
        slow = await by_endpoint(api, path, token, params=params)
        assert hits.answered == answered + 1
        assert fast.headers["x-cache"] == "HIT"
        assert_same(fast, slow)
        assert fast.content == first.content
        # The validator round trip: 304 without a body, from both.
        etag = fast.headers["etag"]
        headers = {"If-None-Match": f'W/{etag}, "other"'}
        fast = await api.get(path, token, params=params, headers=headers)
        assert hits.answered == answered + 2
        slow = await by_endpoint(api, path, token, params=params, headers=headers)
        assert fast.status_code == 304
        assert_same(fast, slow)


async def test_anything_unusual_falls_through_to_the_endpoint(
    api: Api, data: dict[str, int]
) -> None:
    hits = hits_of(api)
    salon, other = data["lisbon"], data["newyork"]
    owner = api.token("owner", [salon])
    path = f"{PREFIX}/dashboard"
    await api.get(path, owner, params={"salon_id": salon})
    # Entries held locally: the other salon's for owners too (an owner of both filled it),
    # and for admins; the key holds the role, not the token's salons.
    await api.get(path, api.token("owner", [salon, other]), params={"salon_id": other})
    await api.get(path, api.token(), params={"salon_id": other})
    unusual: list[tuple[str, str | None, dict[str, Any], dict[str, str]]] = [
        ("no token", None, {"salon_id": salon}, {}),
        ("a bad token", "not-a-token", {"salon_id": salon}, {}),
        ("another salon", owner, {"salon_id": other}, {}),
        ("platform-wide for an owner", owner, {}, {}),
        ("an ops token", api.token("ops"), {"salon_id": salon}, {}),
        ("a number not in plain digits", owner, {"salon_id": f"+{salon}"}, {}),
        ("a parameter given twice", owner, {"salon_id": [salon, salon]}, {}),
        ("a bad period", owner, {"salon_id": salon, "start": "2024-02-30"}, {}),
        ("a period too long", owner, {"salon_id": salon, "start": "2020-01-01"}, {}),
        ("an unknown salon", api.token(), {"salon_id": 987_654_321}, {}),
        ("a cold entry", owner, {"salon_id": salon, "end": "2024-05-31"}, {}),
        ("two tokens", owner, {"salon_id": salon}, {"x-second": "1"}),
    ]
    for reason, token, params, extra in unusual:
        answered = hits.answered
        headers = dict(extra)
        if reason == "two tokens":
            # httpx joins repeated headers given as a dict; send them raw.
            request = api.http.build_request("GET", path, params=params)
            request.headers = httpx.Headers(
                [("authorization", f"Bearer {token}"), ("authorization", "Bearer x")]
            )
            fast = await api.http.send(request)
            hits.enabled = False
            try:
                request = api.http.build_request("GET", path, params=params)
                request.headers = httpx.Headers(
                    [("authorization", f"Bearer {token}"), ("authorization", "Bearer x")]
                )
                slow = await api.http.send(request)
            finally:
                hits.enabled = True
        else:
            fast = await api.get(path, token, params=params, headers=headers)
            slow = await by_endpoint(api, path, token, params=params, headers=headers)
        assert hits.answered == answered, reason
        assert fast.status_code == slow.status_code, reason
        if fast.status_code != 200:
            assert fast.json() == slow.json(), reason
    # A method other than GET, and a trailing slash, are FastAPI's to answer.
    answered = hits.answered
    assert (await api.http.head(path, headers={"Authorization": f"Bearer {owner}"})).status_code
    await api.get(f"{path}/", owner, params={"salon_id": salon})
    assert hits.answered == answered


def _sample(api: Api, name: str, labels: dict[str, str]) -> float:
    """The sum of the samples ``name`` whose labels include ``labels``, as /metrics shows."""
    return sum(
        float(sample.value)
        for metric in api.app.state.telemetry.registry.collect()
        for sample in metric.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


async def test_hits_it_answers_are_counted_in_the_stats_and_the_metrics(
    api: Api, data: dict[str, int]
) -> None:
    hits = hits_of(api)
    salon = data["lisbon"]
    owner = api.token("owner", [salon])
    path = f"{PREFIX}/dashboard"
    await api.get(path, owner, params={"salon_id": salon})
    stats = api.app.state.telemetry.stats
    route = f"GET {path}"
    labels = {"http_request_method": "GET", "http_route": path, "http_response_status_code": "200"}
    cache_labels = {"report_name": "dashboard", "cache_result": "hit"}

    def counted() -> tuple[int, int, float, float]:
        since = stats.snapshot()["since_start"]
        return (
            since["endpoints"][route]["latency"]["count"],
            since["cache"].get("dashboard", {}).get("hit", 0),
            _sample(api, "http_server_request_duration_seconds_count", labels),
            _sample(api, "reports_cache_requests_total", cache_labels),
        )

    before, answered = counted(), hits.answered
    api.spans.clear()
    for _ in range(7):
        response = await api.get(path, owner, params={"salon_id": salon})
        assert response.headers["x-cache"] == "HIT"
    assert hits.answered == answered + 7
    after = counted()
    assert [b - a for a, b in zip(before, after, strict=True)] == [7, 7, 7, 7]
    # Traced as the endpoint's hits are: a server span named by route, with its cache span.
    spans = api.spans.get_finished_spans()
    servers = [span for span in spans if span.name == route]
    assert len(servers) == 7
    assert len([span for span in spans if span.name == "cache.get"]) == 7
    attributes = servers[-1].attributes or {}
    assert attributes["cache.result"] == "hit"
    assert attributes["salon.id"] == salon
    assert attributes["http.response.status_code"] == 200


def liveness_of(api: Api) -> AnswerLiveness:
    api.app.middleware_stack = api.app.middleware_stack or api.app.build_middleware_stack()
    layer: Any = api.app.middleware_stack
    while not isinstance(layer, AnswerLiveness):
        layer = layer.app
    return layer


async def test_healthz_is_answered_before_routing_as_the_route_answers_it(api: Api) -> None:
    liveness = liveness_of(api)
    first = await api.get("/healthz")  # FastAPI's answer: the layer learns the route
    assert liveness.route is not None
    fast = await api.get("/healthz")
    route = liveness.route
    liveness.route = None  # FastAPI answers again
    try:
        slow = await api.get("/healthz")
    finally:
        liveness.route = route
    for response in (first, fast, slow):
        assert response.status_code == 200
        assert response.content == b'{"status":"ok"}'
    fixed = [(n, v) for n, v in fast.headers.raw if n != b"x-trace-id"]
    assert fixed == [(n, v) for n, v in slow.headers.raw if n != b"x-trace-id"]
    assert [n for n, _ in fast.headers.raw] == [n for n, _ in slow.headers.raw]
    # Counted and traced like any request.
    stats = api.app.state.telemetry.stats
    labels = {"http_route": "/healthz", "http_response_status_code": "200"}
    before = stats.snapshot()["since_start"]["endpoints"]["GET /healthz"]["latency"]["count"]
    metric_before = _sample(api, "http_server_request_duration_seconds_count", labels)
    api.spans.clear()
    for _ in range(5):
        assert (await api.get("/healthz")).status_code == 200
    after = stats.snapshot()["since_start"]["endpoints"]["GET /healthz"]["latency"]["count"]
    assert after - before == 5
    assert _sample(api, "http_server_request_duration_seconds_count", labels) - metric_before == 5
    assert [span.name for span in api.spans.get_finished_spans()] == ["GET /healthz"] * 5


async def test_a_hit_it_answers_counts_as_a_read_for_the_recomputation(
    api: Api, data: dict[str, int]
) -> None:
    """Keys read recently are recomputed after an invalidation (``refresh_recent``): a hit
    answered here is such a read, and a key not remembered is left to the endpoint."""
    cache = api.resources.cache
    cache.refresh_recent = 120.0  # as REPORTS_CACHE_REFRESH_RECENT sets it
    hits = hits_of(api)
    salon = data["lisbon"]
    owner = api.token("owner", [salon])
    path = f"{PREFIX}/dashboard"
    await api.get(path, owner, params={"salon_id": salon})
    [name] = [name for name, record in cache._recent.items() if record[0].report == "dashboard"]
    key, ttl, compute, _ = cache._recent[name]
    cache._recent[name] = (key, ttl, compute, 0.0)  # read long ago
    answered = hits.answered
    await api.get(path, owner, params={"salon_id": salon})
    assert hits.answered == answered + 1
    assert cache._recent[name][3] > 0.0  # read again, just now
    del cache._recent[name]  # as when its recomputation is scheduled
    response = await api.get(path, owner, params={"salon_id": salon})
    assert response.headers["x-cache"] == "HIT"
    assert hits.answered == answered + 1  # the endpoint answered, and remembered it
    assert name in cache._recent
