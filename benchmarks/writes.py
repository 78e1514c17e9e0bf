"""Write-path benchmark (``make bench``): booking writes with the service's machinery vs bare.

The booking app writes ``bookings``; this service only reads them. Its machinery on that write
path is the change stream (``service.changes``): ``REPLICA IDENTITY FULL`` on ``bookings``, a
logical replication slot decoded by wal2json in a walsender, and the consumer that folds the
decoded changes into the derived tables in its own transactions. This benchmark measures what
that costs the writers, with pgbench, and how far behind the derived tables run.

Set-up, in a dedicated database ``salon_reports_writes`` on the ``DATABASE_URL`` server,
dropped and created afresh on every run: migrated (``service.db.migrate``), seeded
(``seed_database``: 20,000 bookings over 5 salons and 365 days), ``rebuild`` (derived tables
and slot). Then ``bookings_bare``, a twin of ``bookings``: ``CREATE TABLE ... (LIKE bookings
INCLUDING ALL)`` (columns, defaults, identity, CHECK constraints, every index, the covering ones
included), the same foreign keys, the default replica identity, no trigger, the same rows.
Small read-only helper tables (``bench_staff``, ``bench_clients``, ``bench_pros``) give
consistent random (salon, professional, service, price) tuples and clients to both variants.

Two transaction mixes, as pgbench scripts identical but for the table name:

- ``insert+update``: INSERT a booking (random professional and service of one salon, random
  client, ``scheduled_at`` random within the last year), then UPDATE its status; one
  transaction.
- ``mixed``: copy a random booking (rebooked 1-60 days later), then one of: move another
  random booking by up to ±30 days, re-assign it to another professional of its salon, cancel
  it, complete it, delete it (equally likely); 10 % of the transactions roll back. Each
  transaction changes at most one existing row, so the workload cannot deadlock by itself.

Rounds (``--rounds``, 3) x mixes x writers (1 and 8) x {machinery, bare}, ``--seconds`` (8)
each, interleaved: each (mix, writers) pair runs machinery and bare back to back, the order
alternating, so drift and the other load on the machine fall on both alike.

- **machinery**: pgbench against ``bookings`` while the service's ``ChangeConsumer`` runs in
  this process (a thread with its own event loop), as in ``salon-reports follow``. Before
  pgbench starts, the consumer has caught up (``wait_applied``); after it ends, the time to
  apply the rest (``wait_applied``) is the drain, then ``service.changes.verify.verify``
  compares every derived table with a recomputation from ``bookings``: any difference fails
  the benchmark. Freshness lag = commit → applied per transaction, from ``Batch.lags`` of the
  consumer's ``on_batch`` (the database's clock on both ends), for every transaction of the
  run including the drain.
- **bare**: pgbench against ``bookings_bare`` with the consumer stopped: nothing of the
  service runs. (The slot still exists, idle; ``wal_level = logical`` is the cluster's setting
  in both cases.)

pgbench: ``-n -M prepared -c N -j N -T seconds --failures-detailed --log``. Throughput is
pgbench's ``tps`` (successful transactions, without connection time). Latencies are from the
per-transaction log (every transaction, all clients; p50/p95/p99 by linear interpolation);
rolled-back transactions of the mixed mix count as transactions (they are the app's).
Failed transactions are pgbench's (serialization and deadlock failures, ``--max-tries 1``);
pgbench aborts a client on any other error, which also counts as a failure and is reported.
The CPU the machinery used during each run is read from ``/proc`` (this process, i.e. the
consumer; the consumer's backend; the walsender). "Folded during run" is the share of the
run's transactions the consumer had applied before pgbench ended: a consumer that defers its
work until the writers stop costs them less while they run, so the throughput ratio is only
meaningful next to it. The lag and the drain depend on ``--seconds`` whenever the consumer
falls behind.

The tables grow during the run (both mixes insert), by about the same amount on both sides;
their sizes at the end are in the results. At the end the slot is dropped (an idle slot would
retain WAL); the database stays, for a look, until the next run replaces it. Results: a table,
the verdicts on the targets, and JSON in ``benchmarks/results/writes-*.json``.

    python -m benchmarks.writes [--seconds 8] [--rounds 3] [--writers 1,8]
    python -m benchmarks.writes --markdown      # docs/performance.md tables from the latest results
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import re
import resource
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from rich.console import Console
from rich.table import Table

from benchmarks.stats import RESULTS_DIR, machine, percentile, write_results
from service.changes.batch import Batch
from service.changes.consumer import ChangeConsumer, wait_applied
from service.changes.rebuild import rebuild
from service.changes.verify import verify
from service.config import get_settings
from service.db import libpq_url, migrate, with_database
from service.tools.seed import seed_database

WRITES_DATABASE = "salon_reports_writes"
MAINTENANCE_DATABASE = "postgres"
TABLE = "bookings"
BARE = "bookings_bare"
MIXES = ("insert+update", "mixed")
MODES = ("machinery", "bare")
TARGET_RATIO = 0.80
TARGET_LAG_P99_S = 1.0
LAG_WRITERS = 8  # the freshness target is under 8 writers

T = TypeVar("T")


DEFAULT_BOOKINGS = 20_000


@dataclass(frozen=True, slots=True)
class Params:
    bookings: int = DEFAULT_BOOKINGS
    salons: int = 5
    days: int = 365
    seed: int = 42


# -- pgbench scripts ----------------------------------------------------------------------------

_NEXT = "(SELECT id FROM {t} WHERE id >= :dst ORDER BY id LIMIT 1)"

INSERT_UPDATE = """\
\\set staff random(1, :staff_rows)
\\set client random(1, :client_rows)
\\set ago random(0, 31535999)
\\set st random(1, 4)
BEGIN;
INSERT INTO {t} (salon_id, client_id, professional_id, service_id, scheduled_at, status,
                 price_cents)
