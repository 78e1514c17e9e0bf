"""After the faults: nothing lost, nothing leaked.

One service goes through the faults of the other scenarios in a row, under load, while
bookings change: PostgreSQL restarted; Redis snapshotted, killed, a booking changed while it
is down (its invalidation cannot be applied), Redis restarted from its snapshot (the entries
that change should have dropped are back); Redis paused; another booking change.
Afterwards every cached answer (``X-Cache: HIT``) must equal a fresh computation on the data
as it now is, and no span, log line, metric or stats field may contain a token, the signing
key, an email, or a salon's or professional's name.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest
import redis

from tests.chaos.harness import ChaosData, reference_bodies, warm
from tests.chaos.load import LoadGenerator, describe, figures
from tests.chaos.metrics import scrape, stats
from tests.chaos.servers import OtlpSink, ServiceProcess, service_env
from tests.support import RedisProcess

pytestmark = pytest.mark.chaos


def change_a_booking(dsn: str, salon: int) -> int:
    """Cancel a recent completed booking of ``salon`` (a write the reports must reflect)."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        row = connection.execute(
            "UPDATE bookings SET status = 'cancelled', cancelled_at = now(), completed_at = NULL,"
            " updated_at = now() WHERE id = (SELECT id FROM bookings WHERE salon_id = %s"
            " AND status = 'completed'"
            " AND scheduled_at BETWEEN now() - interval '20 days' AND now() - interval '3 days'"
            " ORDER BY id LIMIT 1) RETURNING id",
            (salon,),
        ).fetchone()
    assert row is not None
    return int(row[0])


async def cached_answer(
    http: httpx.AsyncClient, path: str, params: dict[str, str], token: str
) -> Any:
    """The answer the cache holds (asked until it says HIT)."""
    for _ in range(20):
        response = await http.get(path, params=params, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200, response.text
        if response.headers["x-cache"] == "HIT":
            return orjson.loads(response.content)
        await asyncio.sleep(0.1)
    raise AssertionError(f"never served from the cache: {path} {params}")


def telemetry_text(spans: list[tuple[dict[str, Any], Any]]) -> str:
    texts = []
    for resource, span in spans:
        texts.append(span.name)
        texts.extend(f"{key}={value}" for key, value in resource.items())
        texts.extend(f"{a.key}={a.value}" for a in span.attributes)
        for event in span.events:
            texts.append(event.name)
            texts.extend(f"{a.key}={a.value}" for a in event.attributes)
    return "\n".join(texts)


async def test_after_the_faults_nothing_lost_nothing_leaked(
    database: ChaosData, redis_server: RedisProcess, tmp_path: Path, chaos_result: dict[str, Any]
) -> None:
    chaos_result.update(
        name="aftermath",
        order=6,
        fault=(
            "PostgreSQL restarted; Redis killed, a booking changed, Redis restarted from its "
            "snapshot; Redis paused 3 s; another change; then cache vs fresh, and hygiene"
        ),
    )
    calls = database.mix(cold=True)
    with OtlpSink() as sink:
        env = service_env(
            database.database_url,
            redis_server.url,
            database.secret,
            OTEL_EXPORTER_OTLP_ENDPOINT=sink.endpoint,
            OTEL_TRACES_SAMPLER="always_on",
            REPORTS_REDIS_BREAKER_COOLDOWN="1",
            REPORTS_SLOW_QUERY_MS="20",  # slow-query log lines and span events too
        )
        service = ServiceProcess(env, tmp_path / "service.log")
        try:
            service.start()
            # Answers change with the writes: the check is at the end, against fresh ones.
            async with LoadGenerator(service.url, calls, {}, database.today) as load:
                await warm(load)
                load.start()
                await load.run_phase("before", 2)
                load.phase = "during"
                await asyncio.to_thread(database.cluster.stop, "fast")
                await asyncio.sleep(1.5)
                await asyncio.to_thread(database.cluster.start)
                await asyncio.sleep(1.5)
                # Redis crashes and comes back with its last snapshot (persistence on): the
                # entries of salon A are back, but the change made while it was down could not
                # invalidate them. The listener must clear them before the cache is used again.
                saver = redis.Redis(port=redis_server.port)
                saver.save()
                saver.close()
                redis_server.kill()
                changed = [
                    await asyncio.to_thread(change_a_booking, database.dsn, database.salons[0])
                ]
                await asyncio.sleep(2)
                await asyncio.to_thread(redis_server.start)
                await asyncio.sleep(2)
                pauser = redis.Redis(port=redis_server.port)
                pauser.client_pause(3000, all=True)
                pauser.close()
                await asyncio.sleep(4)
                changed.append(
                    await asyncio.to_thread(change_a_booking, database.dsn, database.salons[1])
                )
                await load.run_phase("after", 3)
                await load.stop()
            # Nothing lost: what the cache serves now is what PostgreSQL says now.
            fresh = await reference_bodies(database, calls)
            stale = []
            async with httpx.AsyncClient(base_url=service.url, timeout=10) as http:
                for index, call in enumerate(calls):
                    if call.cold:
                        continue
                    if (
                        await cached_answer(http, call.path, dict(call.params), call.token)
                        != fresh[index]
                    ):
                        stale.append(call.label)
            exposition = await scrape(service.url)
            snapshot = await stats(service.url, database.token("ops"))
            service.terminate()
            await asyncio.to_thread(service.wait, 20)
            output = service.output()
        finally:
            service.stop()
        spans = sink.spans()
    samples = load.samples
    chaos_result.update(figures(samples))
    chaos_result["bookings_changed"] = len(changed)
    chaos_result["cached_entries_checked"] = len(fresh)
    chaos_result["stale_entries"] = stale
    chaos_result["spans_checked"] = len(spans)

    assert not stale, f"cached answers differ from a fresh computation: {stale}"
    failed = [s for s in samples if s.status is None or (s.status >= 500 and s.status != 503)]
    assert not failed, describe(failed)
    # Nothing leaked.
    assert spans
    assert "redis circuit opened" in output  # the log had something to say
    secrets = [database.secret, *database.personal_strings()]
    for call in calls:
        secrets += [call.token, call.token.rsplit(".", 1)[1]]
    texts = [telemetry_text(spans), output, exposition, json.dumps(snapshot)]
    # Thousands of spans repeat the same few lines: search each distinct line once.
    haystack = "\n".join({line for text in texts for line in text.splitlines()})
    chaos_result["secrets_checked"] = len(set(secrets))
    # The haystack holds what the check is about: span attributes, log lines, series.
    assert "cache.result=" in haystack
    assert "slow_query" in haystack
    assert "reports_cache_requests_total" in haystack
    leaked = sorted({secret for secret in secrets if secret in haystack})
    assert not leaked, (
        f"{len(leaked)} personal or secret strings in telemetry, e.g. {leaked[0][:12]}…"
    )
    chaos_result["notes"] = (
        f"all {len(fresh)} cached answers (X-Cache HIT) equal a fresh computation after "
        f"{len(changed)} booking changes; {len(set(secrets))} tokens, emails and names absent "
        f"from {len(spans)} spans, the logs, /metrics and the stats"
    )
