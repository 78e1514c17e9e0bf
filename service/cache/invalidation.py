"""Invalidation in Redis: announced changes waiting for their round, and the clears.

Announcements. The invalidation listener announces a change the moment its notification
arrives (``ReportCache.announce``); until the round that deletes those scopes' epochs in Redis
has run (``ReportCache.apply_announced``), the process serves none of their Redis entries.
Announcements are numbered; those that arrive during a round are merged into the next.

Deleting a scope's epochs is the invalidation: an entry is served only under its current epoch.
Unlinking the tracked entries only frees their memory now. The clear-everything (admin, a
listener reconnecting, the stream becoming current) deletes every key it finds with ``SCAN``:
an epoch some computation read existed when the clear began, so it is found (or was replaced
meanwhile), and nothing begun before the clear can store after it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from service.cache.breaker import CircuitBreaker
from service.cache.durability import SINGLE, ReplicaWait
from service.cache.keys import (
    EVERY_KEY,
    PLATFORM_TAG,
    cleared_by,
    is_entry,
    scope_tag,
    slot_tags,
)
from service.cache.scripts import INVALIDATE, Scripts, scope_keys

SCAN_BATCH = 500


class Announcements:
    """Changes announced and not yet invalidated in Redis, numbered in order of arrival."""

    def __init__(self) -> None:
        self.announced = 0  # the number of the latest announcement
        self.applied = 0  # every announcement up to this one is invalidated in Redis
        self._pending: dict[str, int] = {}  # scope tag -> its latest announcement
        self._everything = 0  # the latest announcement of "everything", until applied
        self._hooks: list[Callable[[set[int] | None], None]] = []

    def on_announce(self, hook: Callable[[set[int] | None], None]) -> None:
        """Call ``hook`` with the salon ids (None: all) of every announced change."""
        self._hooks.append(hook)

    def add(self, salon_ids: set[int] | None) -> set[str] | None:
        """Number a change to these salons (None: to anything); returns the scopes it touches
        (each salon's, and the platform's), or None for every scope."""
        self.announced += 1
        if salon_ids is None:
            self._everything = self.announced
            return None
        tags = {scope_tag(salon_id) for salon_id in salon_ids} | {PLATFORM_TAG}
        for tag in tags:
            self._pending[tag] = self.announced
        return tags

    def tell(self, salon_ids: set[int] | None) -> None:
        for hook in self._hooks:
            hook(salon_ids)

    def pending(self, tag: str) -> bool:
        """Whether a change to this scope was announced and is not invalidated in Redis yet."""
        return bool(self._everything) or tag in self._pending

    @property
    def everything_pending(self) -> bool:
        return bool(self._everything)

    @property
    def pending_tags(self) -> list[str]:
        return list(self._pending)

    def settling(self, covered: int) -> set[str] | None:
        """The scopes ``settle(covered)`` settles (None: every scope, "everything" was)."""
        if self._everything and self._everything <= covered:
            return None
        return {tag for tag, last in self._pending.items() if last <= covered}

    def settle(self, covered: int) -> None:
        """Announcements up to ``covered`` are invalidated in Redis."""
        self._pending = {tag: last for tag, last in self._pending.items() if last > covered}
        if self._everything <= covered:
            self._everything = 0
        self.applied = max(self.applied, covered)


async def invalidate_scopes(
    redis: Redis,
    scripts: Scripts,
    breaker: CircuitBreaker,
    tags: list[str],
    reports: tuple[str, ...],
    durability: ReplicaWait | None = None,
) -> int:
    """Delete the epochs (and unlink the tracked entries) of these scopes' reports (a salon's
    slot tag, or every slot tag of the platform), then ``WAIT`` for a replica of each node
    written (``durability``); in one round trip (on a cluster, one per master, concurrently).
    Returns how many entries went."""
    slots = [slot for tag in tags for slot in slot_tags(tag)]
    if isinstance(redis, RedisCluster):
        return int(await breaker.call(_invalidate_on_cluster(redis, slots, reports, durability)))
    return int(await breaker.call(_invalidate_on_one(redis, scripts, slots, reports, durability)))


async def _invalidate_on_one(
    redis: Redis,
    scripts: Scripts,
    slots: list[str],
    reports: tuple[str, ...],
    durability: ReplicaWait | None,
) -> int:
    wait = durability is not None and await durability.should_wait(redis)
    async with redis.pipeline(transaction=False) as pipe:
        for slot in slots:
            await scripts.invalidate(slot, reports, pipe)
        if wait:
            assert durability is not None
            pipe.execute_command("WAIT", durability.replicas, durability.timeout_ms)
        results = await pipe.execute()
    if wait:
        assert durability is not None
        durability.record(int(results.pop()), SINGLE)
    return sum(int(count) for count in results)


async def _invalidate_on_cluster(
    redis: RedisCluster,
    slots: list[str],
    reports: tuple[str, ...],
    durability: ReplicaWait | None,
) -> int:
    """One pipeline: redis-py sends each master its commands in order on one connection, so a
    ``WAIT`` queued after a master's scripts covers them."""
    nodes: dict[str, Any] = {}
    async with redis.pipeline() as pipe:
        for slot in slots:
            keys = scope_keys(slot, reports)
            pipe.eval(INVALIDATE, len(keys), *keys)
            node = redis.get_node_from_key(keys[0])
            if node is not None:
                nodes[node.name] = node
        waited = []
        if durability is not None:
            for name, node in nodes.items():
                if await durability.should_wait(redis, node):  # type: ignore[arg-type]
                    pipe.execute_command(
                        "WAIT", durability.replicas, durability.timeout_ms, target_nodes=node
                    )
                    waited.append(name)
        results = await pipe.execute()
    if durability is not None:
        for name, acknowledged in zip(waited, results[len(slots) :], strict=True):
            durability.record(int(acknowledged), name)
    return sum(int(count) for count in results[: len(slots)])


async def unlink_everything(redis: Redis, breaker: CircuitBreaker, report: str | None) -> int:
    """Unlink every key the cache owns (of one report, if given), by ``SCAN`` (on a cluster,
    of every master); returns how many entries went (epochs, tracked sets and locks go too,
    uncounted)."""
    deleted = 0
    async for names in _scan_pages(redis, breaker):
        chosen = [name for name in names if cleared_by(name, report)]
        entries = [name for name in chosen if is_entry(name)]
        others = [name for name in chosen if not is_entry(name)]
        # On a cluster redis-py splits a multi-key UNLINK by slot.
        if entries:
            deleted += int(await breaker.call(redis.unlink(*entries)))
        if others:
            await breaker.call(redis.unlink(*others))
    return deleted


async def _scan_pages(redis: Redis, breaker: CircuitBreaker) -> AsyncIterator[list[bytes]]:
    """The cache's keys, a ``SCAN`` page at a time (on a cluster, node by node)."""
    if isinstance(redis, RedisCluster):
        for node in redis.get_primaries():
            cursor = 0
            while True:
                cursors, names = await breaker.call(
                    redis.scan(cursor, match=EVERY_KEY, count=SCAN_BATCH, target_nodes=node)
                )
                yield names
                cursor = int(next(iter(cursors.values())))
                if cursor == 0:
                    break
        return
    cursor = 0
    while True:
        cursor, names = await breaker.call(redis.scan(cursor, match=EVERY_KEY, count=SCAN_BATCH))
        yield names
        if cursor == 0:
            return
