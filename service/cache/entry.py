"""A cached report: its bytes, their digest (the ETag), its freshness and the epoch it was
computed under, and how that is packed into one Redis value; and what a fetch served."""

from __future__ import annotations

import hashlib
import secrets
import struct
from dataclasses import dataclass, field
from enum import StrEnum

_HEADER = struct.Struct(">d16s16s")  # fresh-until (unix seconds), body digest, epoch
_EPOCH_BYTES = 8  # random bytes of an epoch token (16 hex digits)


def new_epoch() -> str:
    """A fresh epoch token, for a scope that has none."""
    return secrets.token_hex(_EPOCH_BYTES)


def body_digest(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=16).digest()


@dataclass(frozen=True, slots=True)
class CacheEntry:
    body: bytes
    digest: bytes
    fresh_until: float
    epoch: bytes = b""  # the epoch it was computed under (entries read from Redis)
    # Worked out once, when the entry is made: every response serving it carries it.
    etag: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "etag", f'"{self.digest.hex()}"')

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


SERVED_FROM_CACHE = frozenset({CacheResult.HIT, CacheResult.STALE})


@dataclass(slots=True)
class Outcome:
    """What a fetch served: the entry, how it was obtained and where the time went."""

    entry: CacheEntry
    result: CacheResult
    cache_ms: float = 0.0
    compute_ms: float = 0.0

    def copy(self) -> Outcome:
        return Outcome(self.entry, self.result, self.cache_ms, self.compute_ms)
