"""Fair share of the database between tenants: one salon's burst must not slow the others.

Every report computation (a cache miss, a bypass, a background refresh, ``/realtime``) goes
through ``FairScheduler.computation(tenant)`` before it may ask for a connection. Cache hits
never get here. A tenant is one salon for its owners, and the admin class (the back office and
every platform-wide report) is one tenant of its own. The admin class is the platform's own
client: it has no share of its own unless ``admin_limit`` is set
(``REPORTS_ADMIN_MAX_CONCURRENT``), but its computations take connection turns round-robin with
the salons' like any tenant's, so a salon waits behind at most one of them at a time.

1. **The tenant's share** (this worker): at most ``per_tenant`` computations of a tenant at
   once; the next ``queue`` wait in line (first come, first served within the tenant); one more
   is refused at once, and one whose turn has not come within ``queue_timeout`` is refused then
   — ``429 tenant_throttled`` with ``Retry-After``. A tenant therefore waits behind its own
   backlog only.
2. **The shared count** (Redis): the same limit across every worker and host. A computation
   admitted by its worker also takes a lease in ``sr:fair:<tenant>`` (a sorted set of
   holders, scored by expiry on the Redis server's clock); while the tenant holds
   ``per_tenant`` leases elsewhere it polls, with backoff, until ``queue_timeout``. A lease
   expires after ``lease`` seconds (longer than any computation may run: the statement timeout
   plus the connection wait), so a worker that crashes holding leases gives them back by
   itself. Only admitted computations poll (at most ``per_tenant`` per tenant and worker), so
   a burst parked in the queue costs no Redis traffic. When Redis cannot be used (not
   configured, down, its circuit open) the step is skipped and counted
   (``reports.fairness.degraded``): the bound is then ``per_tenant`` per worker, never a
   failed request.
3. **Connection turns** (this worker): the pool's connections are handed out round-robin
   between tenants, one turn per tenant in a cycle, first come first served within a tenant.
   With stage 1 a tenant presents at most ``per_tenant`` requests here, so a request waits
   behind at most one computation of each other tenant that is waiting too; a tenant alone
   beside the noisy one waits for no one while fewer than ``capacity - per_tenant``
   connections are busy. Waiting here past the pool timeout is the old ``503``, not a 429: it
   means every tenant together needs more than the database has.

Deterministic hooks for tests: ``on_admitted(tenant)`` is called as a computation passes
stages 1-2, and ``on_turn(lane)`` is awaited as it gets its turn (a test holds computations
there to fill the database in an order it chooses, with no clock involved).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from redis.asyncio import Redis
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from service.auth import Principal
from service.cache.breaker import REDIS_ERRORS
from service.errors import APIError
from telemetry.fairness import FairnessCounts

logger = logging.getLogger("service.fairness")

LEASE_NAMESPACE = "sr:fair"
LOOKUP_LANE = "lookup"  # salon time-zone lookups: their own lane for connection turns
_POLL_FIRST_SECONDS = 0.002
_POLL_MAX_SECONDS = 0.025
MAX_HELD_REFUSALS = 1024  # per worker: refusals waiting out their delay at once
_REMEMBERED_REFUSALS = 4096  # tenants whose last refusal time a worker keeps (then forgets all)

# KEYS[1] = the tenant's holders (sorted set: token -> expiry in ms, Redis server clock);
# ARGV[1] = token, ARGV[2] = limit, ARGV[3] = lease (ms). Returns 1 when the lease is taken.
_ACQUIRE_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
    return 1
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Tenant:
    """Whose share a computation counts against."""

    key: str  # "s:<salon id>" or "admin"
    tenant_class: str  # "owner" or "admin"
    salon_id: int | None = None

    @classmethod
    def of(cls, principal: Principal, salon_id: int | None) -> Tenant:
        if principal.role == "owner" and salon_id is not None:
            return cls(f"s:{salon_id}", "owner", salon_id)
        return ADMIN_TENANT


ADMIN_TENANT = Tenant("admin", "admin")


def retry_after_seconds(queue_timeout: float) -> int:
    return max(1, math.ceil(queue_timeout))


class TenantThrottled(APIError):
    """429: the tenant has its share running and its queue full, or waited past the queue.
    ``delay``: seconds to wait before answering it (``FairScheduler.hold``)."""

    def __init__(self, retry_after: float, reason: str) -> None:
        super().__init__(
            429,
            "tenant_throttled",
            "this salon already has its share of report computations running and queued; "
            "retry after the Retry-After header (cached reports are not affected)",
            {"Retry-After": str(retry_after_seconds(retry_after))},
        )
        self.reason = reason
        self.delay = 0.0


class Breaker(Protocol):
    """The cache's Redis circuit breaker (shared: one Redis, one opinion of its health)."""

    def allow(self) -> bool: ...
    def succeeded(self) -> None: ...
    def failed(self) -> None: ...


