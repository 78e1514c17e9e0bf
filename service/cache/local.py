"""The in-process tier: a bounded copy of fresh entries in each worker, in front of Redis."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

from service.cache.entry import CacheEntry
from service.cache.keys import CacheKey


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
