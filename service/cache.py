"""Report cache: Redis cache-aside that is never wrong, and never in the way.

Keys. ``sr:v2:{s:<salon>}:<report>:<role>:<digest>`` for one salon and
``sr:v2:{p}:<report>:<role>:<digest>`` for platform-wide reports. The digest covers the
normalised parameters (defaults filled in, keys sorted, dates canonical), so equivalent requests
share an entry; the salon (or platform) and the caller's role are in the key itself, so two
tenants or roles never do. The ``{…}`` hash tag keeps everything of one scope in one Redis
Cluster slot, which the Lua scripts and the ``MGET`` below rely on.

Validity. Each scope and report has an epoch, ``sr:v2:<tag>:<report>:epoch``: a random token,
created by the first computation that finds none. An entry records the epoch it was computed
under and is served only while that epoch is still there, read together with the entry in one
``MGET`` (same slot). Invalidation deletes the epoch. So nothing Redis may evict decides
correctness: an evicted entry is a miss, an evicted epoch makes its scope's entries misses and
comes back as a token nobody has read. A computation stores its result only if the epoch it
read before its query is still current (checked in the store script), so a slow query cannot
put pre-change data back. Per report, a tracked set of keys lets invalidation unlink the
entries at once: that is for memory only (a set evicted leaves garbage that expires). The
clear-everything (admin, a listener reconnecting, the stream becoming current) deletes every
epoch it finds with ``SCAN``: an epoch some computation read either is found, or was already
replaced, so nothing begun before the clear can store after it.

Announcements. The invalidation listener calls ``announce`` the moment a change's notification
arrives: local copies of those scopes go, computations in flight take no more joiners, and
until ``apply_announced`` has deleted their epochs in Redis this process serves none of their
Redis entries (it computes instead). Announcements that arrive meanwhile are merged into the
next round.

Single flight. Concurrent misses for one key in one process share one computation (an
in-process future); across processes the first takes a Redis lock with a lease and the others
poll for its result with backoff (at most ``HOLDER_WAIT_SECONDS``, or until the lock is
gone), then compute themselves. A
computation takes no more joiners once its scope is announced changed or cleared.

Stale-while-revalidate. Entries live in Redis ``grace`` seconds past their TTL. Such an entry
is served as ``STALE`` (if its epoch still holds) while one background task refreshes it.

Failure. Every Redis call has a short socket timeout; a circuit breaker stops calling Redis
after repeated failures and probes it again after a pause. While Redis is unusable, or while
the invalidation listener is disconnected (notifications may be lost), requests bypass the
cache and are answered from PostgreSQL (``BYPASS``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import struct
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson
from opentelemetry import trace
from redis.asyncio import Redis
from redis.exceptions import RedisError

from service.errors import CacheUnavailable, DatabaseUnavailable
from telemetry import attributes as attr

logger = logging.getLogger("service.cache")

NAMESPACE = "sr:v2"
HOLDER_WAIT_SECONDS = 5.0  # the longest a request waits for another process's computation
PLATFORM_TAG = "{p}"
REPORTS = ("dashboard", "bookings", "professionals")
_HEADER = struct.Struct(">d16s16s")  # fresh-until (unix seconds), body digest, epoch
_EPOCH_BYTES = 8  # random bytes of an epoch token (16 hex digits)
_SCAN_BATCH = 500

# KEYS[1] = the epoch, KEYS[2] = the lock; ARGV[1] = a new epoch for when there is none,
# ARGV[2] = the lock token, ARGV[3] = the lease (ms). Returns {epoch, 1 if locked}.
_BEGIN_SCRIPT = """
local epoch = redis.call('GET', KEYS[1])
if not epoch then
    epoch = ARGV[1]
    redis.call('SET', KEYS[1], epoch)
end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then return {epoch, 1} end
return {epoch, 0}
"""

# KEYS[1] = the entry, KEYS[2] = its epoch, KEYS[3] = the tracked set; ARGV[1] = the epoch
# the computation read before its query, ARGV[2] = the value, ARGV[3] = its lifetime (ms).
_STORE_SCRIPT = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('SADD', KEYS[3], KEYS[1])
if redis.call('PTTL', KEYS[3]) < tonumber(ARGV[3]) then
    redis.call('PEXPIRE', KEYS[3], ARGV[3])
end
return 1
"""

