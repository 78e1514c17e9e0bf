"""The error budgets' shared counts in Redis: every worker's and host's report requests.

Each worker counts its report requests by minute (``telemetry.stats.slo.SloCounter``); its
stats publisher (``service.workers``, every 2 s) adds what it counted since its last turn to
two kinds of Redis hashes, in one script (all or nothing):

- ``{sr:slo}:m:<epoch hour>``: fields ``<epoch minute>:<counter>``, for the windows up to an
  hour (5 min, 30 min, 1 h); the hash expires 2 hours after its hour ends;
- ``{sr:slo}:h:<epoch day>``: fields ``<epoch hour>:<counter>``, for 6 h, 3 days and the 30
  days of the budget; the hash expires 31 days after its day ends;

``<counter>`` is ``requests``, ``errors`` (answered 5xx) or ``slow`` (answered without a 5xx in
more than 100 ms). One hash tag, so a Redis Cluster keeps them in one slot and the script may
write them all. ``HINCRBY`` adds up across workers and hosts and survives restarts; a batch
Redis did not take goes out again with the next one (so a reply lost after Redis applied it
counts that batch twice: at most 2 s of one worker's requests).

``/performance/stats`` reads the 33 hashes (``budget_section``) and adds what this worker
has not published yet. Without Redis (down, slow, not configured) it answers from this worker's
own counts since it started, ``"source": "worker"``, ``"partial": true``: never an error.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from redis.asyncio import Redis

from telemetry.stats.slo import (
    HOUR,
    HOUR_WINDOWS,
    KEEP_MINUTES,
    MINUTE,
    MINUTE_WINDOWS,
    PERIOD_DAYS,
    Batch,
    Cells,
    SloCounter,
    add,
    render_budget,
)

KEY_PREFIX = "{sr:slo}"
COUNTERS = ("requests", "errors", "slow")
DAY = 86400
MINUTE_KEY_LIFE = KEEP_MINUTES * MINUTE  # after the end of the key's hour
HOUR_KEY_LIFE = (PERIOD_DAYS + 1) * DAY  # after the end of the key's day
READ_TIMEOUT_SECONDS = 1.0

# KEYS: the hashes; ARGV, per key in order: its expiry (unix seconds), its number of fields,
# then field, increment, field, increment, ...
_ADD_SCRIPT = """
local at = 1
for _, key in ipairs(KEYS) do
    local expire_at = ARGV[at]
    local fields = tonumber(ARGV[at + 1])
    at = at + 2
    for _ = 1, fields do
        redis.call('HINCRBY', key, ARGV[at], ARGV[at + 1])
        at = at + 2
    end
    redis.call('EXPIREAT', key, expire_at)
end
return #KEYS
"""


def minute_key(hour: int) -> str:
    return f"{KEY_PREFIX}:m:{hour}"


def hour_key(day: int) -> str:
    return f"{KEY_PREFIX}:h:{day}"


def _fields(buckets: dict[int, Cells]) -> list[str | int]:
    fields: list[str | int] = []
    for bucket, cells in sorted(buckets.items()):
        for name, value in zip(COUNTERS, cells, strict=True):
            if value:
                fields += [f"{bucket}:{name}", value]
    return fields


class ErrorBudgetStore:
    """Adds one worker's batches to the shared hashes."""

    def __init__(self, redis: Redis) -> None:
        self._add = redis.register_script(_ADD_SCRIPT)

    async def add(self, batch: Batch, now: float) -> None:
        now_minute = int(now // MINUTE)
        by_key: dict[str, tuple[int, dict[int, Cells]]] = {}
        for minute, cells in batch.minutes.items():
            if minute > now_minute - KEEP_MINUTES:
                hour = minute // 60
                _, buckets = by_key.setdefault(
                    minute_key(hour), ((hour + 1) * HOUR + MINUTE_KEY_LIFE, {})
                )
                add(buckets, minute, cells)
        oldest_hour = now_minute // 60 - HOUR_WINDOWS["30d"]
        for hour, cells in batch.hours().items():
            if hour > oldest_hour:
                day = hour * HOUR // DAY
                _, buckets = by_key.setdefault(hour_key(day), ((day + 1) * DAY + HOUR_KEY_LIFE, {}))
                add(buckets, hour, cells)
        keys: list[str] = []
        args: list[str | int] = []
        for key, (expire_at, buckets) in by_key.items():
            fields = _fields(buckets)
            if fields:
                keys.append(key)
                args += [expire_at, len(fields) // 2, *fields]
        if keys:
            await self._add(keys=keys, args=args)


async def read_buckets(redis: Redis, now: float) -> tuple[dict[int, Cells], dict[int, Cells]]:
    """Every worker's published counts: minutes of the last hour, hours of the last 30 days."""
    now_minute = int(now // MINUTE)
    now_hour = now_minute // 60
    first_minute = now_minute - MINUTE_WINDOWS["1h"] + 1
    first_hour = now_hour - HOUR_WINDOWS["30d"] + 1
    keys = [minute_key(hour) for hour in range(first_minute // 60, now_hour + 1)]
    keys += [hour_key(day) for day in range(first_hour * HOUR // DAY, now_hour * HOUR // DAY + 1)]
    async with redis.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.hgetall(key)
        answers = await pipe.execute()
    minutes: dict[int, Cells] = {}
    hours: dict[int, Cells] = {}
    for key, fields in zip(keys, answers, strict=True):
        into, first = (minutes, first_minute) if ":m:" in key else (hours, first_hour)
        for raw_field, raw_value in fields.items():
            field = raw_field.decode() if isinstance(raw_field, bytes) else str(raw_field)
            bucket_text, _, name = field.partition(":")
            if name not in COUNTERS:
                continue
            bucket = int(bucket_text)
            if bucket < first:
                continue
            cells = into.setdefault(bucket, [0, 0, 0])
            cells[COUNTERS.index(name)] += int(raw_value)
    return minutes, hours


async def budget_section(redis: Redis | None, counter: SloCounter) -> dict[str, Any]:
    """The ``slo`` section of ``/performance/stats``: all workers, or this one without Redis."""
    now = time.time()
    if redis is not None:
        try:
            minutes, hours = await asyncio.wait_for(read_buckets(redis, now), READ_TIMEOUT_SECONDS)
        except Exception:
            pass
        else:
            # What this worker counted and has not published yet (up to 2 s).
            pending = counter.pending()
            for minute, cells in pending.minutes.items():
                add(minutes, minute, cells)
            for hour, cells in pending.hours().items():
                add(hours, hour, cells)
            return render_budget(minutes, hours, now, source="redis", partial=False)
    minutes, hours = counter.history()
    return render_budget(
        minutes, hours, now, source="worker", partial=True, since=counter.started_at
    )
