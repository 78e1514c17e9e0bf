"""Recovery conflicts on the streaming replica, under load: how many, how they were answered.

Reports read the replica (``REPORTS_READ_DATABASE_URL``); a query whose snapshot holds back the
replay of a change the primary made (rows removed by ``VACUUM``, a lock) is cancelled by the
replica after ``max_standby_streaming_delay`` ("canceling statement due to conflict with
recovery"), and the service retries it once on the primary (``service/reports/replica.py``).
This puts that path under load:

- a database of its own on the primary (``salon_reports_conflicts``: migrated, seeded, dropped
  with its replication slot at the end), replayed by the replica of ``REPLICA_DATABASE_URL``
  (``make services REPLICA=1``);
- on the replica, for the run: ``max_standby_streaming_delay`` small (``--delay-ms``, default
  50) and ``hot_standby_feedback = off`` (``ALTER SYSTEM``, reset afterwards), so the primary's
  ``VACUUM`` removes rows the replica's queries may still see;
- ``salon-reports serve --workers 2`` with no Redis (no cache: every request is computed, on
  the replica when it has caught up);
- ``--clients`` threads asking for reports (every report, platform-wide and per salon, random
  windows) for ``--seconds``, while a writer updates a few thousand bookings and ``VACUUM``s
  the table, again and again.

It prints the requests by status and error code, the conflicts the replica counted
(``pg_stat_database_conflicts``, by kind), the retries on the primary (the service's log line
for each: a conflict recognised by its words or SQLSTATE, or the replica connection lost under
a statement, which is how a session ended for a conflict often arrives) and any 500 or
traceback in the server's log. A ``503 derived_data_unavailable`` is the change stream falling
behind the writer (reports wait for it, docs/api.md), not a conflict.

    .venv/bin/python -m benchmarks.replica_conflicts --seconds 30 --clients 8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import tempfile
import threading
import time
from collections import Counter
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import psycopg
from dotenv import dotenv_values

from benchmarks.load import Server, http_get
from service.auth import issue_token
from service.config import get_settings
from service.db import drop_database, libpq_url, migrate, with_database
from service.tools.seed import seed_database

DATABASE = "salon_reports_conflicts"
PREFIX = "/api/v1/optimized-reports"
REPORTS = ("dashboard", "bookings", "professionals")
RETRY_LINE = "gave way to the replica's replay"  # a conflict, retried on the primary
LOST_LINE = "lost its replica connection"  # a session ended under a statement, retried too
CONFLICT_KINDS = ("tablespace", "lock", "snapshot", "bufferpin", "deadlock")


def _replica_url() -> str:
    url = os.environ.get("REPLICA_DATABASE_URL") or dotenv_values(".env").get(
        "REPLICA_DATABASE_URL"
    )
    if not url:
        raise SystemExit("no REPLICA_DATABASE_URL: start one with `make services REPLICA=1`")
    return url


def _conflicts(replica_dsn: str) -> Counter[str]:
    with psycopg.connect(replica_dsn, autocommit=True) as connection:
        row = connection.execute(
            "SELECT "
            + ", ".join(f"confl_{kind}" for kind in CONFLICT_KINDS)
            + " FROM pg_stat_database_conflicts WHERE datname = %s",
            (DATABASE,),
        ).fetchone()
    return Counter(dict(zip(CONFLICT_KINDS, row or (0,) * len(CONFLICT_KINDS), strict=True)))


def _set_replica(replica_dsn: str, delay_ms: int | None) -> None:
    """Small delay and no feedback for the run (None: back to the configuration file's)."""
    with psycopg.connect(replica_dsn, autocommit=True) as connection:
        if delay_ms is None:
            connection.execute("ALTER SYSTEM RESET max_standby_streaming_delay")
            connection.execute("ALTER SYSTEM RESET hot_standby_feedback")
        else:
            connection.execute(f"ALTER SYSTEM SET max_standby_streaming_delay = '{delay_ms}ms'")
            connection.execute("ALTER SYSTEM SET hot_standby_feedback = off")
        connection.execute("SELECT pg_reload_conf()")


def _wait_replayed(replica_dsn: str, bookings: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(psycopg.Error), psycopg.connect(replica_dsn) as connection:
            row = connection.execute("SELECT count(*) FROM bookings").fetchone()
            if row is not None and row[0] >= bookings:
                return
        time.sleep(0.5)
    raise SystemExit("the replica did not replay the seeded database")


class Writer(threading.Thread):
    """Update a few thousand bookings, ``VACUUM`` the table, again until stopped."""

    def __init__(self, dsn: str, rows: int, seed: int) -> None:
        super().__init__(name="writer", daemon=True)
        self.dsn, self.rows, self.rng = dsn, rows, random.Random(seed)
        self.stop = threading.Event()
        self.rounds = 0
        self.updated = 0

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as connection:
            row = connection.execute("SELECT min(id), max(id) FROM bookings").fetchone()
            assert row is not None
            low, high = row
            while not self.stop.is_set():
                start = self.rng.randint(low, max(low, high - self.rows))
                cursor = connection.execute(
                    "UPDATE bookings SET price_cents = price_cents + 1 WHERE id BETWEEN %s AND %s",
                    (start, start + self.rows - 1),
                )
                self.updated += cursor.rowcount
                connection.execute("VACUUM bookings")
                self.rounds += 1
                self.stop.wait(0.2)


def _client(
    server: Server,
    tokens: dict[str, str],
    salons: list[int],
    today: date,
    until: float,
    seed: int,
    statuses: Counter[int],
    codes: Counter[str],
    lock: threading.Lock,
) -> None:
    rng = random.Random(seed)
    while time.monotonic() < until:
        report = rng.choice(REPORTS)
        salon = None if rng.random() < 0.3 else rng.choice(salons)
        end = today - timedelta(days=rng.randrange(30))
        start = end - timedelta(days=rng.choice((7, 30, 90, 180)))
        query = f"start={start.isoformat()}&end={end.isoformat()}"
        if salon is not None:
            query += f"&salon_id={salon}"
        code = ""
        try:
            status, body = http_get(f"{server.base}{PREFIX}/{report}?{query}", tokens["admin"], 30)
            if status != 200:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    code = f"{status} {json.loads(body)['error']['code']}"
        except OSError:
            status = 0  # no answer
        with lock:
            statuses[status] += 1
            if code:
                codes[code] += 1


def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = get_settings()
    admin_dsn = libpq_url(with_database(settings.database_url, "postgres"))
    primary_url = with_database(settings.database_url, DATABASE)
    replica_url = with_database(_replica_url(), DATABASE)
    replica_dsn = libpq_url(replica_url)
    drop_database(admin_dsn, DATABASE)
    with psycopg.connect(admin_dsn, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{DATABASE}"')
    workdir = Path(tempfile.mkdtemp(prefix="salon-reports-conflicts-"))
    server = None
    try:
        migrate(primary_url)
        seed_database(primary_url, bookings=args.bookings, salons=20, days=200, seed=5)
        with psycopg.connect(libpq_url(primary_url)) as connection:
            salons = [row[0] for row in connection.execute("SELECT id FROM salons ORDER BY id")]
            row = connection.execute("SELECT max(scheduled_at)::date FROM bookings").fetchone()
            today = row[0] if row and row[0] else date.today()
        _wait_replayed(replica_dsn, args.bookings)
        _set_replica(replica_dsn, args.delay_ms)
        secret = settings.jwt_secret
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("OTEL_", "REPORTS_", "DATABASE_URL", "REDIS_URL"))
        }
        env.update(
            {
                "DATABASE_URL": primary_url,
                "REPORTS_READ_DATABASE_URL": replica_url,
                "REDIS_URL": "",
                "REPORTS_JWT_SECRET": secret,
                "REPORTS_ENVIRONMENT": "test",
                "OTEL_SDK_DISABLED": "true",
                "PYTHONUNBUFFERED": "1",
            }
        )
        server = Server("conflicts", env, args.workers, workdir / "server.log")
        server.start()
        tokens = {"admin": issue_token(secret, role="admin")}
        before = _conflicts(replica_dsn)
        writer = Writer(libpq_url(primary_url), args.rows, seed=7)
        writer.start()
        statuses: Counter[int] = Counter()
        codes: Counter[str] = Counter()
        lock = threading.Lock()
        until = time.monotonic() + args.seconds
        clients = [
            threading.Thread(
                target=_client,
                args=(server, tokens, salons, today, until, seed, statuses, codes, lock),
            )
            for seed in range(args.clients)
        ]
        for client in clients:
            client.start()
        for client in clients:
            client.join()
        writer.stop.set()
        writer.join(30)
        server.stop()
        after = _conflicts(replica_dsn)
        log = (workdir / "server.log").read_text(errors="replace")
        conflicts = {kind: after[kind] - before[kind] for kind in CONFLICT_KINDS}
        return {
            "seconds": args.seconds,
            "clients": args.clients,
            "bookings": args.bookings,
            "max_standby_streaming_delay_ms": args.delay_ms,
            "writer": {"rounds": writer.rounds, "rows_updated": writer.updated},
            "requests": sum(statuses.values()),
            "statuses": {str(status): count for status, count in sorted(statuses.items())},
            "error_codes": dict(codes),
            "conflict_log_lines": [
                line[:300] for line in log.splitlines() if "conflict with recovery" in line
            ][:10],
            "replica_conflicts": conflicts,
            "replica_conflicts_total": sum(conflicts.values()),
            "retried_on_primary": log.count(RETRY_LINE) + log.count(LOST_LINE),
            "retried_on_primary_conflict_seen": log.count(RETRY_LINE),
            "retried_on_primary_connection_lost": log.count(LOST_LINE),
            "answered_503": statuses.get(503, 0),
            "answered_503_database_unavailable": codes.get("503 database_unavailable", 0),
            "answered_500": statuses.get(500, 0),
            "tracebacks_in_log": log.count("Traceback"),
        }
    finally:
        if server is not None:
            server.stop()
        with contextlib.suppress(psycopg.Error):
            _set_replica(replica_dsn, None)
        drop_database(admin_dsn, DATABASE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--bookings", type=int, default=200_000)
    parser.add_argument("--rows", type=int, default=2000, help="bookings updated per round")
    parser.add_argument("--delay-ms", type=int, default=50)
    args = parser.parse_args()
    print(json.dumps(run(args), indent=2))


if __name__ == "__main__":
    main()
