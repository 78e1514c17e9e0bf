"""Cache keys: the one place that says what goes into a key, and every other key the cache owns.

``sr:v2:{s:<salon>}:<report>:<role>:<digest>`` for one salon and
``sr:v2:{p}:<report>:<role>:<digest>`` for platform-wide reports. The digest covers the
normalised parameters (defaults filled in, keys sorted, dates canonical), so equivalent requests
share an entry; the salon (or platform) and the caller's role are in the key itself, so two
tenants or roles never do. The ``{…}`` hash tag keeps everything of one scope in one Redis
Cluster slot, which the Lua scripts and the ``MGET`` of an entry with its epoch rely on.

Beside the entries, per scope and report: the epoch (``…:<report>:epoch``), the tracked set of
entry keys (``…:keys:<report>``); per entry, its single-flight lock (``<entry>:lock``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

NAMESPACE = "sr:v2"
PLATFORM_TAG = "{p}"
EVERY_KEY = f"{NAMESPACE}:*"  # the SCAN pattern of everything the cache owns


def scope_tag(salon_id: int | None) -> str:
    """The hash tag of a scope: one salon, or the platform (None)."""
    return PLATFORM_TAG if salon_id is None else f"{{s:{salon_id}}}"


@dataclass(frozen=True, slots=True)
class CacheKey:
    report: str
    tag: str  # the hash tag of the scope: {s:<salon>} or {p}
    key: str

    @classmethod
    def of_scope(cls, report: str, tag: str) -> CacheKey:
        """A key naming only a scope and report: for its epoch and tracked set."""
        return cls(report, tag, "")

    @property
    def epoch_key(self) -> str:
        return f"{NAMESPACE}:{self.tag}:{self.report}:epoch"

    @property
    def tracked_key(self) -> str:
        return f"{NAMESPACE}:{self.tag}:keys:{self.report}"

    @property
    def lock_key(self) -> str:
        return f"{self.key}:lock"


def build_key(report: str, salon_id: int | None, role: str, params: dict[str, Any]) -> CacheKey:
    """The cache key of a report request; ``params`` must already be normalised."""
    canonical = orjson.dumps(params, option=orjson.OPT_SORT_KEYS)
    digest = hashlib.blake2b(canonical, digest_size=16).hexdigest()
    tag = scope_tag(salon_id)
    return CacheKey(report, tag, f"{NAMESPACE}:{tag}:{report}:{role}:{digest}")


def is_entry(name: bytes) -> bool:
    """Whether a key found by ``SCAN`` is an entry (not an epoch, a tracked set or a lock)."""
    return not name.endswith((b":epoch", b":lock")) and b":keys:" not in name


def cleared_by(name: bytes, report: str | None) -> bool:
    """Whether a clear of ``report`` (None: of every report) removes the key ``name``."""
    if report is None:
        return True
    text = name.decode()
    return f":{report}:" in text or text.endswith(f":keys:{report}")