SELECT s.salon_id, c.client_id, s.professional_id, s.service_id,
       now() - make_interval(secs => :ago), 'pending', s.price_cents
FROM bench_staff s, bench_clients c WHERE s.k = :staff AND c.k = :client
RETURNING id AS booking_id \\gset
UPDATE {t} SET status = (ARRAY['confirmed', 'completed', 'cancelled', 'no_show'])[:st],
    completed_at = CASE WHEN :st = 2 THEN now() END,
    cancelled_at = CASE WHEN :st = 3 THEN now() END,
    updated_at = now()
WHERE id = :booking_id;
COMMIT;
"""

MIXED = f"""\
\\set src random(1, :max_id)
\\set dst random(1, :max_id)
\\set later random(1, 60)
\\set op random(1, 5)
\\set shift random(-43200, 43200)
\\set pick random(0, 999999)
\\set rollback random(1, 10)
BEGIN;
INSERT INTO {{t}} (salon_id, client_id, professional_id, service_id, scheduled_at, status,
                 price_cents)
SELECT salon_id, client_id, professional_id, service_id,
       scheduled_at + make_interval(days => :later), 'pending', price_cents
FROM {{t}} WHERE id >= :src ORDER BY id LIMIT 1;
\\if :op = 1
UPDATE {{t}} SET scheduled_at = scheduled_at + make_interval(mins => :shift), updated_at = now()
WHERE id = {_NEXT};
\\elif :op = 2
UPDATE {{t}} b SET professional_id = p.professional_id, updated_at = now()
FROM bench_pros p
WHERE b.id = {_NEXT} AND p.salon_id = b.salon_id AND p.k = :pick % p.n;
\\elif :op = 3
UPDATE {{t}} SET status = 'cancelled', cancelled_at = now(), updated_at = now()
WHERE id = {_NEXT};
\\elif :op = 4
UPDATE {{t}} SET status = 'completed', completed_at = now(), updated_at = now()
WHERE id = {_NEXT};
\\else
DELETE FROM {{t}} WHERE id = {_NEXT};
\\endif
\\if :rollback = 1
ROLLBACK;
\\else
COMMIT;
\\endif
"""

SCRIPTS = {"insert+update": INSERT_UPDATE, "mixed": MIXED}


def write_scripts(directory: Path) -> dict[tuple[str, str], Path]:
    """One file per (mix, table); the scripts differ only in the table name."""
    paths: dict[tuple[str, str], Path] = {}
    for mix, template in SCRIPTS.items():
        for table in (TABLE, BARE):
            path = directory / f"{mix.replace('+', '-')}-{table}.sql"
            path.write_text(template.replace("{t}", table))
            paths[(mix, table)] = path
    return paths


# -- the database ---------------------------------------------------------------------------------


def pgbench_path() -> str:
    """pgbench of the newest server version installed (as scripts/services.sh finds initdb)."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pgbench"),
        key=lambda p: [int(x) for x in re.findall(r"\d+", p)],
        reverse=True,
    )
    found = next((p for p in candidates if os.access(p, os.X_OK)), None) or shutil.which("pgbench")
    if found is None:
        raise SystemExit("pgbench not found: install the postgresql package (it ships pgbench)")
    return found


def _drop_slots(admin: psycopg.Connection[Any]) -> None:
    rows = admin.execute(
        "SELECT slot_name, active_pid FROM pg_replication_slots WHERE database = %s",
        (WRITES_DATABASE,),
    ).fetchall()
    for slot, pid in rows:
        if pid is not None:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            time.sleep(0.5)
        admin.execute("SELECT pg_drop_replication_slot(%s)", (slot,))


def drop_slots(server_url: str) -> None:
    """Drop the benchmark database's slot: left idle, it would retain WAL on the server."""
    with psycopg.connect(libpq_url(server_url), autocommit=True) as admin:
        _drop_slots(admin)


