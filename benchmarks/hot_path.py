"""Where a cached request's time goes, in process: the app driven through ASGI, no HTTP server.

Starts the service's app (its lifespan: pools, Redis, listener) on the benchmark dataset
(``benchmarks.dataset``) with the ``OTEL_*`` variables of the environment, warms one owner's
dashboard into the cache, then calls the app's ASGI entry point ``--requests`` times for each
workload, as uvicorn would (a scope, a ``receive`` and a ``send``), and reports the CPU time
per request (``time.process_time``, so other processes on the machine do not count) with the
cache-hit path on and off (``off``: every request through FastAPI's routing and the endpoint,
as before the hit path existed). With ``--profile``, cProfile's top functions by own time per
workload. uvicorn's own share (the HTTP parser, the transport) is not in these figures: it is
the same for the bare app.

    OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.1 \\
        python -m benchmarks.hot_path [--requests 20000] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from benchmarks import bare_app
from benchmarks.dataset import ensure_dataset
from service.auth import issue_token
from service.config import get_settings
from service.main import create_app
from service.paths import API_PREFIX
from service.reports.hits import CachedReportHits

Message = dict[str, Any]


def _scope(path: str, query: bytes, token: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query,
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"user-agent", b"wrk"),
            (b"authorization", f"Bearer {token}".encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


async def _receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def call(app: Callable[..., Awaitable[None]], scope: dict[str, Any]) -> int:
    status = 0

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(dict(scope, state={}), _receive, send)
    return status


async def measure(
    app: Any, scope: dict[str, Any], requests: int, profile: bool
) -> tuple[float, str | None]:
    """CPU µs per request, and the profile's top lines."""
    for _ in range(200):
        if await call(app, scope) != 200:
            raise RuntimeError(f"{scope['path']} did not answer 200")
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        profiler.enable()
    started = time.process_time()
    for _ in range(requests):
        await call(app, scope)
    used = time.process_time() - started
    if profiler is None:
        return used * 1e6 / requests, None
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(18)
    text = re.sub(r"/[^\s:]*/(site-packages|wt-\d+)/", "", out.getvalue())
    return used * 1e6 / requests, text


def _hits(stack: Any) -> CachedReportHits:
    layer = stack
    while not isinstance(layer, CachedReportHits):
        layer = layer.app
    return layer


async def run(requests: int, profile: bool) -> None:
    dataset = ensure_dataset(stream=True)
    settings = get_settings().model_copy(
        update={"database_url": dataset.url, "read_database_url": None}
    )
    app = create_app(settings)
    bare = bare_app.create_app()
    owner_salon = 1
    token = issue_token(settings.jwt_secret, role="owner", salon_ids=[owner_salon])
    cached = _scope(f"{API_PREFIX}/dashboard", f"salon_id={owner_salon}".encode(), token)
    healthz = _scope("/healthz", b"", token)
    bare_scope = _scope(bare_app.PATH, b"", token)
    sampler = os.environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on")
    ratio = os.environ.get("OTEL_TRACES_SAMPLER_ARG", "")
    disabled = os.environ.get("OTEL_SDK_DISABLED", "false")
    print(f"sampler {sampler} {ratio}; OTEL_SDK_DISABLED={disabled}; {requests} requests each")
    async with app.router.lifespan_context(app):
        app.middleware_stack = app.build_middleware_stack()
        bare.middleware_stack = bare.build_middleware_stack()
        await call(app, cached)  # fills the cache
        hits = _hits(app.middleware_stack)
        for name, target, scope, fast in (
            ("bare FastAPI", bare, bare_scope, True),
            ("/healthz", app, healthz, True),
            ("cached, hit path", app, cached, True),
            ("cached, through FastAPI", app, cached, False),
        ):
            hits.enabled = fast
            per_request, text = await measure(target, scope, requests, profile)
            print(f"{name:<26} {per_request:7.1f} µs CPU per request")
            if text is not None:
                print(text)
        hits.enabled = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--profile", action="store_true", help="cProfile's top functions")
    args = parser.parse_args()
    asyncio.run(run(args.requests, args.profile))


if __name__ == "__main__":
    main()
