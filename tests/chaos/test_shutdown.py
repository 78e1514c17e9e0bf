"""SIGTERM while the service is under load, with requests held in flight.

``LOCK TABLE bookings`` keeps the uncached requests of the mix waiting inside PostgreSQL when
the signal arrives; the lock is released a moment later. A graceful stop lets them finish
(whole, valid JSON), flushes their spans to the OTLP receiver and exits 0.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.chaos.harness import ChaosData, reference_bodies, warm
from tests.chaos.load import LoadGenerator, describe, figures
from tests.chaos.servers import OtlpSink, ServiceProcess, service_env
from tests.support import RedisProcess

pytestmark = pytest.mark.chaos

GRACEFUL_SHUTDOWN_SECONDS = 10  # uvicorn's timeout_graceful_shutdown in `salon-reports serve`
SERVER_SPAN_PREFIX = "GET /api/v1/optimized-reports/"


async def test_sigterm_finishes_in_flight_requests_and_flushes_spans(
    database: ChaosData, redis_server: RedisProcess, tmp_path: Path, chaos_result: dict[str, Any]
) -> None:
    hold_after_signal = 1.0
    chaos_result.update(
        name="sigterm",
        order=5,
        fault=(
            "SIGTERM to the main process while uncached requests wait on a held LOCK TABLE, "
            f"released {hold_after_signal:g} s after the signal"
        ),
    )
    calls = database.mix(cold=True)
    expected = await reference_bodies(database, calls)
    with OtlpSink() as sink:
        env = service_env(
            database.database_url,
            redis_server.url,
            database.secret,
            OTEL_EXPORTER_OTLP_ENDPOINT=sink.endpoint,
            OTEL_TRACES_SAMPLER="always_on",
        )
        service = ServiceProcess(env, tmp_path / "service.log")
        try:
            service.start()
            async with LoadGenerator(service.url, calls, expected, database.today) as load:
                await warm(load)
                load.start()
                await load.run_phase("before", 2)
                async with await psycopg.AsyncConnection.connect(database.dsn) as locker:
                    await locker.execute("LOCK TABLE bookings IN ACCESS EXCLUSIVE MODE")
                    await asyncio.sleep(1.5)  # uncached requests pile up behind the lock
                    load.phase = "during"
                    signalled_at = time.monotonic()
                    service.terminate()
                    await asyncio.sleep(hold_after_signal)
                    await locker.rollback()
                returncode = await asyncio.to_thread(service.wait, GRACEFUL_SHUTDOWN_SECONDS + 10)
                exited_at = time.monotonic()
                load.phase = "after"
                await asyncio.sleep(0.5)  # a few requests to the stopped service
                await load.stop()
            output = service.output()
        finally:
            service.stop()
        spans = sink.spans()
    samples = load.samples
    chaos_result.update(figures(samples))
    chaos_result["exit_code"] = returncode
    chaos_result["exit_seconds_after_sigterm"] = round(exited_at - signalled_at, 2)

    assert returncode == 0, output[-3000:]
    assert exited_at - signalled_at < GRACEFUL_SHUTDOWN_SECONDS + 5
    # Nothing cut: every response that started arrived whole, as valid JSON; no 5xx.
    cut = [sample for sample in samples if sample.failure == "cut"]
    assert not cut, describe(cut)
    started = [sample for sample in samples if sample.status is not None]
    assert all(sample.json_body for sample in started), describe(
        s for s in started if not s.json_body
    )
    server_errors = [s for s in started if s.status is not None and s.status >= 500]
    assert not server_errors, describe(server_errors)
    wrong = [sample for sample in samples if sample.correct is False]
    assert not wrong, describe(wrong)
    # The requests in flight when the signal came were finished, not dropped.
    in_flight = [s for s in samples if s.started < signalled_at < s.ended]
    held = [s for s in in_flight if calls[s.call].cold]
    assert held, f"no uncached request was held in flight:\n{describe(in_flight)}"
    unfinished = [s for s in in_flight if s.status != 200]
    assert not unfinished, describe(unfinished)
    # Their spans reached the collector: flushed at shutdown.
    server_spans = {
        span.trace_id.hex(): span for _, span in spans if span.name.startswith(SERVER_SPAN_PREFIX)
    }
    missing = [s for s in in_flight if s.trace_id not in server_spans]
    assert not missing, f"{len(missing)} in-flight requests have no span:\n{describe(missing)}"
    answered = [s for s in samples if s.status == 200 and s.trace_id]
    exported = sum(s.trace_id in server_spans for s in answered)
    chaos_result["in_flight_at_sigterm"] = len(in_flight)
    chaos_result["server_spans_received"] = f"{exported}/{len(answered)}"
    assert exported == len(answered), chaos_result["server_spans_received"]
    chaos_result["notes"] = (
        f"{len(in_flight)} requests in flight at SIGTERM ({len(held)} held in PostgreSQL) all "
        f"finished 200 with whole JSON; none cut; server spans of all {len(answered)} answers "
        f"received; exit {returncode} {exited_at - signalled_at:.1f} s after the signal"
    )