def recreate_database(server_url: str) -> None:
    """Drop the benchmark database (and its slot, which would block the drop), create it."""
    with psycopg.connect(libpq_url(server_url), autocommit=True) as admin:
        _drop_slots(admin)
        name = sql.Identifier(WRITES_DATABASE)
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(name))


TWIN = f"""
    CREATE TABLE {BARE} (LIKE {TABLE} INCLUDING ALL);
    INSERT INTO {BARE} SELECT * FROM {TABLE} ORDER BY id;
    SELECT setval(pg_get_serial_sequence('{BARE}', 'id'), (SELECT max(id) FROM {BARE}));
"""

HELPERS = """
    CREATE TABLE bench_staff AS
        SELECT row_number() OVER (ORDER BY p.id, s.id)::int AS k, p.salon_id,
               p.id AS professional_id, s.id AS service_id, s.price_cents
        FROM professionals p JOIN services s ON s.salon_id = p.salon_id;
    ALTER TABLE bench_staff ADD PRIMARY KEY (k);
    CREATE TABLE bench_clients AS
        SELECT row_number() OVER (ORDER BY id)::int AS k, id AS client_id
        FROM users WHERE role = 'client';
    ALTER TABLE bench_clients ADD PRIMARY KEY (k);
    CREATE TABLE bench_pros AS
        SELECT salon_id, (row_number() OVER (PARTITION BY salon_id ORDER BY id) - 1)::int AS k,
               id AS professional_id, (count(*) OVER (PARTITION BY salon_id))::int AS n
        FROM professionals;
    ALTER TABLE bench_pros ADD PRIMARY KEY (salon_id, k);
"""

_SHAPE = """
    SELECT
        (SELECT array_agg(pg_get_indexdef(indexrelid) ORDER BY 1) FROM pg_index
         WHERE indrelid = %(t)s::regclass),
        (SELECT array_agg(pg_get_constraintdef(oid) ORDER BY 1) FROM pg_constraint
         WHERE conrelid = %(t)s::regclass AND contype IN ('c', 'f')),
        (SELECT relreplident FROM pg_class WHERE oid = %(t)s::regclass),
        (SELECT count(*) FROM pg_trigger WHERE tgrelid = %(t)s::regclass AND NOT tgisinternal),
        (SELECT count(*) FROM pg_attribute WHERE attrelid = %(t)s::regclass AND attnum > 0
         AND NOT attisdropped)
"""


