"""The circuit breaker in front of Redis: after repeated failures, stop calling it for a while.

Open after ``threshold`` consecutive failures; after ``cooldown`` seconds let one probe through;
its success closes the circuit, its failure keeps it open for another cooldown.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisClusterException, RedisError

logger = logging.getLogger("service.cache")

# What a Redis call raises when Redis is down, slow or unreachable. redis-py's cluster client
# raises RedisClusterException (not a RedisError) when no node of the cluster answers.
REDIS_ERRORS = (TimeoutError, RedisError, RedisClusterException, OSError)


@dataclass
class CircuitBreaker:
    """Open after ``threshold`` consecutive failures; let one probe through after ``cooldown``."""

    threshold: int = 3
    cooldown: float = 5.0
    clock: Callable[[], float] = time.monotonic
    failures: int = 0
    opened_at: float | None = None
    _probing: bool = field(default=False, repr=False)

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def allow(self) -> bool:
        if self.opened_at is None:
            return True
        if self._probing or self.clock() - self.opened_at < self.cooldown:
            return False
        self._probing = True
        return True

    def succeeded(self) -> None:
        if self.opened_at is not None:
            logger.info("redis circuit closed")
        self.failures = 0
        self.opened_at = None
        self._probing = False

    def failed(self) -> None:
        self.failures += 1
        self._probing = False
        if self.failures >= self.threshold:
            if self.opened_at is None:
                logger.warning("redis circuit opened after %d failures", self.failures)
            self.opened_at = self.clock()

    async def call(self, operation: Awaitable[Any]) -> Any:
        """Await a Redis operation, counting its success or failure."""
        try:
            value = await operation
        except REDIS_ERRORS:
            self.failed()
            raise
        self.succeeded()
        return value
