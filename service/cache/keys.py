"""Cache keys: the one place that says what goes into a key, and every other key the cache owns.

``sr:v2:{s:<salon>}:<report>:<role>:<digest>`` for one salon and
``sr:v2:{p:<i>:<n>}:<report>:<role>:<digest>`` for platform-wide reports. The digest covers the
normalised parameters (defaults filled in, keys sorted, dates canonical), so equivalent requests
share an entry; the salon (or platform) and the caller's role are in the key itself, so two
tenants or roles never do. The ``{…}`` hash tag keeps everything of one slot tag in one Redis
Cluster slot, which the Lua scripts and the ``MGET`` of an entry with its epoch rely on.

A salon's scope is one slot tag, ``{s:<salon>}``. The platform's scope (``{p}``, every
platform-wide entry, invalidated by every change) is spread over ``PLATFORM_SLOTS`` slot tags
``{p:0:…}`` … ``{p:11:…}``, one chosen per report and parameters (so per report and window): in one
slot its master served most of a cluster's commands (docs/performance.md, "Redis Cluster").
Each slot tag has its own epochs, so an invalidation stays atomic per slot, and a platform-wide
invalidation runs on every one of them (``slot_tags``).

Beside the entries, per slot tag and report: the epoch (``…:<report>:epoch``), the tracked set
of entry keys (``…:keys:<report>``); per entry, its single-flight lock (``<entry>:lock``).
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from typing import Any

import orjson
from redis.crc import key_slot

NAMESPACE = "sr:v2"
PLATFORM_TAG = "{p}"  # the platform's scope (announcements, the local tier), not a slot tag
PLATFORM_SLOTS = 12
CLUSTER_SLOTS = 16384


def _platform_slot_tag(index: int) -> str:
    """The ``index``-th platform slot tag, ``{p:<index>:<n>}``: the first ``n`` whose slot lies
    near the middle of the ``index``-th twelfth of the slot space. Evenly spaced slots land
    evenly on the masters of a cluster whose masters split the slots evenly (2, 3, 4, 6 or 12
    masters); tags hashed at random fell 10 of 16 on one master of three."""
    low, high = (
        index * CLUSTER_SLOTS // PLATFORM_SLOTS,
        (index + 1) * CLUSTER_SLOTS // PLATFORM_SLOTS,
    )
    middle = (low + high) // 2
    n = 0
    while abs(key_slot(f"{{p:{index}:{n}}}".encode()) - middle) >= (high - low) // 4:
        n += 1
    return f"{{p:{index}:{n}}}"


PLATFORM_SLOT_TAGS = tuple(_platform_slot_tag(index) for index in range(PLATFORM_SLOTS))
EVERY_KEY = f"{NAMESPACE}:*"  # the SCAN pattern of everything the cache owns


def scope_tag(salon_id: int | None) -> str:
    """The tag of a scope: one salon, or the platform (None)."""
    return PLATFORM_TAG if salon_id is None else f"{{s:{salon_id}}}"


def slot_tags(tag: str) -> tuple[str, ...]:
    """The hash tags in Redis of a scope: a salon's own, or every platform slot tag."""
    return PLATFORM_SLOT_TAGS if tag == PLATFORM_TAG else (tag,)


@dataclass(frozen=True, slots=True)
class CacheKey:
    report: str
    tag: str  # the scope: {s:<salon>} or {p}
    key: str
    slot: str = ""  # the hash tag in Redis: the salon's, or a platform slot tag (default: tag)

    @classmethod
    def of_scope(cls, report: str, slot: str) -> CacheKey:
        """A key naming only a slot tag and report: for its epoch and tracked set."""
        return cls(report, slot, "", slot)

    @property
    def hash_tag(self) -> str:
        return self.slot or self.tag

    @property
    def epoch_key(self) -> str:
        return f"{NAMESPACE}:{self.hash_tag}:{self.report}:epoch"

    @property
    def tracked_key(self) -> str:
        return f"{NAMESPACE}:{self.hash_tag}:keys:{self.report}"

    @property
    def lock_key(self) -> str:
        return f"{self.key}:lock"


def build_key(report: str, salon_id: int | None, role: str, params: dict[str, Any]) -> CacheKey:
    """The cache key of a report request; ``params`` must already be normalised."""
    canonical = orjson.dumps(params, option=orjson.OPT_SORT_KEYS)
    digest = hashlib.blake2b(canonical, digest_size=16).hexdigest()
    tag = scope_tag(salon_id)
    slot = tag
    if salon_id is None:  # spread over the platform's slot tags, by report and parameters
        slot = PLATFORM_SLOT_TAGS[zlib.crc32(f"{report}:{digest}".encode()) % PLATFORM_SLOTS]
    return CacheKey(report, tag, f"{NAMESPACE}:{slot}:{report}:{role}:{digest}", slot)


def is_entry(name: bytes) -> bool:
    """Whether a key found by ``SCAN`` is an entry (not an epoch, a tracked set or a lock)."""
    return not name.endswith((b":epoch", b":lock")) and b":keys:" not in name


def cleared_by(name: bytes, report: str | None) -> bool:
    """Whether a clear of ``report`` (None: of every report) removes the key ``name``."""
    if report is None:
        return True
    text = name.decode()
    return f":{report}:" in text or text.endswith(f":keys:{report}")