def create_twin(dsn: str) -> dict[str, Any]:
    """``bookings_bare`` and the helper tables; what the two tables have, for the record."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(TWIN)
        foreign_keys = connection.execute(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE conrelid = %s::regclass AND contype = 'f' ORDER BY conname",
            (TABLE,),
        ).fetchall()
        for name, definition in foreign_keys:
            connection.execute(
                sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                    sql.Identifier(BARE),
                    sql.Identifier(str(name).replace(TABLE, BARE, 1)),
                    sql.SQL(definition),
                )
            )
        connection.execute(HELPERS)
        connection.execute(
            f"VACUUM ANALYZE {TABLE}, {BARE}, bench_staff, bench_clients, bench_pros"
        )
        shapes: dict[str, dict[str, Any]] = {}
        for table in (TABLE, BARE):
            row = connection.execute(_SHAPE, {"t": table}).fetchone()
            assert row is not None
            indexes, constraints, identity, triggers, columns = row
            shapes[table] = {
                # index definitions without their names, to compare
                "indexes": sorted(
                    re.sub(r"^CREATE (UNIQUE )?INDEX \S+ ON \S+", "", d) for d in indexes
                ),
                "constraints": sorted(constraints),
                "replica_identity": {"d": "default", "f": "full"}.get(identity, identity),
                "triggers": int(triggers),
                "columns": int(columns),
            }
        same = all(
            shapes[TABLE][key] == shapes[BARE][key] for key in ("indexes", "constraints", "columns")
        )
        if not same:
            raise RuntimeError(f"{BARE} is not a twin of {TABLE}: {json.dumps(shapes, indent=2)}")
        return {
            "indexes": len(shapes[TABLE]["indexes"]),
            "check_and_foreign_keys": len(shapes[TABLE]["constraints"]),
            "columns": shapes[TABLE]["columns"],
            "replica_identity": {t: shapes[t]["replica_identity"] for t in (TABLE, BARE)},
            "user_triggers": {t: shapes[t]["triggers"] for t in (TABLE, BARE)},
        }


def _scalar(dsn: str, query: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as connection:
        row = connection.execute(query).fetchone()
    return 0 if row is None or row[0] is None else int(row[0])


def _defines(dsn: str, table: str) -> dict[str, int]:
    """pgbench ``-D`` variables (the id range changes as the tables grow)."""
    return {
        "max_id": _scalar(dsn, f"SELECT max(id) FROM {table}"),
        "staff_rows": _scalar(dsn, "SELECT count(*) FROM bench_staff"),
        "client_rows": _scalar(dsn, "SELECT count(*) FROM bench_clients"),
    }


# -- the consumer, in a thread ------------------------------------------------------------------


class ConsumerThread:
    """The service's ``ChangeConsumer`` on its own event loop in a thread; collects lags."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="consumer", daemon=True)
        self.thread.start()
        self.consumer: ChangeConsumer | None = None
        self.lags: list[float] = []
        self.transactions = 0
        self.batches = 0
        self.rows_max = 0
        self.age_max = 0.0
        self._lock = threading.Lock()

    def _call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def _on_batch(self, batch: Batch) -> None:
        # age: from the batch's first change received to folded and committed
        age = time.monotonic() - batch.started if batch.started else 0.0
        with self._lock:
            self.lags.extend(batch.lags)
            self.transactions += batch.transactions
            self.batches += 1
            self.rows_max = max(self.rows_max, batch.versions)
            self.age_max = max(self.age_max, age)

    def reset(self) -> None:
        with self._lock:
            self.lags, self.transactions, self.batches = [], 0, 0
            self.rows_max, self.age_max = 0, 0.0

    def collected(self) -> tuple[list[float], int, int]:
        with self._lock:
            return list(self.lags), self.transactions, self.batches

    async def _start(self) -> None:
        self.consumer = ChangeConsumer(self.dsn, on_batch=self._on_batch, election_interval=0.2)
        self.consumer.start()
        await asyncio.wait_for(self.consumer.leading.wait(), 30)

    async def _stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
            self.consumer = None

    def start(self) -> None:
        self._call(self._start())

    def stop(self) -> None:
        self._call(self._stop())

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_of(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime


def _machinery_backends(dsn: str) -> dict[str, int]:
    """The consumer's backend and its walsender, by process id (the oldest of each name: a
    ``wait_applied`` that just ended may still be listed)."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        rows = connection.execute(
            "SELECT application_name, pid FROM pg_stat_activity"
            " WHERE application_name IN ('salon-reports-consumer', 'salon-reports-stream')"
            " AND datname = current_database() ORDER BY backend_start DESC"
        ).fetchall()
    names = {"salon-reports-consumer": "consumer_backend", "salon-reports-stream": "walsender"}
    return {names[name]: int(pid) for name, pid in rows}


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- pgbench ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Run:
    round: int
    mix: str
    writers: int
    mode: str
    seconds: int
    exit_code: int = 0
    tps: float = 0.0
    transactions: int = 0
    failed: int = 0
    serialization_failures: int = 0
    deadlock_failures: int = 0
    aborted_clients: int = 0
    errors: list[str] = field(default_factory=list)
    latency_avg_ms: float | None = None
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    latency_p99_ms: float | None = None
    logged: int = 0
    # machinery only
    catch_up_s: float | None = None
    drain_s: float | None = None
    lag_n: int = 0
    lag_p50_s: float | None = None
    lag_p99_s: float | None = None
    lag_max_s: float | None = None
    folded_transactions: int = 0
    folded_during_run: int = 0  # of them, folded before pgbench ended
    batches: int = 0
    batch_rows_max: int = 0
    batch_age_max_s: float | None = None
    load_average: list[float] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)
    verify_s: float | None = None
    backends_changed: bool = False  # the consumer reconnected during the run (CPU incomplete)
    verify_differences: int | None = None
    verify_sample: list[str] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return self.failed + self.aborted_clients


def _number(pattern: str, text: str) -> float | None:
    match = re.search(pattern, text)
    return float(match.group(1)) if match else None


def parse_pgbench(run: Run, stdout: str, stderr: str) -> None:
    run.tps = _number(r"tps = ([\d.]+) \(without initial connection time\)", stdout) or 0.0
    run.transactions = int(_number(r"actually processed: (\d+)", stdout) or 0)
    run.failed = int(_number(r"number of failed transactions: (\d+)", stdout) or 0)
    run.serialization_failures = int(
        _number(r"number of serialization failures: (\d+)", stdout) or 0
    )
    run.deadlock_failures = int(_number(r"number of deadlock failures: (\d+)", stdout) or 0)
    run.latency_avg_ms = _number(r"latency average = ([\d.]+) ms", stdout)
    aborted = set(re.findall(r"client (\d+) (?:script \d+ )?aborted", stderr))
    run.aborted_clients = len(aborted)
    run.errors = [line for line in stderr.splitlines() if "error" in line.lower()][:5]


def parse_log(run: Run, directory: Path, prefix: str) -> None:
    """Per-transaction log: ``client tx time script epoch us [...]``; ``time`` is µs, or the
    kind of failure (``failed``, ``serialization``, ``deadlock``)."""
    latencies: list[float] = []
    failures = 0
    for path in directory.glob(f"{prefix}.*"):
        with path.open() as log:
            for line in log:
                parts = line.split()
                if len(parts) < 3:
                    continue
                if parts[2].isdigit():
                    latencies.append(int(parts[2]) / 1000.0)
                else:
                    failures += 1
        path.unlink()
    run.logged = len(latencies)
    if latencies:
        run.latency_p50_ms = round(percentile(latencies, 0.50), 3)
        run.latency_p95_ms = round(percentile(latencies, 0.95), 3)
        run.latency_p99_ms = round(percentile(latencies, 0.99), 3)
    run.failed = max(run.failed, failures)


def run_pgbench(
    pgbench: str,
    dsn: str,
    script: Path,
    run: Run,
    defines: dict[str, int],
    directory: Path,
    on_exit: Callable[[], None] | None = None,
) -> float:
    """Run pgbench; the ``perf_counter`` time it ended (``on_exit`` is called then)."""
    prefix = f"log-{run.round}-{run.mix.replace('+', '-')}-{run.writers}-{run.mode}"
    command = [
        pgbench,
        "-n",
        "-M",
        "prepared",
        "-c",
        str(run.writers),
        "-j",
        str(run.writers),
        "-T",
        str(run.seconds),
        "-f",
        str(script),
        "--failures-detailed",
        "--max-tries",
        "1",
        "--log",
        "--log-prefix",
        str(directory / prefix),
        *(f"-D{name}={value}" for name, value in defines.items()),
        dsn,
    ]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=run.seconds + 120,
        check=False,
        cwd=directory,
    )
    ended = time.perf_counter()
    if on_exit is not None:
        on_exit()
    run.exit_code = result.returncode
    run.load_average = [round(value, 2) for value in os.getloadavg()]
    parse_pgbench(run, result.stdout, result.stderr)
    parse_log(run, directory, prefix)
    if result.returncode not in (0, 2) or run.transactions == 0:
        raise RuntimeError(f"pgbench failed ({result.returncode}): {result.stderr[-2000:]}")
    return ended


# -- the rounds ---------------------------------------------------------------------------------


def _run_async(coroutine: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(coroutine())


def machinery_run(
    pgbench: str,
    dsn: str,
    script: Path,
    run: Run,
    directory: Path,
    consumer: ConsumerThread,
) -> None:
    consumer.start()
    try:
        started = time.perf_counter()
        _run_async(lambda: wait_applied(dsn, 120))  # the backlog of the bare runs, if any
        run.catch_up_s = round(time.perf_counter() - started, 2)
        defines = _defines(dsn, TABLE)
        backends = _machinery_backends(dsn)
        cpu_before = {name: _cpu_of(pid) for name, pid in backends.items()}
        own_before = _own_cpu()
        consumer.reset()

        def snapshot() -> None:
            run.folded_during_run = consumer.collected()[1]

        ended = run_pgbench(pgbench, dsn, script, run, defines, directory, snapshot)
        _run_async(lambda: wait_applied(dsn, 120))
        run.drain_s = round(time.perf_counter() - ended, 2)
        cpu: dict[str, float] = {"consumer_process": round(_own_cpu() - own_before, 2)}
        run.backends_changed = _machinery_backends(dsn) != backends
        for name, pid in backends.items():
            before, after = cpu_before[name], _cpu_of(pid)
            if before is not None and after is not None:
                cpu[name] = round(after - before, 2)
        run.cpu_s = cpu
        lags, run.folded_transactions, run.batches = consumer.collected()
        run.batch_rows_max, run.batch_age_max_s = consumer.rows_max, round(consumer.age_max, 3)
        run.lags = lags
        run.lag_n = len(lags)
        if lags:
            run.lag_p50_s = round(percentile(lags, 0.50), 4)
            run.lag_p99_s = round(percentile(lags, 0.99), 4)
            run.lag_max_s = round(max(lags), 4)
        started = time.perf_counter()
        differences = _run_async(lambda: verify(dsn, rounds=3, timeout=120))
        run.verify_s = round(time.perf_counter() - started, 2)
        run.verify_differences = len(differences)
        run.verify_sample = [str(d) for d in differences[:10]]
    finally:
        consumer.stop()


def bare_run(pgbench: str, dsn: str, script: Path, run: Run, directory: Path) -> None:
    run_pgbench(pgbench, dsn, script, run, _defines(dsn, BARE), directory)


def _vacuum(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(f"VACUUM ANALYZE {TABLE}, {BARE}")


# -- summary --------------------------------------------------------------------------------------


def _spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "min": None, "max": None}
    return {
        "median": round(median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def summarise(runs: list[Run], writers: list[int]) -> list[dict[str, Any]]:
    rows = []
    for mix in MIXES:
        for count in writers:
            cell = [r for r in runs if r.mix == mix and r.writers == count]
            if not cell:
                continue
            by_mode = {mode: [r for r in cell if r.mode == mode] for mode in MODES}
            ratios = []
            for number in sorted({r.round for r in cell}):
                pair = {r.mode: r for r in cell if r.round == number}
                if len(pair) == 2 and pair["bare"].tps:
                    ratios.append(pair["machinery"].tps / pair["bare"].tps)
            machinery = by_mode["machinery"]
            lags = [lag for r in machinery for lag in r.lags]
            row: dict[str, Any] = {"mix": mix, "writers": count, "ratio": _spread(ratios)}
            for mode, mode_runs in by_mode.items():
                row[mode] = {
                    "tps": _spread([r.tps for r in mode_runs]),
                    "p95_ms": _spread([r.latency_p95_ms or 0.0 for r in mode_runs]),
                    "p50_ms": _spread([r.latency_p50_ms or 0.0 for r in mode_runs]),
                    "transactions": sum(r.transactions for r in mode_runs),
                    "failed": sum(r.failed for r in mode_runs),
                    "serialization_failures": sum(r.serialization_failures for r in mode_runs),
                    "deadlock_failures": sum(r.deadlock_failures for r in mode_runs),
                    "aborted_clients": sum(r.aborted_clients for r in mode_runs),
                }
            row["lag"] = {
                "n": len(lags),
                "p50_s": round(percentile(lags, 0.50), 4) if lags else None,
                "p99_s": round(percentile(lags, 0.99), 4) if lags else None,
                "max_s": round(max(lags), 4) if lags else None,
            }
            row["drain_s"] = _spread([r.drain_s or 0.0 for r in machinery])
            folded = sum(r.folded_transactions for r in machinery)
            row["folded_during_run_share"] = (
                round(sum(r.folded_during_run for r in machinery) / folded, 3) if folded else None
            )
            row["batch_rows_max"] = max((r.batch_rows_max for r in machinery), default=0)
            row["batch_age_max_s"] = max((r.batch_age_max_s or 0.0 for r in machinery), default=0)
            row["verify_differences"] = sum(r.verify_differences or 0 for r in machinery)
            row["cpu_s_per_run"] = {
                name: round(median([r.cpu_s.get(name, 0.0) for r in machinery]), 2)
                for name in ("consumer_process", "consumer_backend", "walsender")
            }
            row["meets_ratio"] = bool(ratios) and median(ratios) >= TARGET_RATIO
            rows.append(row)
    return rows


def targets(rows: list[dict[str, Any]], runs: list[Run]) -> dict[str, Any]:
    ratio_misses = [
        f"{r['mix']} x {r['writers']}: {r['ratio']['median']:.1%}"
        for r in rows
        if not r["meets_ratio"]
    ]
    failed = sum(r.failures for r in runs if r.mode == "machinery")
    failed_bare = sum(r.failures for r in runs if r.mode == "bare")
    lag_runs = [r for r in runs if r.mode == "machinery" and r.writers == LAG_WRITERS]
    lags = [lag for r in lag_runs for lag in r.lags]
    lag_p99 = percentile(lags, 0.99) if lags else None
    lag_p50 = percentile(lags, 0.50) if lags else None
    per_mix_p99 = {
        mix: round(percentile(values, 0.99), 4)
        for mix in MIXES
        if (values := [lag for r in lag_runs if r.mix == mix for lag in r.lags])
    }
    differences = sum(r.verify_differences or 0 for r in runs if r.mode == "machinery")
    return {
        "ratio_at_least": TARGET_RATIO,
        "ratio_met": bool(rows) and not ratio_misses,
        "ratio_misses": ratio_misses,
        "failed_machinery": failed,
        "failed_bare": failed_bare,
        "failed_met": failed == 0,
        "lag_writers": LAG_WRITERS,
        "lag_p50_s": None if lag_p50 is None else round(lag_p50, 4),
        "lag_p99_s": None if lag_p99 is None else round(lag_p99, 4),
        "lag_p99_by_mix_s": per_mix_p99,
        "lag_p99_at_most_s": TARGET_LAG_P99_S,
        # None: no run with that many writers
        "lag_met": None
        if lag_p99 is None
        else all(v <= TARGET_LAG_P99_S for v in per_mix_p99.values()),
        "verify_differences": differences,
        "verify_met": differences == 0,
    }


# -- output -------------------------------------------------------------------------------------


def _range(spread: dict[str, Any], fmt: str = "{:,.0f}") -> str:
    if spread["median"] is None:
        return "—"
    return (
        f"{fmt.format(spread['median'])} ({fmt.format(spread['min'])} to"
        f" {fmt.format(spread['max'])})"
    )


def _lag(value: float | None) -> str:
    return "—" if value is None else f"{value * 1000:,.0f} ms"


def _failed(side: dict[str, Any]) -> str:
    text = str(side["failed"])
    if side["aborted_clients"]:
        text += f" + {side['aborted_clients']} aborted"
    return text


def _cells(row: dict[str, Any]) -> list[str]:
    machinery, bare = row["machinery"], row["bare"]
    return [
        row["mix"],
        str(row["writers"]),
        _range(machinery["tps"]),
        _range(bare["tps"]),
        _range({k: None if v is None else v * 100 for k, v in row["ratio"].items()}, "{:.0f}%"),
        f"{machinery['p95_ms']['median']:.2f} / {bare['p95_ms']['median']:.2f}",
        f"{_failed(machinery)} / {_failed(bare)}",
        f"{_lag(row['lag']['p50_s'])} / {_lag(row['lag']['p99_s'])}",
        f"{row['drain_s']['max']:.1f}",
        "—" if row["folded_during_run_share"] is None else f"{row['folded_during_run_share']:.0%}",
        str(row["verify_differences"]),
    ]


HEADERS = (
    "mix",
    "writers",
    "machinery tx/s",
    "bare tx/s",
    "machinery ÷ bare",
    "p95 ms mach. / bare",
    "failed mach. / bare",
    "lag p50 / p99",
    "drain s (max)",
    "folded during run",
    "verify diffs",
)


def table(rows: list[dict[str, Any]], rounds: int, seconds: int) -> Table:
    result = Table(
        title=f"Booking writes, pgbench: service machinery vs bare twin table"
        f" ({rounds} interleaved rounds x {seconds} s; median (range))"
    )
    for header in HEADERS:
        result.add_column(header, overflow="fold")
    for row in rows:
        result.add_row(*_cells(row))
    return result


def verdicts(data: dict[str, Any]) -> list[str]:
    t = data["targets"]

    def met(ok: bool | None) -> str:
        return "NOT MEASURED" if ok is None else "MET" if ok else "NOT MET"

    return [
        f"throughput ≥ {t['ratio_at_least']:.0%} of bare at 1 and 8 writers:"
        f" {met(t['ratio_met'])}"
        + (f" (below: {', '.join(t['ratio_misses'])})" if t["ratio_misses"] else ""),
        f"0 failed transactions with the machinery: {met(t['failed_met'])}"
        f" ({t['failed_machinery']} failed; bare: {t['failed_bare']})",
        f"freshness lag p99 ≤ {t['lag_p99_at_most_s']:g} s under {t['lag_writers']} writers:"
        f" {met(t['lag_met'])} (p50 {_lag(t['lag_p50_s'])}, p99 {_lag(t['lag_p99_s'])};"
        f" per mix {', '.join(f'{m} {_lag(v)}' for m, v in t['lag_p99_by_mix_s'].items())})",
        f"derived tables exact after every machinery run (rollups verify):"
        f" {met(t['verify_met'])} ({t['verify_differences']} differences)",
    ]


def markdown(data: dict[str, Any]) -> str:
    m = data["machine"]
    setup = data["setup"]
    lines = [
        f"`{data['command']}` — {data['elapsed_s']:.0f} s; {m['cores']} cores ({m['cpu']}),"
        f" {m['memory_gib']} GiB, Linux {m['kernel']}, Python {m['python']}, commit"
        f" {m['git_commit']}, load average at the end {m['load_average']}.",
        f"{data['args']['rounds']} interleaved rounds x {data['args']['seconds']} s per run;"
        f" {setup['params']['bookings']:,} bookings, {setup['params']['salons']} salons at the"
        f" start; {setup['final_rows'][TABLE]:,} / {setup['final_rows'][BARE]:,} rows in"
        f" {TABLE} / {BARE} at the end; {data['pgbench']}.",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in data["rows"]]
    lines += ["", *(f"- {line}" for line in verdicts(data))]
    return "\n".join(lines)


def _log_run(console: Console, run: Run) -> None:
    text = (
        f"round {run.round} {run.mix:<13} {run.writers} writer(s) {run.mode:<9}"
        f" {run.tps:8,.0f} tx/s  p95 {run.latency_p95_ms or 0:6.2f} ms  failed {run.failed}"
    )
    if run.aborted_clients:
        text += f" aborted {run.aborted_clients}"
    if run.mode == "machinery":
        text += (
            f"  lag p50/p99 {_lag(run.lag_p50_s)}/{_lag(run.lag_p99_s)}"
            f"  catch-up {run.catch_up_s} s drain {run.drain_s} s"
            f"  verify {run.verify_differences}  cpu {run.cpu_s}"
        )
    console.log(text)


def main() -> None:
    parser = argparse.ArgumentParser(description="Write-path benchmark (make bench).")
    parser.add_argument(
        "--seconds",
        type=int,
        default=int(os.environ.get("BENCH_WRITES_SECONDS", "8")),
        help="seconds per pgbench run (BENCH_WRITES_SECONDS)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=int(os.environ.get("BENCH_WRITES_ROUNDS", "3")),
        help="interleaved rounds (BENCH_WRITES_ROUNDS)",
    )
    parser.add_argument("--writers", default="1,8", help="pgbench clients, comma-separated")
    parser.add_argument("--mixes", default=",".join(MIXES))
    parser.add_argument("--bookings", type=int, default=DEFAULT_BOOKINGS)
    parser.add_argument(
        "--markdown", action="store_true", help="print the docs/performance.md tables"
    )
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads((RESULTS_DIR / "writes-latest.json").read_text())))
        return
    console = Console()
    if not console.is_terminal:
        console = Console(width=240)
    started = time.perf_counter()
    writers = [int(w) for w in args.writers.split(",") if w]
    mixes = [m for m in args.mixes.split(",") if m]
    unknown = set(mixes) - set(MIXES)
    if unknown:
        parser.error(f"unknown mix: {', '.join(sorted(unknown))}")
    params = Params(bookings=args.bookings)

    pgbench = pgbench_path()
    version = subprocess.run(
        [pgbench, "--version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    server = get_settings().database_url
    url = with_database(server, WRITES_DATABASE)
    dsn = libpq_url(url)
    console.log(f"{version}; database {WRITES_DATABASE}: creating, migrating, seeding")
    recreate_database(with_database(server, MAINTENANCE_DATABASE))
    migrate(url)
    console.log(seed_database(url, **asdict(params)))
    # Creating a logical slot waits until every transaction open on the server (any database,
    # another engineer's test included) has ended.
    console.log("rollups rebuild: creating the slot waits for the server's open transactions")
    rebuilt = asyncio.run(rebuild(dsn))
    console.log(f"derived tables rebuilt, slot {rebuilt.slot_name}, {rebuilt.seconds:.1f} s")
    twin = create_twin(dsn)
    console.log(f"twin {BARE}: {twin}")

    runs: list[Run] = []
    consumer = ConsumerThread(dsn)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-writes-") as temporary:
            directory = Path(temporary)
            scripts = write_scripts(directory)
            for number in range(1, args.rounds + 1):
                _vacuum(dsn)
                configs = [(mix, count) for mix in mixes for count in writers]
                for index, (mix, count) in enumerate(configs):
                    order = MODES if (number + index) % 2 else tuple(reversed(MODES))
                    for mode in order:
                        run = Run(number, mix, count, mode, args.seconds)
                        if mode == "machinery":
                            machinery_run(
                                pgbench, dsn, scripts[(mix, TABLE)], run, directory, consumer
                            )
                        else:
                            bare_run(pgbench, dsn, scripts[(mix, BARE)], run, directory)
                        runs.append(run)
                        _log_run(console, run)
    finally:
        consumer.close()
        drop_slots(with_database(server, MAINTENANCE_DATABASE))

    rows = summarise(runs, writers)
    final_rows = {
        table_name: _scalar(dsn, f"SELECT count(*) FROM {table_name}")
        for table_name in (TABLE, BARE)
    }
    elapsed = time.perf_counter() - started
    payload: dict[str, Any] = {
        "kind": "writes",
        "command": "make bench  (python -m benchmarks.writes)",
        "args": vars(args),
        "machine": machine(),
        "pgbench": version,
        "setup": {
            "database": WRITES_DATABASE,
            "params": asdict(params),
            "twin": twin,
            "final_rows": final_rows,
            "method": (
                "pgbench -n -M prepared -c N -j N -T seconds --failures-detailed --max-tries 1"
                " --log; tps from pgbench, latency percentiles from the per-transaction log;"
                " machinery = bookings with the in-process ChangeConsumer running,"
                " bare = bookings_bare (same columns, checks, indexes, foreign keys; default"
                " replica identity) with the consumer stopped; lag = Batch.lags"
            ),
        },
        "rows": rows,
        "targets": targets(rows, runs),
        "runs": [
            {key: value for key, value in asdict(run).items() if key != "lags"} for run in runs
        ],
        "elapsed_s": round(elapsed, 1),
    }
    path = write_results("writes", payload)
    console.print(table(rows, args.rounds, args.seconds))
    for line in verdicts(payload):
        console.print(line)
    console.print(f"wrote {path} in {elapsed:.0f} s")
    if not payload["targets"]["verify_met"]:
        for run in runs:
            for difference in run.verify_sample:
                console.print(f"round {run.round} {run.mix} x {run.writers}: {difference}")
        raise SystemExit("the derived tables differ from a recomputation: benchmark failed")


if __name__ == "__main__":
    main()