class TenantLeases:
    """The tenant limit shared by every worker and host, as expiring leases in Redis."""

    def __init__(self, redis: Redis, breaker: Breaker, lease: float) -> None:
        self.redis = redis
        self.breaker = breaker
        self.lease_ms = int(lease * 1000)
        self._acquire = redis.register_script(_ACQUIRE_SCRIPT)

    @staticmethod
    def key(tenant: Tenant) -> str:
        return f"{LEASE_NAMESPACE}:{{{tenant.key}}}"

    async def acquire(self, tenant: Tenant, limit: int, deadline: float) -> str | bool:
        """One of ``limit`` leases: its token; False when none came free before ``deadline``
        (monotonic); True when Redis cannot be used (go on without one)."""
        token = secrets.token_hex(8)
        delay = _POLL_FIRST_SECONDS
        while True:
            if not self.breaker.allow():
                return True
            try:
                taken = await self._acquire(
                    keys=[self.key(tenant)], args=[token, limit, self.lease_ms]
                )
            except REDIS_ERRORS:
                self.breaker.failed()
                return True
            self.breaker.succeeded()
            if taken:
                return token
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, _POLL_MAX_SECONDS)

    async def release(self, tenant: Tenant, token: str) -> None:
        with contextlib.suppress(*REDIS_ERRORS):  # the lease expires anyway
            await self.redis.zrem(self.key(tenant), token)


@dataclass
class _Lane:
    """One tenant in this worker: its share (stage 1) and its turn waiters (stage 3)."""

    active: int = 0
    waiters: deque[asyncio.Future[None]] = field(default_factory=deque)
    turn_waiters: deque[asyncio.Future[None]] = field(default_factory=deque)