# KEYS = (epoch, tracked set) pairs of one scope, one pair per report. Deleting the epoch is
# the invalidation; unlinking the tracked entries only frees their memory now.
_INVALIDATE_SCRIPT = """
local deleted = 0
for i = 1, #KEYS, 2 do
    redis.call('DEL', KEYS[i])
    local members = redis.call('SMEMBERS', KEYS[i + 1])
    for j = 1, #members, 500 do
        deleted = deleted + redis.call('UNLINK', unpack(members, j, math.min(j + 499, #members)))
    end
    redis.call('DEL', KEYS[i + 1])
end
return deleted
"""

_RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class CacheResult(StrEnum):
    HIT = "hit"
    MISS = "miss"
    STALE = "stale"
    ERROR = "error"
    BYPASS = "bypass"

    @property
    def header(self) -> str:
        """The ``X-Cache`` value: a Redis error is served like a bypass."""
        return "BYPASS" if self is CacheResult.ERROR else self.value.upper()


_SERVED_FROM_CACHE = frozenset({CacheResult.HIT, CacheResult.STALE})


@dataclass(frozen=True, slots=True)
class CacheKey:
    report: str
    tag: str  # the hash tag of the scope: {s:<salon>} or {p}
    key: str

    @property
    def epoch_key(self) -> str:
        return f"{NAMESPACE}:{self.tag}:{self.report}:epoch"

    @property
    def tracked_key(self) -> str:
        return f"{NAMESPACE}:{self.tag}:keys:{self.report}"

    @property
    def lock_key(self) -> str:
        return f"{self.key}:lock"


def scope_tag(salon_id: int | None) -> str:
    return PLATFORM_TAG if salon_id is None else f"{{s:{salon_id}}}"


def build_key(report: str, salon_id: int | None, role: str, params: dict[str, Any]) -> CacheKey:
    """The cache key of a report request; ``params`` must already be normalised."""
    canonical = orjson.dumps(params, option=orjson.OPT_SORT_KEYS)
    digest = hashlib.blake2b(canonical, digest_size=16).hexdigest()
    tag = scope_tag(salon_id)
    return CacheKey(report, tag, f"{NAMESPACE}:{tag}:{report}:{role}:{digest}")


@dataclass(frozen=True, slots=True)
class CacheEntry:
    body: bytes
    digest: bytes
    fresh_until: float
    epoch: bytes = b""  # the epoch it was computed under (entries read from Redis)

    @property
    def etag(self) -> str:
        return f'"{self.digest.hex()}"'

    def seconds_left(self, now: float) -> int:
        return max(0, int(self.fresh_until - now))

    def encode(self, epoch: bytes) -> bytes:
        return _HEADER.pack(self.fresh_until, self.digest, epoch) + self.body

    @classmethod
    def decode(cls, raw: bytes) -> CacheEntry:
        fresh_until, digest, epoch = _HEADER.unpack_from(raw)
        return cls(raw[_HEADER.size :], digest, fresh_until, epoch)

    @classmethod
    def valid(cls, raw: bytes | None, epoch: bytes | None) -> CacheEntry | None:
        """The entry stored as ``raw``, if the epoch it was computed under is still current."""
        if raw is None or epoch is None or len(raw) < _HEADER.size:
            return None
        entry = cls.decode(raw)
        return entry if entry.epoch == epoch else None

    @classmethod
    def of(cls, body: bytes, ttl: float, now: float) -> CacheEntry:
        return cls(body, body_digest(body), now + ttl)


def body_digest(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=16).digest()


@dataclass(slots=True)
class Outcome:
    """What a fetch served: the entry, how it was obtained and where the time went."""

    entry: CacheEntry
    result: CacheResult
    cache_ms: float = 0.0
    compute_ms: float = 0.0


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


