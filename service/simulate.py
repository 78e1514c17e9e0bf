"""``salon-reports simulate``: light, bounded traffic against the local service."""

from __future__ import annotations


def simulate(*, url: str, rps: float, writes_per_min: float, duration: float) -> str:
    raise NotImplementedError("being written")
