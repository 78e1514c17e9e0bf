"""Invalidations that survive a Redis fail-over: ``WAIT`` for a replica after their writes.

Redis replicates asynchronously: an invalidation (epochs deleted) acknowledged by a master only
is lost if that master dies before its replica has it, and the promoted replica then still
holds the old epochs, so the entries they validate come back. After the invalidation's
writes, ``WAIT <replicas> <timeout>`` on the same connection (on a cluster: on the master of
each slot written) returns once that many replicas have acknowledged them, or at the timeout.
The invalidation counts as done after the ``WAIT``; a ``WAIT`` that times out short of the
replicas is counted (``reports.cache.invalidation.replica_waits{outcome="timeout"}``) and
logged, since that invalidation may yet be lost in a fail-over.

A node with no replica connected (a single Redis without replicas, a master whose replica is
down or was promoted) is not waited on: its ``WAIT`` could only time out. Whether a node has
one is read from ``INFO replication`` and kept for ``RECHECK_SECONDS``. ``replicas = 0``
(``REPORTS_REDIS_WAIT_REPLICAS=0``) never waits.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis

logger = logging.getLogger("service.cache")

RECHECK_SECONDS = 10.0
SINGLE = "redis"  # the name of the only node of a single Redis


class ReplicaWait:
    """How an invalidation waits for replicas, and what its waits came to (``counts``:
    ``acknowledged``, ``timeout``, ``no_replica``)."""

    def __init__(
        self,
        replicas: int = 1,
        timeout_ms: int = 100,
        *,
        clock: Callable[[], float] = time.monotonic,
        counts: Counter[str] | None = None,
    ) -> None:
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        self.clock = clock
        self.counts: Counter[str] = counts if counts is not None else Counter()
        self._known: dict[str, tuple[int, float]] = {}  # node -> (replicas connected, when)

    async def should_wait(self, redis: Redis, node: Any = None) -> bool:
        """Whether to ``WAIT`` on this node (``node``: a cluster node; None: the single Redis)."""
        if self.replicas <= 0:
            return False
        name = SINGLE if node is None else str(node.name)
        known = self._known.get(name)
        if known is None or self.clock() - known[1] >= RECHECK_SECONDS:
            if node is None:
                info = await redis.info("replication")
            else:
                info = await redis.info("replication", target_nodes=node)
            known = (int(info.get("connected_slaves", 0)), self.clock())
            self._known[name] = known
        if known[0] <= 0:
            self.counts["no_replica"] += 1
            return False
        return True

    def record(self, acknowledged: int, node: str = SINGLE) -> None:
        """The answer of one ``WAIT``: how many replicas acknowledged the invalidation."""
        if acknowledged >= self.replicas:
            self.counts["acknowledged"] += 1
            return
        self.counts["timeout"] += 1
        # Its replica may be gone: ask again at the next invalidation.
        self._known.pop(node, None)
        logger.warning(
            "an invalidation reached %d of %d replicas of %s within %d ms; a fail-over now "
            "could bring its entries back",
            acknowledged,
            self.replicas,
            node,
            self.timeout_ms,
        )