class LocalTier:
    """A bounded in-process copy of fresh entries, in front of Redis.

    It is kept correct by the same invalidations as Redis: every worker's listener drops the
    changed scopes here too, and an admin clear on any worker is broadcast to the others
    (``NOTIFY report_cache_cleared``). A lookup remembers the tier's generation before it goes
    to Redis and stores what it got only if no invalidation happened in between. Entries live
    at most ``max_age`` seconds here (and never past their freshness), as a bound on any
    invalidation this process might not hear of.
    """

    def __init__(
        self, max_entries: int = 5000, max_age: float = 30.0, clock: Callable[[], float] = time.time
    ) -> None:
        self.max_entries = max_entries
        self.max_age = max_age
        self.clock = clock
        self.generation = 0
        self._entries: dict[str, tuple[CacheEntry, float, str, str]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey) -> CacheEntry | None:
        found = self._entries.get(key.key)
        if found is None:
            return None
        entry, expires, _, _ = found
        if expires <= self.clock():
            self._entries.pop(key.key, None)
            return None
        return entry

    def put(self, key: CacheKey, entry: CacheEntry, generation: int) -> None:
        if generation != self.generation or self.max_entries <= 0:
            return  # an invalidation happened since this lookup began
        expires = min(entry.fresh_until, self.clock() + self.max_age)
        if len(self._entries) >= self.max_entries and key.key not in self._entries:
            del self._entries[next(iter(self._entries))]  # the oldest insertion
        self._entries[key.key] = (entry, expires, key.tag, key.report)

    def drop_scopes(self, tags: Collection[str]) -> None:
        """Forget these scopes, every report of them."""
        self.generation += 1
        self._entries = {
            name: value for name, value in self._entries.items() if value[2] not in tags
        }

    def drop(self, tag: str | None = None, report: str | None = None) -> None:
        """Forget one scope (or every scope), for one report or all."""
        self.generation += 1
        if tag is None and report is None:
            self._entries.clear()
            return
        self._entries = {
            name: value
            for name, value in self._entries.items()
            if not ((tag is None or value[2] == tag) and (report is None or value[3] == report))
        }


Compute = Callable[[], Awaitable[bytes]]


@dataclass(slots=True)
class _Flight:
    """A computation in this process that requests for ``key`` may join."""

    key: CacheKey
    future: asyncio.Future[Outcome]


def new_epoch() -> str:
    return secrets.token_hex(_EPOCH_BYTES)


