"""How Redis Cluster load spreads over the masters, and whether the platform's slots are hot.

Every change to any salon invalidates the platform-wide scope as well. Its entries once all
lived in the one slot of the hash tag ``{p}``, whose master served 64 % of the commands; they
are now spread over ``PLATFORM_SLOTS`` slot tags (``service/cache/keys.py``). This drives the
service's cache (``ReportCache``, the same code the app runs, without its in-process tier so
every lookup reaches Redis) against the cluster of ``REDIS_CLUSTER_URL`` with a mix of report
lookups and changes, and prints the commands each master served. The computation is a constant
(this measures Redis, not SQL).

    .venv/bin/python -m benchmarks.cluster_slots --lookups 20000 --platform-share 0.3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
from typing import cast

import orjson
from dotenv import dotenv_values
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from service.cache import ReportCache
from service.cache.keys import PLATFORM_SLOT_TAGS, build_key

REPORTS = ("dashboard", "bookings", "professionals")


async def run(lookups: int, platform_share: float, salons: int, writes_every: int) -> None:
    url = os.environ.get("REDIS_CLUSTER_URL") or dotenv_values(".env").get("REDIS_CLUSTER_URL")
    if not url:
        raise SystemExit("no REDIS_CLUSTER_URL: start one with `make services REDIS_CLUSTER=1`")
    client = RedisCluster.from_url(url)
    await client.flushall(target_nodes=RedisCluster.PRIMARIES)
    masters = client.get_primaries()
    for node in masters:
        await client.config_resetstat(target_nodes=node)
    cache = ReportCache(cast(Redis, client), reports=REPORTS)
    platform_slots: dict[str, int] = {}  # master -> how many platform slot tags it serves
    for tag in PLATFORM_SLOT_TAGS:
        holder = client.get_node_from_key(f"x:{tag}:y")
        if holder is not None:
            platform_slots[holder.name] = platform_slots.get(holder.name, 0) + 1
    rng = random.Random(7)
    weights = [1 / (rank + 1) for rank in range(salons)]  # Zipf-like: a few busy salons
    body = orjson.dumps({"figures": list(range(50))})

    async def compute() -> bytes:
        return body

    for index in range(lookups):
        if rng.random() < platform_share:
            salon = None
        else:
            salon = rng.choices(range(1, salons + 1), weights)[0]
        report = rng.choice(REPORTS)
        period = rng.randrange(6)  # a few periods per report and scope
        key = build_key(report, salon, "admin", {"period": period})
        await cache.fetch(key, 600, compute)
        if writes_every and index % writes_every == 0:
            cache.announce({rng.choices(range(1, salons + 1), weights)[0]})
            await cache.apply_announced()

    served = {}
    for node in masters:
        stats = await client.info("commandstats", target_nodes=node)
        served[node.name] = sum(
            int(v["calls"])
            for k, v in stats.items()
            if k not in ("cmdstat_info", "cmdstat_config|resetstat")
        )
    await client.aclose()
    total = sum(served.values())
    print(
        f"lookups {lookups}, platform share {platform_share}, salons {salons}, "
        f"a change every {writes_every} lookups"
    )
    print(f"  {total} commands in all")
    for name, count in sorted(served.items()):
        slots = platform_slots.get(name, 0)
        print(f"  {name}: {count} commands ({count / total:.0%}), {slots} platform slot tags")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lookups", type=int, default=20_000)
    parser.add_argument("--platform-share", type=float, default=0.3)
    parser.add_argument("--salons", type=int, default=40)
    parser.add_argument("--writes-every", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(run(args.lookups, args.platform_share, args.salons, args.writes_every))


if __name__ == "__main__":
    main()
