"""Single flight in one process: concurrent misses of one key share one computation.

The first request for a key runs the computation; the others await its outcome (a future).
A computation can be detached: it finishes for those already waiting, but takes no more
joiners, because it may predate a change announced since (or an admin clear, or a listener
that lost its connection).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from service.cache.entry import Outcome
from service.cache.keys import CacheKey


@dataclass(slots=True)
class _Flight:
    """A computation in this process that requests for ``key`` may join."""

    key: CacheKey
    future: asyncio.Future[Outcome]


class SingleFlight:
    def __init__(self) -> None:
        self._inflight: dict[str, _Flight] = {}

    async def run(self, key: CacheKey, make: Callable[[], Awaitable[Outcome]]) -> Outcome:
        """One computation per key in this process; the others await its outcome."""
        name = key.key
        pending = self._inflight.get(name)
        if pending is not None:
            shared = await asyncio.shield(pending.future)
            return shared.copy()
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
        return outcome.copy()

    def running(self, key: CacheKey) -> bool:
        """Whether a computation of ``key`` that takes joiners is in flight here."""
        return key.key in self._inflight

    def detach(self, tag: str | None, report: str | None = None) -> None:
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
