"""What a refusal costs, in process: a flooding salon's 429s driven through the app's ASGI entry.

Starts the service's app (its lifespan: pools, Redis, listener) on the benchmark dataset
(``benchmarks.dataset``) with a share of 1 and no queue, holds one computation of the noisy
salon at its connection turn (the fair scheduler's ``on_turn`` hook), then calls the app
``--requests`` times with that salon's ``professionals`` reports of distinct windows and
limits (each a cold key, as in ``benchmarks.noisy``), each answered ``429``. Reports the CPU
time per refusal of this process (``time.process_time``: what a worker spends, uvicorn's HTTP
parsing aside) and, apart, Redis's own CPU time per refusal (``INFO cpu`` before and after; the
server is shared, so that figure includes whatever else used it meanwhile). With
``--profile``, cProfile's top functions by own time; with ``--endpoint``, every request goes
through FastAPI's routing and the endpoint (the hit and refusal path switched off), as a
refusal did before the early refusal. The repeat refusal's delay is off (CPU only).

    OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.1 \\
        python -m benchmarks.refusals [--requests 5000] [--profile] [--endpoint]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import re
import time
from datetime import timedelta
from typing import Any

from redis.asyncio import Redis

from benchmarks.dataset import ensure_dataset
from benchmarks.hot_path import _hits, _scope, call
from service.auth import issue_token
from service.config import get_settings
from service.fairness import Tenant, TenantLeases
from service.main import create_app
from service.paths import API_PREFIX


async def _redis_cpu(redis: Redis) -> float:
    info = await redis.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


async def run(requests: int, profile: bool, endpoint: bool) -> None:
    dataset = ensure_dataset(stream=True)
    settings = get_settings().model_copy(
        update={
            "database_url": dataset.url,
            "read_database_url": None,
            "tenant_max_concurrent": 1,
            "tenant_queue": 0,
            "tenant_queue_timeout": 60.0,
            "tenant_repeat_refusal_delay": 0.0,  # CPU only: no refusal waits its delay here
        }
    )
    app = create_app(settings)
    salon = 1
    token = issue_token(settings.jwt_secret, role="owner", salon_ids=[salon])
    path = f"{API_PREFIX}/professionals"
    today = dataset.seeded_on

    def query(index: int) -> bytes:
        end = today - timedelta(days=index % 60)
        start = end - timedelta(days=300 + (index // 60) % 66)
        limit = 1 + (index // 3960) % 200
        return f"salon_id={salon}&start={start}&end={end}&limit={limit}".encode()

    redis = Redis.from_url(settings.redis_url)
    # A lease left by a run stopped while it held its computation would hold the share.
    await redis.delete(TenantLeases.key(Tenant(f"s:{salon}", "owner", salon)))
    async with app.router.lifespan_context(app):
        app.middleware_stack = app.build_middleware_stack()
        resources = app.state.resources
        scheduler = resources.reports.fairness
        await resources.reports.clear_cache(None, salon)  # the held computation's key is cold
        opened = asyncio.Event()
        held = asyncio.Event()

        async def gate(lane: str) -> None:
            if lane == f"s:{salon}":
                held.set()
                await opened.wait()

        # The salon's known time zone (as after its first request), then its share held.
        await call(app, _scope(f"{API_PREFIX}/dashboard", f"salon_id={salon}".encode(), token))
        scheduler.on_turn = gate
        holder = asyncio.create_task(call(app, _scope(path, query(10**6), token)))
        try:
            await asyncio.wait_for(held.wait(), 30)
        except TimeoutError:
            raise RuntimeError(
                f"the held computation never got its turn: {holder.done() and holder.result()}"
            ) from None
        hits = _hits(app.middleware_stack)
        hits.enabled = not endpoint
        scopes = [_scope(path, query(index), token) for index in range(requests + 200)]
        for scope in scopes[:200]:
            if await call(app, scope) != 429:
                raise RuntimeError("a warm-up request was not refused")
        redis_before = await _redis_cpu(redis)
        profiler = cProfile.Profile() if profile else None
        if profiler is not None:
            profiler.enable()
        started = time.process_time()
        started_thread = time.thread_time()
        statuses: dict[int, int] = {}
        for scope in scopes[200:]:
            status = await call(app, scope)
            statuses[status] = statuses.get(status, 0) + 1
        used = time.process_time() - started
        used_thread = time.thread_time() - started_thread
        if profiler is not None:
            profiler.disable()
        redis_used = await _redis_cpu(redis) - redis_before
        early = hits.refused
        await redis.aclose()
        opened.set()
        await holder
    print(f"statuses {statuses}; {early} refused before FastAPI")
    print(f"worker CPU per refusal: {used * 1e6 / requests:7.1f} µs (process)")
    print(f"                        {used_thread * 1e6 / requests:7.1f} µs (event loop's thread)")
    print(f"Redis CPU per refusal:  {redis_used * 1e6 / requests:7.1f} µs (shared server)")
    if profiler is not None:
        out = io.StringIO()
        stats: Any = pstats.Stats(profiler, stream=out)
        stats.sort_stats("tottime").print_stats(25)
        print(re.sub(r"/[^\s:]*/(site-packages|wt-\d+)/", "", out.getvalue()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=5_000)
    parser.add_argument("--profile", action="store_true", help="cProfile's top functions")
    parser.add_argument(
        "--endpoint",
        action="store_true",
        help="every request through FastAPI (the refusal path before the early refusal)",
    )
    args = parser.parse_args()
    asyncio.run(run(args.requests, args.profile, args.endpoint))


if __name__ == "__main__":
    main()
