"""Several workers: their snapshots combined into one view, for ``render``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from telemetry.sketch import DEFAULT_RELATIVE_ACCURACY
from telemetry.stats.counts import Counts, count
from telemetry.stats.window import POOL_KEYS, SNAPSHOT_VERSION

STREAM_STATES = ("current", "uninitialised", "lost")  # from best to worst


def merge_snapshots(
    snapshots: Iterable[Mapping[str, Any]],
    *,
    partial: bool = False,
    expected_workers: int | None = None,
    recent_limit: int = 50,
) -> dict[str, Any]:
    """Combine worker snapshots into one view (JSON-serialisable), for ``render``.

    Counts and sketches add up; pool gauges are summed (per-worker values kept for the alert);
    memory is summed, per host and per worker. Of several snapshots of one worker only the
    newest counts (a worker's fresh snapshot and its own copy read back from Redis, say); a
    snapshot of another ``version`` is skipped. ``partial`` is true when asked, when a snapshot
    was skipped, or when fewer than ``expected_workers`` took part. ``ValueError`` on a
    malformed snapshot.
    """
    newest: dict[str, Mapping[str, Any]] = {}
    for snapshot in snapshots:
        if snapshot.get("version") != SNAPSHOT_VERSION:
            partial = True
            continue
        try:
            worker, taken = str(snapshot["worker"]), str(snapshot["taken_at"])
        except KeyError as error:
            raise ValueError(f"malformed stats snapshot: {error!r}") from error
        kept = newest.get(worker)
        if kept is None or taken > str(kept["taken_at"]):
            newest[worker] = snapshot

    since_start: Counts | None = None
    window: Counts | None = None
    workers: list[str] = []
    pools: list[dict[str, Any]] = []
    memories: list[dict[str, Any]] = []
    streams: list[dict[str, Any]] = []
    recent_slow: list[dict[str, Any]] = []
    recent_n_plus_one: list[dict[str, Any]] = []
    n_plus_one_total = 0
    window_seconds: float | None = None
    taken_at: str | None = None
    for worker, snapshot in newest.items():
        try:
            host = str(snapshot["host"])
            theirs_since = Counts.from_dict(snapshot["since_start"])
            theirs_window = Counts.from_dict(snapshot["last_window"])
            seconds = float(snapshot["window_seconds"])
            pool, memory = snapshot["pool"], snapshot["memory"]
            if pool is not None:
                pools.append({"worker": worker, **{key: pool.get(key, 0) for key in POOL_KEYS}})
            if memory is not None:
                memories.append(
                    {
                        "worker": worker,
                        "host": host,
                        "rss_bytes": memory.get("rss_bytes", 0),
                        "limit_bytes": memory.get("limit_bytes", 0),
                    }
                )
            stream = snapshot.get("change_stream")
            if stream is not None:
                streams.append({"worker": worker, **stream})
            recent_slow.extend(snapshot["recent_slow_queries"])
            recent_n_plus_one.extend(snapshot["n_plus_one"]["recent"])
            n_plus_one_total += count(snapshot["n_plus_one"]["total"])
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"malformed stats snapshot: {error!r}") from error
        if window_seconds is not None and seconds != window_seconds:
            raise ValueError("snapshots cover different windows; configure workers alike")
        window_seconds = seconds
        if since_start is None or window is None:
            since_start, window = theirs_since, theirs_window
        else:
            since_start.absorb(theirs_since)
            window.absorb(theirs_window)
        workers.append(worker)
        their_taken_at = str(snapshot["taken_at"])
        taken_at = their_taken_at if taken_at is None else max(taken_at, their_taken_at)
    if expected_workers is not None and len(workers) < expected_workers:
        partial = True
    empty = Counts(DEFAULT_RELATIVE_ACCURACY)
    recent_slow.sort(key=lambda entry: str(entry.get("timestamp", "")), reverse=True)
    recent_n_plus_one.sort(key=lambda entry: str(entry.get("timestamp", "")), reverse=True)
    return {
        "version": SNAPSHOT_VERSION,
        "workers": len(workers),
        "worker_ids": workers,
        "partial": partial,
        "taken_at": taken_at,
        "window_seconds": window_seconds if window_seconds is not None else 300.0,
        "since_start": (since_start or empty).to_dict(),
        "last_window": (window or empty).to_dict(),
        "pool": _merge_pools(pools),
        "memory": _merge_memory(memories),
        "change_stream": _merge_streams(streams),
        "recent_slow_queries": recent_slow[:recent_limit],
        "n_plus_one": {"total": n_plus_one_total, "recent": recent_n_plus_one[:recent_limit]},
    }


def _merge_pools(pools: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    if not pools:
        return None
    merged: dict[str, Any] = {key: sum(pool[key] for pool in pools) for key in POOL_KEYS}
    merged["workers"] = [dict(pool) for pool in pools]
    return merged


def _merge_streams(streams: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Every worker sees the same stream: the worst state and the largest figures count."""
    if not streams:
        return None

    def rank(stream: Mapping[str, Any]) -> int:
        state = stream.get("state")
        return STREAM_STATES.index(state) if state in STREAM_STATES else len(STREAM_STATES)

    worst = max(streams, key=rank)
    return {
        "state": worst.get("state"),
        "reason": worst.get("reason"),
        "backlog_bytes": max((s.get("backlog_bytes") or 0) for s in streams),
        "retained_wal_bytes": max((s.get("retained_wal_bytes") or 0) for s in streams),
        "consumers": sum(1 for s in streams if s.get("consumer")),
        "workers": [dict(stream) for stream in streams],
    }


def _merge_memory(memories: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    if not memories:
        return None
    hosts: dict[str, dict[str, Any]] = {}
    for memory in memories:
        host = hosts.setdefault(memory["host"], {"host": memory["host"], "rss_bytes": 0})
        host["rss_bytes"] += memory["rss_bytes"]
        # Workers on one host share its limit (cgroup or physical memory): not summed.
        host["limit_bytes"] = max(host.get("limit_bytes", 0), memory["limit_bytes"])
    return {
        "rss_bytes": sum(memory["rss_bytes"] for memory in memories),
        "limit_bytes": sum(host["limit_bytes"] for host in hosts.values()),
        "hosts": sorted(hosts.values(), key=lambda host: str(host["host"])),
        "workers": [dict(memory) for memory in memories],
    }
