"""The report cache: Redis cache-aside that is never wrong, and never in the way.

``ReportCache.fetch`` serves a report body from the local tier or Redis, or computes it once
and stores it. What goes into a key is in ``keys.py``; the stored value in ``entry.py``; the Lua
in ``scripts.py``; announced changes and the clears in ``invalidation.py``.

Validity. Each scope and report has an epoch, a random token created by the first computation
that finds none. An entry records the epoch it was computed under and is served only while that
epoch is still there, read together with the entry in one ``MGET`` (same slot). Invalidation
deletes the epoch. So nothing Redis may evict decides correctness: an evicted entry is a miss,
an evicted epoch makes its scope's entries misses and comes back as a token nobody has read. A
computation stores its result only if the epoch it read before its query is still current
(checked in the store script), so a slow query cannot put pre-change data back.

Single flight. Concurrent misses for one key in one process share one computation (an
in-process future); across processes the first takes a Redis lock with a lease and the others
poll for its result with backoff (at most ``HOLDER_WAIT_SECONDS``, or until the lock is gone),
then compute themselves. A computation takes no more joiners once its scope is announced
changed or cleared.

Stale-while-revalidate. Entries live in Redis ``grace`` seconds past their TTL. Such an entry
is served as ``STALE`` (if its epoch still holds) while one background task refreshes it.

Recompute instead of evict. Keys this process served within ``refresh_recent`` seconds are
remembered with their computation (at most ``RECENT_KEYS``). When an invalidation round has
deleted a scope's epochs in Redis, the remembered keys of that scope are recomputed (and
forgotten until read again: at most one recomputation per read) in the
background, in this process's single flight (requests for them join it) and under the
cross-process lock; and a key read in the last tenth of its TTL is refreshed ahead of its
expiry. A refresh is a computation like any miss: it reads the epoch (created anew after the
invalidation) before its query and stores only if that epoch still holds, so a refresh that a
later change overtakes is refused, never stored as current.

Failure. Every Redis call has a short socket timeout; a circuit breaker stops calling Redis
after repeated failures and probes it again after a pause. While Redis is unusable, or while
the invalidation listener is disconnected (notifications may be lost), requests bypass the
cache and are answered from PostgreSQL (``BYPASS``); if the database is unavailable too (the
``unavailable`` exceptions), the last valid entry is served ``STALE``.

Over 400 lines: the request path of one lookup (local tier, trust, breaker, Redis,
cross-process lock, wait, store, background refresh) and the recomputation of recently read
keys after an invalidation (which must take the same lock, epoch check and store as a miss)
read best in one class; what could live apart does (keys, entry, breaker, local tier, single
flight, scripts, invalidation).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection

from opentelemetry import trace
from redis.asyncio import Redis

from service.cache.breaker import REDIS_ERRORS, CircuitBreaker
from service.cache.durability import ReplicaWait
from service.cache.entry import SERVED_FROM_CACHE, CacheEntry, CacheResult, Outcome, new_epoch
from service.cache.flight import SingleFlight
from service.cache.invalidation import (
    Announcements,
    invalidate_scopes,
    unlink_everything,
)
from service.cache.keys import CacheKey, scope_tag
from service.cache.local import LocalTier
from service.cache.scripts import Scripts
from service.errors import APIError, CacheUnavailable
from telemetry import attributes as attr

logger = logging.getLogger("service.cache")

HOLDER_WAIT_SECONDS = 5.0  # the longest a request waits for another process's computation
RECENT_KEYS = 2000  # keys remembered for recomputation after an invalidation, per process
REFRESH_AHEAD = 0.1  # a key read in this last share of its TTL is refreshed before it expires
REFRESH_CONCURRENCY = 4  # background recomputations at once, per process


Compute = Callable[[], Awaitable[bytes]]


def _skipped(key: CacheKey, work: str, error: APIError) -> None:
    """Background work the service itself declined: the tenant's fair share was full (429) or
    the database is unavailable (503). Expected under a burst or an outage, and no loss: the key
    is computed again on its next read. One line without a traceback, not a warning per key."""
    logger.info("background %s of a %s report skipped: %s", work, key.report, error.code)


class ReportCache:
    """Cache-aside for report bodies; see the module docstring for the guarantees.

    ``reports`` names every report cached (an invalidation of a scope covers them all);
    ``unavailable`` are the exceptions of a computation that mean the database is down.
    """

    def __init__(
        self,
        redis: Redis | None,
        *,
        reports: Collection[str],
        unavailable: tuple[type[BaseException], ...] = (),
        stale_grace: float = 60.0,
        lock_lease: float = 15.0,
        breaker: CircuitBreaker | None = None,
        clock: Callable[[], float] = time.time,
        tracer: trace.Tracer | None = None,
        local: LocalTier | None = None,
        refresh_recent: float = 0.0,
        durability: ReplicaWait | None = None,
    ) -> None:
        self.redis = redis
        # WAIT for a replica after each invalidation (durability.py); None: never.
        self.durability = durability
        self.reports = tuple(reports)
        self.unavailable = unavailable
        self.tracer = tracer or trace.NoOpTracer()
        self.local = local if local is not None else LocalTier(max_entries=0)
        self.stale_grace = stale_grace
        self.lock_lease = lock_lease
        self.breaker = breaker or CircuitBreaker()
        self.clock = clock
        self.announcements = Announcements()
        self._scripts = Scripts(redis) if redis is not None else None
        self._listener_healthy = redis is not None
        self._flights = SingleFlight()
        self._refreshing: set[str] = set()
        self._background: set[asyncio.Task[None]] = set()
        # Keys served recently, oldest read first: key -> (key, ttl, computation, last read).
        self.refresh_recent = refresh_recent
        self._recent: OrderedDict[str, tuple[CacheKey, float, Compute, float]] = OrderedDict()
        self._refresh_slots = asyncio.Semaphore(REFRESH_CONCURRENCY)
        self.recomputations = 0  # recomputations after an invalidation (stored or refused)

    # -- availability -------------------------------------------------------------------

    @property
    def listener_healthy(self) -> bool:
        """Whether the invalidation listener hears every change (else the cache is bypassed)."""
        return self._listener_healthy

    @listener_healthy.setter
    def listener_healthy(self, healthy: bool) -> None:
        if not healthy:
            # Changes may go unheard from now on: no request may join what is in flight.
            self._flights.detach(None)
        self._listener_healthy = healthy

    # -- the request path ---------------------------------------------------------------

    async def fetch(
        self,
        key: CacheKey,
        ttl: float,
        compute: Compute,
        before_fill: Callable[[], None] | None = None,
    ) -> Outcome:
        """Serve ``key`` from the cache, or compute it once and store it.

        ``before_fill`` is called on a miss that would start a computation here, before the
        cross-process lock is taken; it may raise to refuse the request at once (a tenant over
        its fair share, ``service.fairness``), at the cost of one Redis lookup.
        """
        parent = trace.get_current_span().get_span_context()
        if parent.is_valid and not parent.trace_flags.sampled:
            # An unsampled request: its child spans would be dropped anyway (parent-based
            # sampling), so none is made; most of the cost of tracing a hit is span objects.
            return await self._fetch(key, ttl, compute, before_fill)
        with self.tracer.start_as_current_span(
            "cache.get", attributes={attr.REPORT_NAME: key.report, attr.CACHE_OPERATION: "get"}
        ) as span:
            outcome = await self._fetch(key, ttl, compute, before_fill)
            if span.is_recording():
                span.set_attribute(attr.CACHE_RESULT, outcome.result.value)
                span.set_attribute(attr.CACHE_HIT, outcome.result in SERVED_FROM_CACHE)
            return outcome

    def local_hit(self, key: CacheKey) -> CacheEntry | None:
        """What ``fetch`` would serve from the local tier without awaiting anything, if it
        would (the cache trusted, the entry fresh there); the cache-hit path's lookup."""
        if self.redis is None or not self.listener_healthy:
            return None
        if self.refresh_recent > 0:
            # Remembered as read, as ``fetch`` does; a key not remembered (never read, or
            # forgotten when its recomputation was scheduled) is left to ``fetch``, which
            # remembers it with the computation to run again.
            remembered = self._recent.get(key.key)
            if remembered is None:
                return None
            self._recent[key.key] = (remembered[0], remembered[1], remembered[2], self.clock())
            self._recent.move_to_end(key.key)
        return self.local.get(key)

    async def would_fill(self, key: CacheKey) -> bool:
        """Whether ``fetch`` would now call its ``before_fill`` for ``key``: the cache
        trusted, no change announced for its scope, the entry in neither tier (one ``MGET``,
        as ``fetch`` makes it), and no computation of it in flight in this process. False
        when anything else would happen, or when Redis cannot be asked: then the caller
        leaves the request to ``fetch``. The refusal path's lookup (``service.reports.hits``):
        a tenant over its fair share is refused only where ``fetch`` would have refused it."""
        if self.redis is None or not self.listener_healthy or not self.breaker.allow():
            return False
        if self.local.get(key) is not None or self.announcements.pending(key.tag):
            return False
        if self._flights.running(key):
            return False
        try:
            raw, epoch = await self.breaker.call(self.redis.mget(key.key, key.epoch_key))
        except REDIS_ERRORS:
            return False
        if CacheEntry.valid(raw, epoch) is not None:
            return False
        # Again after the round trip: a request may have started its computation meanwhile.
        return (
            self.listener_healthy
            and not self.announcements.pending(key.tag)
            and not self._flights.running(key)
        )

    async def _fetch(
        self,
        key: CacheKey,
        ttl: float,
        compute: Compute,
        before_fill: Callable[[], None] | None = None,
    ) -> Outcome:
        started = time.perf_counter()
        trusted = self.redis is not None and self.listener_healthy
        if trusted and self.refresh_recent > 0:
            self._remember(key, ttl, compute)
        generation = self.local.generation
        local = self.local.get(key) if trusted else None
        if local is not None:
            return Outcome(local, CacheResult.HIT, cache_ms=(time.perf_counter() - started) * 1000)
        if trusted and self.announcements.pending(key.tag):
            # Told of a change that Redis may not know of yet: its entries may predate it.
            return await self._flights.run(key, lambda: self._compute(compute, ttl))
        # Consult the breaker only when Redis will really be called: a half-open breaker lets
        # one probe through, and that probe must reach Redis to close it again.
        if not (trusted and self.breaker.allow()):
            return await self._bypass(key, ttl, compute, trusted, started)
        try:
            raw, epoch = await self.breaker.call(self.redis.mget(key.key, key.epoch_key))  # type: ignore[union-attr]
        except REDIS_ERRORS:
            outcome = await self._flights.run(key, lambda: self._compute(compute, ttl))
            outcome.result = CacheResult.ERROR
            outcome.cache_ms = (time.perf_counter() - started) * 1000
            return outcome
        cache_ms = (time.perf_counter() - started) * 1000
        entry = CacheEntry.valid(raw, epoch)
        if entry is not None:
            now = self.clock()
            if entry.fresh_until > now:
                self.local.put(key, entry, generation)
                if self.refresh_recent > 0 and entry.fresh_until - now < ttl * REFRESH_AHEAD:
                    self._refresh_in_background(key, ttl, compute)  # ahead of its expiry
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

        if before_fill is not None and not self._flights.running(key):
            before_fill()
        outcome = await self._flights.run(key, fill)
        outcome.cache_ms += cache_ms
        return outcome

    async def _bypass(
        self, key: CacheKey, ttl: float, compute: Compute, trusted: bool, started: float
    ) -> Outcome:
        """Redis unusable or untrusted: compute; if the database is down too and the cache is
        only untrusted, serve what it still holds."""
        try:
            outcome = await self._flights.run(key, lambda: self._compute(compute, ttl))
        except self.unavailable:
            if trusted:
                raise  # Redis is unusable: nothing to fall back to
            kept = await self._last_known(key)
            if kept is None:
                raise
            return Outcome(kept, CacheResult.STALE, cache_ms=(time.perf_counter() - started) * 1000)
        outcome.result = CacheResult.BYPASS
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
                raw, epoch = await self.breaker.call(self.redis.mget(key.key, key.epoch_key))
            except REDIS_ERRORS:
                return None
            entry = CacheEntry.valid(raw, epoch)
        if entry is None:
            return None
        return CacheEntry(entry.body, entry.digest, min(entry.fresh_until, self.clock()))

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
            epoch, locked = await self.breaker.call(self._epoch_and_lock(key, token))
        except REDIS_ERRORS:
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
        assert self._scripts is not None
        return await self._scripts.begin(key, new_epoch(), token, int(self.lock_lease * 1000))

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
                raw, epoch, holder = await self.breaker.call(
                    redis.mget(key.key, key.epoch_key, key.lock_key)
                )
            except REDIS_ERRORS:
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
        assert self._scripts is not None
        lifetime_ms = int((ttl + self.stale_grace) * 1000)
        with self.tracer.start_as_current_span(
            "cache.set", attributes={attr.REPORT_NAME: key.report, attr.CACHE_OPERATION: "set"}
        ):
            try:
                stored = await self.breaker.call(
                    self._scripts.store(key, epoch, entry.encode(epoch), lifetime_ms)
                )
                if not stored:
                    logger.debug("not caching %s: invalidated while it was computed", key.report)
            except REDIS_ERRORS as error:
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
        assert self._scripts is not None
        with contextlib.suppress(*REDIS_ERRORS):  # the lease expires anyway
            await self.breaker.call(self._scripts.release(key, token))

    def _refresh_in_background(self, key: CacheKey, ttl: float, compute: Compute) -> None:
        if key.key in self._refreshing:
            return
        self._refreshing.add(key.key)

        async def refresh() -> None:
            try:
                token = secrets.token_hex(8)
                epoch, locked = await self.breaker.call(self._epoch_and_lock(key, token))
                if not locked:
                    return  # another process is refreshing it
                await self._compute_and_store(key, ttl, compute, epoch, token)
            except APIError as error:
                _skipped(key, "refresh", error)
            except Exception:
                logger.warning(
                    "background refresh of a %s report failed", key.report, exc_info=True
                )
            finally:
                self._refreshing.discard(key.key)

        task = asyncio.create_task(refresh())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- announced changes and invalidation (see invalidation.py) -----------------------

    @property
    def announced(self) -> int:
        return self.announcements.announced

    @property
    def applied(self) -> int:
        return self.announcements.applied

    def on_announce(self, hook: Callable[[set[int] | None], None]) -> None:
        """Call ``hook`` with the salon ids (None: all) of every announced change."""
        self.announcements.on_announce(hook)

    def announce(self, salon_ids: set[int] | None) -> None:
        """A change to these salons (None: to anything) is committed and folded: forget at once
        what this process holds of them (and of the platform-wide scope), and serve none of
        their Redis entries until ``apply_announced`` has invalidated them. Synchronous: the
        listener calls it as the notification comes off the socket."""
        tags = self.announcements.add(salon_ids)
        if tags is None:
            self.forget_local()
        else:
            for tag in tags:
                self._flights.detach(tag)
            self.local.drop_scopes(tags)
        self.announcements.tell(salon_ids)

    async def apply_announced(self) -> int:
        """Invalidate in Redis everything announced so far, in one round trip; returns the
        last announcement covered."""
        covered = self.announcements.announced
        invalidated: set[str] | None = set()
        if self.announcements.everything_pending:
            await self.clear_all()
            invalidated = None
        elif self.announcements.pending_tags and self.redis is not None:
            assert self._scripts is not None
            invalidated = set(self.announcements.pending_tags)
            await invalidate_scopes(
                self.redis,
                self._scripts,
                self.breaker,
                list(invalidated),
                self.reports,
                self.durability,
            )
        self.announcements.settle(covered)
        self._recompute_recent(invalidated)
        return covered

    def settle_invalidated(self, covered: int) -> None:
        """The fleet's invalidator has invalidated in Redis every change announced here up to
        ``covered``: settle them, and recompute what this process read of their scopes.
        Synchronous: the listener calls it as the invalidator's end marker arrives."""
        scopes = self.announcements.settling(covered)
        self.announcements.settle(covered)
        self._recompute_recent(scopes)

    # -- recompute instead of evict -----------------------------------------------------

    def _remember(self, key: CacheKey, ttl: float, compute: Compute) -> None:
        recent = self._recent
        recent[key.key] = (key, ttl, compute, self.clock())
        recent.move_to_end(key.key)
        if len(recent) > RECENT_KEYS:
            recent.popitem(last=False)

    def _recompute_recent(self, tags: set[str] | None) -> None:
        """Recompute, in the background, the keys of these scopes (None: every scope) read in
        the last ``refresh_recent`` seconds, now that their epochs are gone from Redis."""
        if self.refresh_recent <= 0 or tags == set():
            return
        since = self.clock() - self.refresh_recent
        while self._recent:  # forget what was not read recently (oldest first)
            oldest = next(iter(self._recent.values()))
            if oldest[3] >= since:
                break
            self._recent.popitem(last=False)
        for name, (key, ttl, compute, _) in list(self._recent.items()):
            if tags is None or key.tag in tags:
                # Forgotten until it is read again: a key is recomputed at most once per
                # read, however often its scope changes (each platform-wide key at every
                # write, else).
                del self._recent[name]
                task = asyncio.create_task(self._recompute(key, ttl, compute))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def _recompute(self, key: CacheKey, ttl: float, compute: Compute) -> None:
        """One key after an invalidation: in the single flight, under the lock, stored only
        under an epoch read before its query (see ``_recomputation``)."""
        try:
            async with self._refresh_slots:
                if (
                    self._flights.running(key)  # a request is computing it already
                    or not self.listener_healthy
                    or self.announcements.pending(key.tag)  # another change: its round follows
                    or not self.breaker.allow()
                ):
                    return
                await self._flights.run(key, lambda: self._recomputation(key, ttl, compute))
        except APIError as error:
            _skipped(key, "recomputation", error)
        except Exception:
            logger.warning("recomputing a %s report failed", key.report, exc_info=True)

    async def _recomputation(self, key: CacheKey, ttl: float, compute: Compute) -> Outcome:
        token = secrets.token_hex(8)
        epoch, locked = await self.breaker.call(self._epoch_and_lock(key, token))
        if not locked:
            # Another process computes it: most often its own recomputation after the same
            # change, whose store this process's invalidation may have refused. Wait for it;
            # if it leaves no valid entry, compute here (its epoch read again, after this
            # process's invalidation).
            waited = await self._wait_for_holder(key)
            if waited is not None:
                return waited
            epoch, locked = await self.breaker.call(self._epoch_and_lock(key, token))
        outcome = await self._compute_and_store(key, ttl, compute, epoch, token if locked else None)
        self.recomputations += 1
        return outcome

    def forget_local(self, tag: str | None = None, report: str | None = None) -> None:
        """Drop what this process holds of a scope (or of all): its local copies, and the
        computations in flight stop taking joiners."""
        self.local.drop(tag, report)
        self._flights.detach(tag, report)

    async def invalidate(self, salon_id: int | None, report: str | None = None) -> int:
        """Drop one scope's entries (all reports, or one); returns how many went."""
        tag = scope_tag(salon_id)
        self.forget_local(tag, report)
        if self.redis is None:
            return 0
        assert self._scripts is not None
        reports = self.reports if report is None else (report,)
        try:
            return await invalidate_scopes(
                self.redis, self._scripts, self.breaker, [tag], reports, self.durability
            )
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
        except REDIS_ERRORS as error:
            raise CacheUnavailable(self.breaker.cooldown) from error

    async def clear_all(self, report: str | None = None) -> int:
        """Delete every epoch (of one report, if given) and unlink every entry, by ``SCAN``.

        A computation that began before the clear read an epoch that existed when the clear
        began: ``SCAN`` returns every key present from its start to its end, so that epoch is
        deleted, or was replaced meanwhile; either way the computation cannot store.
        """
        covered = self.announcements.announced
        self.forget_local(None, report)
        deleted = 0
        if self.redis is not None:
            deleted = await unlink_everything(self.redis, self.breaker, report)
            # Again: a request may have copied an entry locally before its epoch went.
            self.forget_local(None, report)
        if report is None:
            self.announcements.settle(covered)
        return deleted

    async def background_done(self) -> None:
        """Wait for the background refreshes and recomputations running now (tests)."""
        while self._background:
            await asyncio.wait(set(self._background))

    async def close(self) -> None:
        """Let background refreshes finish (briefly), then abandon them."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=5)
        for task in list(self._background):
            task.cancel()
