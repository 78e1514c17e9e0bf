"""The cache's Lua scripts, each run atomically on the one slot of its scope.

- ``begin``: read the scope's epoch (creating it if there is none) and try to take an entry's
  single-flight lock, in one step: the epoch is read before the computation's query.
- ``store``: write an entry only if the epoch it was computed under is still current, and track
  its key in the scope's set.
- ``invalidate``: delete a scope's epochs (the invalidation) and unlink the tracked entries
  (which only frees their memory now).
- ``release``: drop a lock only if this computation still holds it.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from service.cache.keys import CacheKey

# KEYS[1] = the epoch, KEYS[2] = the lock; ARGV[1] = a new epoch for when there is none,
# ARGV[2] = the lock token, ARGV[3] = the lease (ms). Returns {epoch, 1 if locked}.
BEGIN = """
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
STORE = """
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
INVALIDATE = """
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

RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def scope_keys(slot: str, reports: tuple[str, ...]) -> list[str]:
    """The keys of ``INVALIDATE`` for one slot tag: its (epoch, tracked set) per report."""
    keys = []
    for report in reports:
        probe = CacheKey.of_scope(report, slot)
        keys += [probe.epoch_key, probe.tracked_key]
    return keys


class Scripts:
    """The scripts registered on one Redis client, called with typed arguments."""

    def __init__(self, redis: Redis) -> None:
        self._begin = redis.register_script(BEGIN)
        self._store = redis.register_script(STORE)
        self._invalidate = redis.register_script(INVALIDATE)
        self._release = redis.register_script(RELEASE)

    async def begin(
        self, key: CacheKey, new_epoch: str, token: str, lease_ms: int
    ) -> tuple[bytes, bool]:
        """The scope's epoch (``new_epoch`` if there was none) and whether the lock was taken."""
        epoch, locked = await self._begin(
            keys=[key.epoch_key, key.lock_key], args=[new_epoch, token, lease_ms]
        )
        return bytes(epoch), bool(locked)

    async def store(self, key: CacheKey, epoch: bytes, value: bytes, lifetime_ms: int) -> bool:
        """Store ``value`` if ``epoch`` is still the scope's; whether it was stored."""
        stored = await self._store(
            keys=[key.key, key.epoch_key, key.tracked_key], args=[epoch, value, lifetime_ms]
        )
        return bool(stored)

    async def invalidate(
        self, slot: str, reports: tuple[str, ...], pipe: Pipeline | None = None
    ) -> Any:
        """The invalidation of one slot tag's reports: queued on ``pipe`` (which then returns
        a count), or run at once (returns the count)."""
        return await self._invalidate(keys=scope_keys(slot, reports), client=pipe)

    async def release(self, key: CacheKey, token: str) -> None:
        await self._release(keys=[key.lock_key], args=[token])