class ReportCache:
    """Cache-aside for report bodies; see the module docstring for the guarantees."""

    def __init__(
        self,
        redis: Redis | None,
        *,
        stale_grace: float = 60.0,
        lock_lease: float = 15.0,
        breaker: CircuitBreaker | None = None,
        clock: Callable[[], float] = time.time,
        tracer: trace.Tracer | None = None,
        local: LocalTier | None = None,
    ) -> None:
        self.redis = redis
        self.tracer = tracer or trace.NoOpTracer()
        self.local = local if local is not None else LocalTier(max_entries=0)
        self.stale_grace = stale_grace
        self.lock_lease = lock_lease
        self.breaker = breaker or CircuitBreaker()
        self.clock = clock
        self._listener_healthy = redis is not None
        self._inflight: dict[str, _Flight] = {}
        self._refreshing: set[str] = set()
        self._background: set[asyncio.Task[None]] = set()
        # Announced changes (see ``announce``): a sequence number per announcement, the scopes
        # whose Redis entries are not invalidated yet, and who else wants to hear of them.
        self.announced = 0
        self.applied = 0  # every announcement up to this one is invalidated in Redis
        self._pending: dict[str, int] = {}  # scope tag -> its latest announcement
        self._pending_everything = 0  # the latest announcement of "everything", until applied
        self._announce_hooks: list[Callable[[set[int] | None], None]] = []
        self._begin = redis.register_script(_BEGIN_SCRIPT) if redis else None
        self._store = redis.register_script(_STORE_SCRIPT) if redis else None
        self._invalidate = redis.register_script(_INVALIDATE_SCRIPT) if redis else None
        self._release = redis.register_script(_RELEASE_SCRIPT) if redis else None

    # -- availability -------------------------------------------------------------------

    @property
    def listener_healthy(self) -> bool:
        """Whether the invalidation listener hears every change (else the cache is bypassed)."""
        return self._listener_healthy

    @listener_healthy.setter
    def listener_healthy(self, healthy: bool) -> None:
        if not healthy:
            # Changes may go unheard from now on: no request may join what is in flight.
            self._detach(None)
        self._listener_healthy = healthy

    async def _call(self, operation: Awaitable[Any]) -> Any:
        try:
            value = await operation
        except (TimeoutError, RedisError, OSError):
            self.breaker.failed()
            raise
        self.breaker.succeeded()
        return value

    # -- the request path ---------------------------------------------------------------

    async def fetch(self, key: CacheKey, ttl: float, compute: Compute) -> Outcome:
        """Serve ``key`` from the cache, or compute it once and store it."""
        parent = trace.get_current_span().get_span_context()
        if parent.is_valid and not parent.trace_flags.sampled:
            # An unsampled request: its child spans would be dropped anyway (parent-based
            # sampling), so none is made; most of the cost of tracing a hit is span objects.
            return await self._fetch(key, ttl, compute)
        with self.tracer.start_as_current_span(
            "cache.get", attributes={attr.REPORT_NAME: key.report, attr.CACHE_OPERATION: "get"}
        ) as span:
            outcome = await self._fetch(key, ttl, compute)
            if span.is_recording():
                span.set_attribute(attr.CACHE_RESULT, outcome.result.value)
                span.set_attribute(attr.CACHE_HIT, outcome.result in _SERVED_FROM_CACHE)
            return outcome

    async def _fetch(self, key: CacheKey, ttl: float, compute: Compute) -> Outcome:
        started = time.perf_counter()
        trusted = self.redis is not None and self.listener_healthy
        generation = self.local.generation
        local = self.local.get(key) if trusted else None
        if local is not None:
            return Outcome(local, CacheResult.HIT, cache_ms=(time.perf_counter() - started) * 1000)
        if trusted and self._announced_pending(key.tag):
            # Told of a change that Redis may not know of yet: its entries may predate it.
            return await self._single_flight(key, lambda: self._compute(compute, ttl))
        # Consult the breaker only when Redis will really be called: a half-open breaker lets
        # one probe through, and that probe must reach Redis to close it again.
        if not (trusted and self.breaker.allow()):
            try:
                outcome = await self._single_flight(key, lambda: self._compute(compute, ttl))
            except DatabaseUnavailable:
                if trusted:
                    raise  # Redis is unusable: nothing to fall back to
                kept = await self._last_known(key)
                if kept is None:
                    raise
                return Outcome(
                    kept, CacheResult.STALE, cache_ms=(time.perf_counter() - started) * 1000
                )
            outcome.result = CacheResult.BYPASS
            return outcome
        try:
            raw, epoch = await self._call(self.redis.mget(key.key, key.epoch_key))  # type: ignore[union-attr]
        except (TimeoutError, RedisError, OSError):
            outcome = await self._single_flight(key, lambda: self._compute(compute, ttl))
            outcome.result = CacheResult.ERROR
            outcome.cache_ms = (time.perf_counter() - started) * 1000
            return outcome
        cache_ms = (time.perf_counter() - started) * 1000
        entry = CacheEntry.valid(raw, epoch)
        if entry is not None:
            if entry.fresh_until > self.clock():
                self.local.put(key, entry, generation)
                return Outcome(entry, CacheResult.HIT, cache_ms=cache_ms)
            self._refresh_in_background(key, ttl, compute)
            return Outcome(entry, CacheResult.STALE, cache_ms=cache_ms)

        async def fill() -> Outcome:
            # Only the request that ran the computation keeps it locally, under the generation
            # it began with: one that joined it later may have begun after an invalidation
            # that the shared result predates.
            filled = await self._fill(key, ttl, compute)
            if filled.result in (CacheResult.MISS, CacheResult.HIT):
                self.local.put(key, filled.entry, generation)
            return filled

        outcome = await self._single_flight(key, fill)
        outcome.cache_ms += cache_ms
        return outcome

    async def _last_known(self, key: CacheKey) -> CacheEntry | None:
        """What the cache holds for ``key`` (still valid, within its grace), for when the
        database is down.

        The invalidation listener connects to the same database, so while PostgreSQL is
        unreachable it is disconnected and the cache untrusted; but then nobody can change
        bookings either, and an entry in its grace beats a 503 (as for stale entries). It is
        served ``STALE`` and with no freshness left, so no client keeps it.
        """
        entry = self.local.get(key)
        if entry is None and self.redis is not None and self.breaker.allow():
            try:
                raw, epoch = await self._call(self.redis.mget(key.key, key.epoch_key))
            except (TimeoutError, RedisError, OSError):
                return None
            entry = CacheEntry.valid(raw, epoch)
        if entry is None:
            return None
        return CacheEntry(entry.body, entry.digest, min(entry.fresh_until, self.clock()))

    async def _single_flight(
        self, key: CacheKey, make: Callable[[], Awaitable[Outcome]]
    ) -> Outcome:
        """One computation per key in this process; the others await its outcome."""
        name = key.key
        pending = self._inflight.get(name)
        if pending is not None:
            shared = await asyncio.shield(pending.future)
            return Outcome(shared.entry, shared.result, shared.cache_ms, shared.compute_ms)
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        flight = _Flight(key, future)
        self._inflight[name] = flight
        try:
            outcome = await make()
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # mark retrieved: waiters, if any, re-raise it themselves
            raise
        finally:
            if self._inflight.get(name) is flight:  # not detached by an invalidation since
                del self._inflight[name]
        future.set_result(outcome)
        return Outcome(outcome.entry, outcome.result, outcome.cache_ms, outcome.compute_ms)

    def _detach(self, tag: str | None, report: str | None = None) -> None:
        """Computations in flight for a scope (or all) take no more joiners: they may predate
        a change. They finish for those already waiting; their store is refused if the change
        reached Redis's epoch first."""
        if tag is None and report is None:
            self._inflight.clear()
            return
        for name, flight in list(self._inflight.items()):
            if (tag is None or flight.key.tag == tag) and (
                report is None or flight.key.report == report
            ):
                del self._inflight[name]

    async def _compute(self, compute: Compute, ttl: float) -> Outcome:
        started = time.perf_counter()
        with self.tracer.start_as_current_span("report.compute"):
            body = await compute()
        compute_ms = (time.perf_counter() - started) * 1000
        return Outcome(
            CacheEntry.of(body, ttl, self.clock()), CacheResult.MISS, compute_ms=compute_ms
        )

    async def _fill(self, key: CacheKey, ttl: float, compute: Compute) -> Outcome:
        """Miss: take the cross-process lock and compute, or wait for whoever holds it."""
        started = time.perf_counter()
        token = secrets.token_hex(8)
        try:
            epoch, locked = await self._call(self._epoch_and_lock(key, token))
        except (TimeoutError, RedisError, OSError):
            outcome = await self._compute(compute, ttl)
            outcome.result = CacheResult.ERROR
            return outcome
        if not locked:
            waited = await self._wait_for_holder(key)
            if waited is not None:
                waited.cache_ms = (time.perf_counter() - started) * 1000
                return waited
        cache_ms = (time.perf_counter() - started) * 1000
        outcome = await self._compute_and_store(key, ttl, compute, epoch, token if locked else None)
        outcome.cache_ms = cache_ms
        return outcome

    async def _compute_and_store(
        self, key: CacheKey, ttl: float, compute: Compute, epoch: bytes, token: str | None
    ) -> Outcome:
        """Compute, store if the epoch still holds, and release the lock ``token`` if held."""
        try:
            outcome = await self._compute(compute, ttl)
        except BaseException:
            if token is not None:
                await self._unlock(key, token)
            raise
        await self._put(key, outcome.entry, ttl, epoch, token)
        return outcome

    async def _epoch_and_lock(self, key: CacheKey, token: str) -> tuple[bytes, bool]:
        """The scope's epoch (created if there is none) and whether ``token`` took the lock;
        read before the computation's query, so that its result is stored under it."""
        assert self._begin is not None
        epoch, locked = await self._begin(
            keys=[key.epoch_key, key.lock_key],
            args=[new_epoch(), token, int(self.lock_lease * 1000)],
        )
        return bytes(epoch), bool(locked)

    async def _wait_for_holder(self, key: CacheKey) -> Outcome | None:
        """Poll for the lock holder's result with backoff, at most ``HOLDER_WAIT_SECONDS``.

        Not the whole lease: a holder whose release failed (Redis paused or gone at that
        moment) leaves its lock for the rest of the lease, and waiting that long made
        requests time out; past this wait they compute themselves."""
        redis = self.redis
        assert redis is not None
        deadline = time.monotonic() + min(self.lock_lease, HOLDER_WAIT_SECONDS)
        delay = 0.005
        while time.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)
            try:
                raw, epoch, holder = await self._call(
                    redis.mget(key.key, key.epoch_key, key.lock_key)
                )
            except (TimeoutError, RedisError, OSError):
                return None
            entry = CacheEntry.valid(raw, epoch)
            if entry is not None:
                return Outcome(entry, CacheResult.HIT)
            if holder is None:  # the holder gave up or crashed (or its store was refused)
                return None
        return None

    async def _put(
        self, key: CacheKey, entry: CacheEntry, ttl: float, epoch: bytes, token: str | None
    ) -> None:
        assert self._store is not None
        lifetime_ms = int((ttl + self.stale_grace) * 1000)
        with self.tracer.start_as_current_span(
            "cache.set", attributes={attr.REPORT_NAME: key.report, attr.CACHE_OPERATION: "set"}
        ):
            try:
                stored = await self._call(
                    self._store(
                        keys=[key.key, key.epoch_key, key.tracked_key],
                        args=[epoch, entry.encode(epoch), lifetime_ms],
                    )
                )
                if not stored:
                    logger.debug("not caching %s: invalidated while it was computed", key.report)
            except (TimeoutError, RedisError, OSError) as error:
                logger.warning(
                    "could not store a %s report in the cache: %s",
                    key.report,
                    type(error).__name__,
                )
            # Released even when the store failed: the other processes polling for this key
            # would otherwise wait out the whole lease, longer than any client waits.
            if token is not None:
                await self._unlock(key, token)

    async def _unlock(self, key: CacheKey, token: str) -> None:
        assert self._release is not None
        with contextlib.suppress(TimeoutError, RedisError, OSError):  # the lease expires anyway
            await self._call(self._release(keys=[key.lock_key], args=[token]))

    def _refresh_in_background(self, key: CacheKey, ttl: float, compute: Compute) -> None:
        if key.key in self._refreshing:
            return
        self._refreshing.add(key.key)

        async def refresh() -> None:
            try:
                token = secrets.token_hex(8)
                epoch, locked = await self._call(self._epoch_and_lock(key, token))
                if not locked:
                    return  # another process is refreshing it
                await self._compute_and_store(key, ttl, compute, epoch, token)
            except Exception:
                logger.warning(
                    "background refresh of a %s report failed", key.report, exc_info=True
                )
            finally:
                self._refreshing.discard(key.key)

        task = asyncio.create_task(refresh())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- announced changes --------------------------------------------------------------

    def on_announce(self, hook: Callable[[set[int] | None], None]) -> None:
        """Call ``hook`` with the salon ids (None: all) of every announced change."""
        self._announce_hooks.append(hook)

    def announce(self, salon_ids: set[int] | None) -> None:
        """A change to these salons (None: to anything) is committed and folded: forget at once
        what this process holds of them (and of the platform-wide scope), and serve none of
        their Redis entries until ``apply_announced`` has invalidated them. Synchronous: the
        listener calls it as the notification comes off the socket."""
        self.announced += 1
        if salon_ids is None:
            self._pending_everything = self.announced
            self.forget_local()
        else:
            tags = {scope_tag(salon_id) for salon_id in salon_ids} | {PLATFORM_TAG}
            for tag in tags:
                self._pending[tag] = self.announced
                self._detach(tag)
            self.local.drop_scopes(tags)
        for hook in self._announce_hooks:
            hook(salon_ids)

    def _announced_pending(self, tag: str) -> bool:
        return bool(self._pending_everything) or tag in self._pending

    async def apply_announced(self) -> int:
        """Invalidate in Redis everything announced so far, in one round trip; returns the
        last announcement covered."""
        covered = self.announced
        if self._pending_everything:
            await self.clear_all()
        elif self._pending and self.redis is not None:
            await self._invalidate_scopes(list(self._pending), None)
        self._settle(covered)
        return covered

    def _settle(self, covered: int) -> None:
        """Announcements up to ``covered`` are invalidated in Redis."""
        self._pending = {tag: last for tag, last in self._pending.items() if last > covered}
        if self._pending_everything <= covered:
            self._pending_everything = 0
        self.applied = max(self.applied, covered)

    # -- invalidation -------------------------------------------------------------------

    def forget_local(self, tag: str | None = None, report: str | None = None) -> None:
        """Drop what this process holds of a scope (or of all): its local copies, and the
        computations in flight stop taking joiners."""
        self.local.drop(tag, report)
        self._detach(tag, report)

    async def _invalidate_scopes(self, tags: list[str], report: str | None) -> int:
        """Delete the epochs (and unlink the tracked entries) of these scopes, for one report
        or all, in one round trip; returns how many entries went."""
        redis = self.redis
        assert redis is not None
        assert self._invalidate is not None
        reports = REPORTS if report is None else (report,)
        async with redis.pipeline(transaction=False) as pipe:
            for tag in tags:
                keys = []
                for name in reports:
                    probe = CacheKey(name, tag, "")
                    keys += [probe.epoch_key, probe.tracked_key]
                await self._invalidate(keys=keys, client=pipe)
            counts = await self._call(pipe.execute())
        return sum(int(count) for count in counts)

    async def invalidate(self, salon_id: int | None, report: str | None = None) -> int:
        """Drop one scope's entries (all reports, or one); returns how many went."""
        tag = scope_tag(salon_id)
        self.forget_local(tag, report)
        if self.redis is None:
            return 0
        try:
            return await self._invalidate_scopes([tag], report)
        finally:
            # Again: a request between the first drop and the script may have copied a
            # Redis entry the script has just invalidated into the local tier.
            self.local.drop(tag, report)

    async def clear(self, report: str | None = None, salon_id: int | None = None) -> int:
        """The admin clear: one salon's entries (of one report or all), else every salon's.

        Through the circuit breaker: ``CacheUnavailable`` (503) when Redis cannot be reached,
        at once while the breaker is open. Local copies are dropped in any case.
        """
        if self.redis is not None and not self.breaker.allow():
            self.forget_local(None if salon_id is None else scope_tag(salon_id), report)
            raise CacheUnavailable(self.breaker.cooldown)
        try:
            if salon_id is not None:
                return await self.invalidate(salon_id, report)
            return await self.clear_all(report)
        except (TimeoutError, RedisError, OSError) as error:
            raise CacheUnavailable(self.breaker.cooldown) from error

    async def clear_all(self, report: str | None = None) -> int:
        """Delete every epoch (of one report, if given) and unlink every entry, by ``SCAN``.

        A computation that began before the clear read an epoch that existed when the clear
        began: ``SCAN`` returns every key present from its start to its end, so that epoch is
        deleted, or was replaced meanwhile; either way the computation cannot store.
        """
        covered = self.announced
        self.forget_local(None, report)
        redis = self.redis
        if redis is None:
            if report is None:
                self._settle(covered)
            return 0
        deleted = 0
        cursor = 0
        while True:
            cursor, names = await self._call(
                redis.scan(cursor, match=f"{NAMESPACE}:*", count=_SCAN_BATCH)
            )
            chosen = [name for name in names if _cleared_by(name, report)]
            if chosen:
                deleted += await self._unlink_entries(chosen)
            if cursor == 0:
                break
        # Again: a request may have copied an entry into the local tier before its epoch went.
        self.forget_local(None, report)
        if report is None:
            self._settle(covered)
        return deleted

    async def _unlink_entries(self, names: list[bytes]) -> int:
        redis = self.redis
        assert redis is not None
        entries: list[bytes] = []
        others: list[bytes] = []  # epochs, tracked-key sets and locks: removed, not counted
        for name in names:
            is_entry = not name.endswith((b":epoch", b":lock")) and b":keys:" not in name
            (entries if is_entry else others).append(name)
        deleted = 0
        if entries:
            deleted = int(await self._call(redis.unlink(*entries)))
        if others:
            await self._call(redis.unlink(*others))
        return deleted

    async def close(self) -> None:
        """Let background refreshes finish (briefly), then abandon them."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=5)
        for task in list(self._background):
            task.cancel()


def _cleared_by(name: bytes, report: str | None) -> bool:
    """Whether a clear of ``report`` (None: of every report) removes the key ``name``."""
    if report is None:
        return True
    text = name.decode()
    return f":{report}:" in text or text.endswith(f":keys:{report}")