class FairScheduler:
    """Stages 1-3 of the module docstring, for one worker."""

    def __init__(
        self,
        *,
        capacity: int,
        per_tenant: int,
        queue: int,
        queue_timeout: float,
        admin_limit: int | None = None,
        leases: TenantLeases | None = None,
        counts: FairnessCounts | None = None,
        repeat_delay: float = 0.0,
    ) -> None:
        self.capacity = capacity
        self.per_tenant = per_tenant
        self.admin_limit = admin_limit
        self.queue = queue
        self.queue_timeout = queue_timeout
        self.leases = leases
        self.counts = counts if counts is not None else FairnessCounts()
        self.counts.settings = {
            "max_concurrent_per_tenant": per_tenant,
            "max_concurrent_admin": admin_limit,
            "queue_per_tenant": queue,
            "queue_timeout_seconds": queue_timeout,
            "connections_per_worker": capacity,
            "shared": leases is not None,
            "repeat_refusal_delay_seconds": repeat_delay,
        }
        self.repeat_delay = repeat_delay
        self._refused_at: dict[str, float] = {}  # tenant -> its last queue_full refusal here
        self._held = 0
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        self._lanes: dict[str, _Lane] = {}
        self._free = capacity
        self._ring: deque[str] = deque()  # lanes with turn waiters, in turn order
        self.on_admitted: Callable[[Tenant], None] | None = None
        self.on_turn: Callable[[str], Awaitable[None]] | None = None

    def _lane(self, key: str) -> _Lane:
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
        return lane

    def _drop_if_idle(self, key: str) -> None:
        lane = self._lanes.get(key)
        if lane is not None and not (lane.active or lane.waiters or lane.turn_waiters):
            del self._lanes[key]

    # -- stages 1 and 2: the tenant's share -----------------------------------------------

    def limit_of(self, tenant: Tenant) -> int | None:
        """The tenant's share; None: no limit (the admin class unless one is configured)."""
        return self.admin_limit if tenant.tenant_class == "admin" else self.per_tenant

    @contextlib.asynccontextmanager
    async def computation(self, tenant: Tenant) -> AsyncIterator[None]:
        """Hold one of the tenant's shares for a computation; ``TenantThrottled`` when over."""
        limit = self.limit_of(tenant)
        deadline = time.monotonic() + self.queue_timeout
        await self._enter(tenant, limit, deadline)
        counts = self.counts
        token: str | bool = True
        try:
            if self.leases is not None and limit is not None:
                counts.change(tenant.key, tenant.tenant_class, tenant.salon_id, waiting=1)
                try:
                    token = await self.leases.acquire(tenant, limit, deadline)
                finally:
                    counts.change(tenant.key, tenant.tenant_class, tenant.salon_id, waiting=-1)
                if token is False:
                    self._throttle(tenant, "queue_timeout")
                if token is True:
                    counts.degraded += 1
        except BaseException:
            self._leave(tenant)
            raise
        counts.record_admitted(tenant.key, tenant.tenant_class, tenant.salon_id)
        counts.change(tenant.key, tenant.tenant_class, tenant.salon_id, running=1)
        try:
            if self.on_admitted is not None:
                self.on_admitted(tenant)
            yield
        finally:
            counts.change(tenant.key, tenant.tenant_class, tenant.salon_id, running=-1)
            self._leave(tenant)
            if isinstance(token, str) and self.leases is not None:
                await self.leases.release(tenant, token)

    def full(self, tenant: Tenant) -> bool:
        """Whether a computation of ``tenant`` would be refused at once (its share running
        in this worker, its queue full). Counts nothing."""
        limit = self.limit_of(tenant)
        if limit is None:
            return False
        lane = self._lanes.get(tenant.key)
        return lane is not None and lane.active >= limit and len(lane.waiters) >= self.queue

    def refuse_if_full(self, tenant: Tenant) -> None:
        """``TenantThrottled`` now if a computation of ``tenant`` would be refused at once
        (its share running, its queue full): called before a miss takes the cache's
        cross-process lock, so a flood of refusals costs no lock round trips. A pre-check only:
        ``computation`` decides."""
        if self.full(tenant):
            self._throttle(tenant, "queue_full")

    async def _enter(self, tenant: Tenant, limit: int | None, deadline: float) -> None:
        lane = self._lane(tenant.key)
        if limit is None or (lane.active < limit and not lane.waiters):
            lane.active += 1
            return
        if len(lane.waiters) >= self.queue:
            self._drop_if_idle(tenant.key)
            self._throttle(tenant, "queue_full")
        counts = self.counts
        counts.record_queued(tenant.key, tenant.tenant_class, tenant.salon_id)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        lane.waiters.append(waiter)
        counts.change(tenant.key, tenant.tenant_class, tenant.salon_id, waiting=1)
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await waiter
        except BaseException as error:
            if waiter.done() and not waiter.cancelled():
                self._leave(tenant)  # the share was handed to us just as we gave up
            else:
                with contextlib.suppress(ValueError):
                    lane.waiters.remove(waiter)
                self._drop_if_idle(tenant.key)
            if isinstance(error, TimeoutError):
                self._throttle(tenant, "queue_timeout")
            raise
        finally:
            counts.change(tenant.key, tenant.tenant_class, tenant.salon_id, waiting=-1)

    def _leave(self, tenant: Tenant) -> None:
        """Give a share back: to the tenant's next waiter, else to nobody."""
        lane = self._lane(tenant.key)
        while lane.waiters:
            waiter = lane.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the share passes on: ``active`` stays as it is
                return
        lane.active -= 1
        self._drop_if_idle(tenant.key)

    def _throttle(self, tenant: Tenant, reason: str) -> None:
        self.counts.record_throttle(tenant.key, tenant.tenant_class, tenant.salon_id, reason)
        refusal = TenantThrottled(self.queue_timeout, reason)
        if reason == "queue_full" and self.repeat_delay > 0:
            now = time.monotonic()
            last = self._refused_at.get(tenant.key)
            if len(self._refused_at) >= _REMEMBERED_REFUSALS:
                self._refused_at.clear()
            self._refused_at[tenant.key] = now
            if last is not None and now - last < self.retry_after:
                refusal.delay = self.repeat_delay
        raise refusal

    # -- the repeat refusal's delay ---------------------------------------------------------

    @property
    def retry_after(self) -> int:
        """The Retry-After of a refusal, in seconds."""
        return retry_after_seconds(self.queue_timeout)

    async def hold(self, refusal: TenantThrottled) -> None:
        """Wait out the refusal's ``delay`` before it is answered: a tenant refused again
        within its Retry-After gets its 429 after ``repeat_delay`` (a closed-loop flood's
        request rate drops to its connections / ``repeat_delay``). No share, connection or
        lock is held meanwhile; at most ``MAX_HELD_REFUSALS`` wait at once in a worker (the
        rest are answered at once)."""
        if refusal.delay <= 0 or self._held >= MAX_HELD_REFUSALS:
            return
        self._held += 1
        self.counts.delayed += 1
        try:
            await self.sleep(refusal.delay)
        finally:
            self._held -= 1

    @property
    def held(self) -> int:
        """Refusals waiting out their delay now."""
        return self._held

    # -- stage 3: connection turns, round-robin between tenants ----------------------------

    @contextlib.asynccontextmanager
    async def turn(self, lane_key: str, timeout: float) -> AsyncIterator[None]:
        """One of this worker's connections; ``PoolTimeoutError`` after ``timeout``."""
        if self._free > 0 and not self._ring:
            self._free -= 1
        else:
            lane = self._lane(lane_key)
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            lane.turn_waiters.append(waiter)
            if lane_key not in self._ring:
                self._ring.append(lane_key)
            try:
                async with asyncio.timeout(timeout):
                    await waiter
            except BaseException as error:
                if waiter.done() and not waiter.cancelled():
                    self._hand_on()  # the turn was ours just as we gave up
                else:
                    with contextlib.suppress(ValueError):
                        lane.turn_waiters.remove(waiter)
                    if not lane.turn_waiters:
                        with contextlib.suppress(ValueError):
                            self._ring.remove(lane_key)
                    self._drop_if_idle(lane_key)
                if isinstance(error, TimeoutError):
                    raise PoolTimeoutError("no connection became free in time") from None
                raise
        try:
            if self.on_turn is not None:
                await self.on_turn(lane_key)
            yield
        finally:
            self._hand_on()

    def _hand_on(self) -> None:
        """A turn is free: give it to the next tenant in the ring."""
        while self._ring:
            key = self._ring.popleft()
            lane = self._lanes.get(key)
            if lane is None:
                continue
            while lane.turn_waiters:
                waiter = lane.turn_waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    if lane.turn_waiters:
                        self._ring.append(key)  # its next request, after every other tenant
                    else:
                        self._drop_if_idle(key)
                    return
            self._drop_if_idle(key)
        self._free += 1

    @property
    def free_turns(self) -> int:
        return self._free
