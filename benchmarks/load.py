"""HTTP load test (``make loadtest``): wrk against ``salon-reports serve`` and a bare FastAPI app.

On the benchmark dataset (``benchmarks.dataset``), this starts the service on a free loopback
port with ``DATABASE_URL`` pointing at ``salon_reports_bench`` and ``REDIS_URL`` at its own
Redis database (``.env``'s server, database ``--redis-db``, default 15; the tests use 1-14),
and runs wrk (``/usr/bin/wrk``, one thread by default: the machine's cores are shared by wrk,
the workers, PostgreSQL and Redis) at each concurrency (50 connections by default) against:

- ``bare``: ``GET /report`` of ``benchmarks.bare_app``, a separate minimal FastAPI app (SPEC
  section 11): one route answering the cached dashboard's bytes (same size, orjson), served by
  uvicorn with the service's options and the same number of workers; never the service itself;
- ``healthz``: the service's own ``GET /healthz`` (behind the same middleware as the reports);
- ``cached``: one owner's dashboard, default period, always a cache hit after the warm-up;
- ``uncached``: dashboards of distinct (salon, 30-day window) pairs, a new one per request
  (every request a miss: the report SQL runs, then the entry is stored in Redis);
- ``zipf``: a pre-generated list of requests, salons Zipf-distributed (s = 1.1, in a shuffled
  order), reports 60/25/15 % dashboard/bookings/professionals, date ranges Zipf-distributed
  over the usual ones (default 30 days, last 7 days, month to date, last month, 90, 365 days)
  and a long tail of custom ranges, 2 % platform-wide (admin); owner tokens per salon. Its hit
  rate comes from ``/performance/stats`` (admin token) read before and after each run: the
  first run starts from an empty cache, the second continues on what it left, and a last,
  longer run (``--zipf-steady``, 40 s) measures the rate once warm. The same request list is
  also replayed against the cache's rules (TTLs, stale grace) at the measured rate, 100 and
  1000 req/s for a simulated steady-state rate.

Then the hit rate under writes (``--hit-rate-minutes``, 5; ``--hit-rate-only`` runs nothing
else): the Zipf mix from an empty cache while ``BookingWriter`` makes ``--writes-per-minute``
(30) booking writes to salons drawn uniformly or, ``--write-salons zipf``, with the reads'
popularity; the hit rate of telemetry/README.md per minute from ``/performance/stats``, beside
the ceiling that each key's first request sets.

Four servers of the service run side by side, each ``--workers`` workers (1 by default: with
2, keep-alive connections split unevenly between the workers from run to run and the figures
are bimodal; give 2-worker figures as a range), plus the bare app: tracing on with
``OTEL_TRACES_SAMPLER=parentbased_traceidratio`` at each ``--samplers`` ratio (1.0 and 0.1);
``OTEL_TRACES_SAMPLER=always_off`` (metrics on, no span recorded: the spans' own cost is
measured against it); ``OTEL_SDK_DISABLED=true`` (no OpenTelemetry at all). The bare app,
then healthz and cached on every server, run in ``--repeats`` interleaved rounds of
``--duration`` seconds (bare, A, B, C, D, then again), so the machine's drift and noise fall on
every configuration alike; the medians (and the range) are compared. Uncached and Zipf run on
the first server, ``--mix-duration`` seconds each (``--no-mix``: skipped). No exporter
endpoint is set: spans are created, sampled and ended, then dropped (no
export cost, which a real collector would add).

Reported per run: requests/s, latency p50/p95/p99/max (wrk's own histogram, from a ``done()``
hook; closed-loop, so queueing under overload shows up as latency, not as lost requests),
errors (non-2xx/3xx statuses plus connect/read/write errors and timeouts, ``--timeout`` 10 s);
in the uncached and Zipf runs a ``429 tenant_throttled`` (a salon over its fair share of the
database, docs/api.md) is counted apart, as ``throttled``, not as an error.
Ratios: cached and healthz vs the bare app (the targets: cached >= 60 % of bare at sampler 0.1,
>= 75 % with the SDK disabled; healthz >= 80 %), the cost of all telemetry (vs SDK disabled)
and of the spans alone (vs the always_off sampler). Servers are killed at the end, on failure
or interrupt too. Loopback only; every wrk run stops by itself after ``--duration`` seconds.

    python -m benchmarks.load [--duration 4] [--repeats 3] [--connections 50] [--no-mix]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from bisect import bisect
from dataclasses import dataclass, field
from datetime import date, timedelta
from itertools import accumulate
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import create_engine, text

from benchmarks import bare_app
from benchmarks.dataset import Dataset, ensure_dataset
from benchmarks.stats import machine, write_results
from service.auth import issue_token
from service.config import get_settings
from service.reports.names import CACHED_REPORTS
from telemetry.stats.hit_rate import cache_hit_rate

PREFIX = "/api/v1/optimized-reports"
STATS_PATH = f"{PREFIX}/performance/stats"
HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
# Workers publish their stats to Redis every 2 s; wait past that before reading the merge.
STATS_SETTLE_SECONDS = 2.6
TOKEN_TTL_SECONDS = 3600
WANTED_OPEN_FILES = 16_384
TARGETS_VS_BARE = {  # (workload, server) -> least share of the bare app's throughput
    ("cached", "tracing-0.1"): 0.60,
    ("cached", "sdk-disabled"): 0.75,
    ("healthz", "tracing-0.1"): 0.80,
}
BARE_SERVER = "bare-fastapi"
TARGET_TRACING_COST = 0.15
TARGET_HIT_RATE = 0.95
TARGET_CONNECTIONS = 500

DONE_HOOK = r"""
done = function(summary, latency, requests)
  if report_throttled then report_throttled() end
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\"requests\":%d,\"duration_us\":%d,\"bytes\":%d,\"connect\":%d," ..
    "\"read\":%d,\"write\":%d,\"status\":%d,\"timeout\":%d,\"p50_us\":%d,\"p90_us\":%d," ..
    "\"p95_us\":%d,\"p99_us\":%d,\"max_us\":%d,\"mean_us\":%.1f}\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(95), latency:percentile(99), latency.max, latency.mean))
end
"""

STATIC_SCRIPT = """
wrk.method = "GET"
wrk.headers["Authorization"] = "Bearer {token}"
"""

# One line per request: "<token index> <path>"; each thread walks the list from its offset.
LIST_SCRIPT = """
local tokens = {{}}
for line in io.lines("{tokens_file}") do tokens[#tokens + 1] = line end
local paths, owners = {{}}, {{}}
for line in io.lines("{requests_file}") do
  local owner, path = line:match("^(%d+) (%S+)$")
  owners[#owners + 1] = tonumber(owner)
  paths[#paths + 1] = path
end
local counter = 0
local next_offset = {offset}
local threads = {{}}
throttled = 0
setup = function(thread)
  thread:set("offset", next_offset)
  next_offset = next_offset + {stride}
  table.insert(threads, thread)
end
-- 429 tenant_throttled: a salon over its fair share (docs/api.md), counted apart from errors.
response = function(status, headers, body)
  if status == 429 then throttled = throttled + 1 end
end
report_throttled = function()
  local total = 0
  for _, thread in ipairs(threads) do total = total + thread:get("throttled") end
  io.write(string.format("WRKTHROTTLED %d\\n", total))
end
init = function(args)
  counter = offset or 0
end
request = function()
  counter = counter + 1
  if counter > #paths then counter = 1 end
  return wrk.format("GET", paths[counter],
    {{["Authorization"] = "Bearer " .. tokens[owners[counter]]}})
end
"""


# -- processes --------------------------------------------------------------------------------


class Interrupted(Exception):
    pass


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(f"signal {signum}")


def raise_open_files() -> tuple[int, int]:
    """Soft ``RLIMIT_NOFILE`` up to the hard limit (wrk and the server inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = WANTED_OPEN_FILES if hard == resource.RLIM_INFINITY else min(WANTED_OPEN_FILES, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _redis_url(base: str, database: int) -> str:
    if not base:
        raise SystemExit("REDIS_URL is not configured (.env); run `make services`")
    return re.sub(r"/\d*$", "", base) + f"/{database}"


@dataclass
class Server:
    """One ``salon-reports serve`` process group on a loopback port."""

    name: str
    env: dict[str, str]
    workers: int
    log_path: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    command: list[str] | None = None  # default: ``salon-reports serve``
    ready_path: str = "/readyz"

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout: float = 45.0) -> None:
        executable = Path(sys.executable).with_name("salon-reports")
        command = self.command or [
            str(executable),
            "serve",
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
        ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: we stop it and its workers
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server {self.name} exited; see {self.log_path}")
            with contextlib.suppress(OSError, ValueError):
                status, body = http_get(f"{self.base}{self.ready_path}", timeout=2)
                if status == 200 and self.command is not None:
                    return
                if status == 200:
                    ready = json.loads(body)
                    wants_redis = bool(self.env.get("REDIS_URL"))
                    if not wants_redis or ready.get("invalidation_listener") == "connected":
                        return
            time.sleep(0.3)
        raise RuntimeError(f"server {self.name} not ready in {timeout:.0f} s; see {self.log_path}")

    def cpu_seconds(self) -> float:
        """User and system CPU time used so far by the server process (every thread)."""
        if self.process is None:
            return 0.0
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        # After "(comm)": state is field 3, utime 14 and stime 15 (proc(5)), in clock ticks.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)


def http_get(url: str, token: str | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read()


def http_post(url: str, token: str, body: dict[str, Any]) -> tuple[int, bytes]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read()


# -- workloads --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    script: Path
    path: str  # the URL wrk is given (its path is used by static scripts only)


def _zipf_weights(count: int, exponent: float) -> list[float]:
    return [1 / (rank**exponent) for rank in range(1, count + 1)]


def _ranges(today: date, rng: random.Random, tail: int) -> list[dict[str, str]]:
    """Date ranges by popularity: the usual ones first, then a long tail of custom ones."""
    month_start = today.replace(day=1)
    last_month_end = month_start - timedelta(days=1)
    usual: list[dict[str, str]] = [
        {},  # the default: the 30 days ending today
        {"start": str(today - timedelta(days=6)), "end": str(today)},
        {"start": str(month_start), "end": str(today)},
        {"start": str(last_month_end.replace(day=1)), "end": str(last_month_end)},
        {"start": str(today - timedelta(days=89)), "end": str(today)},
        {"start": str(today - timedelta(days=364)), "end": str(today)},
    ]
    custom = []
    for _ in range(tail):
        end = today - timedelta(days=rng.randrange(0, 365))
        start = end - timedelta(days=rng.choice((6, 13, 29, 59, 89)))
        custom.append({"start": str(start), "end": str(end)})
    return usual + custom


def _query(params: dict[str, Any]) -> str:
    return "&".join(f"{key}={value}" for key, value in params.items())


def zipf_requests(
    salon_ids: list[int], today: date, count: int, seed: int = 7
) -> list[tuple[int | None, str]]:
    """``count`` (salon or None for platform-wide, path) pairs of the Zipf mix.

    The same ``seed`` gives the same distribution (salon popularity order, custom ranges) and
    the same sequence, whatever ``count``: a longer list starts with the shorter one.
    """
    rng = random.Random(seed)
    salons = salon_ids[:]
    rng.shuffle(salons)  # popularity is not id order
    ranges = _ranges(today, rng, tail=60)
    salon_cumulative = list(accumulate(_zipf_weights(len(salons), 1.1)))
    range_cumulative = list(accumulate(_zipf_weights(len(ranges), 1.2)))
    reports, report_cumulative = ("dashboard", "bookings", "professionals"), (0.60, 0.85, 1.0)
    paths: dict[tuple[int | None, int, int], str] = {}
    out: list[tuple[int | None, str]] = []
    draw = rng.random
    for _ in range(count):
        platform = draw() < 0.02
        salon = (
            None if platform else salons[bisect(salon_cumulative, draw() * salon_cumulative[-1])]
        )
        report = bisect(report_cumulative, draw())
        if platform and draw() < 0.8:
            range_index = 0  # admins mostly look at the default period
        else:
            range_index = bisect(range_cumulative, draw() * range_cumulative[-1])
        key = (salon, report, range_index)
        path = paths.get(key)
        if path is None:
            path = paths[key] = _path(reports[min(report, 2)], salon, ranges[range_index])
        out.append((salon, path))
    return out


def _path(report: str, salon: int | None, period: dict[str, str]) -> str:
    params: dict[str, Any] = {} if salon is None else {"salon_id": salon}
    params.update(period)
    if report == "bookings" and "start" in period:
        span = (date.fromisoformat(period["end"]) - date.fromisoformat(period["start"])).days
        if span > 95:
            params["granularity"] = "month"
        elif span > 31:
            params["granularity"] = "week"
    query = _query(params)
    return f"{PREFIX}/{report}" + (f"?{query}" if query else "")


def simulated_hit_rate(
    requests: list[tuple[int | None, str]],
    rps: float,
    ttls: dict[str, int],
    stale_grace: int,
    measure_seconds: float = 600.0,
) -> dict[str, Any]:
    """Steady-state hit rate of the Zipf mix at ``rps``, replayed against the cache's rules.

    Requests arrive every ``1 / rps`` s; an entry filled at ``t`` is fresh for its report's TTL,
    then served stale (a hit, as ``/performance/stats`` counts it) for ``stale_grace`` s while it
    is refreshed. Counted after one longest TTL of warm-up, over ``measure_seconds``. No writes
    invalidate anything here: on a live platform, booking changes lower the rate.
    """
    warm_up = max(ttls.values())
    needed = int(rps * (warm_up + measure_seconds))
    if needed > len(requests):
        raise ValueError(f"need {needed} requests, have {len(requests)}")
    filled: dict[tuple[int | None, str], float] = {}
    hits = lookups = 0
    for index in range(needed):
        now = index / rps
        key = requests[index]
        report = key[1].split("?", 1)[0].rsplit("/", 1)[-1]
        ttl = ttls[report]
        at = filled.get(key)
        hit = at is not None and now < at + ttl + stale_grace
        if at is None or now >= at + ttl:
            filled[key] = now  # a miss fills; a stale hit refreshes in the background
        if now >= warm_up:
            lookups += 1
            hits += hit
    return {
        "rps": round(rps, 1),
        "hit_rate": round(hits / lookups, 4) if lookups else None,
        "lookups": lookups,
        "measured_after_s": warm_up,
        "ttls_s": ttls,
        "stale_grace_s": stale_grace,
    }


def distinct_dashboards(salon_ids: list[int], today: date, seed: int = 11) -> list[str]:
    """One path per (salon, 30-day window ending on one of the last 365 days), shuffled."""
    rng = random.Random(seed)
    paths = []
    for salon in salon_ids:
        for back in range(365):
            end = today - timedelta(days=back)
            start = end - timedelta(days=29)
            paths.append(f"{PREFIX}/dashboard?salon_id={salon}&start={start}&end={end}")
    rng.shuffle(paths)
    return paths


@dataclass
class Workloads:
    directory: Path
    admin_token: str
    cached: Workload
    healthz: Workload
    bare: Workload
    uncached_count: int
    zipf_lines: list[tuple[int | None, str]]
    owner_index: dict[int | None, int]

    def uncached(self, offset: int, stride: int) -> Workload:
        """Distinct dashboards from ``offset``, each wrk thread ``stride`` further on."""
        script = self.directory / f"uncached-{offset}.lua"
        script.write_text(
            LIST_SCRIPT.format(
                tokens_file=self.directory / "tokens.txt",
                requests_file=self.directory / "uncached.txt",
                offset=offset,
                stride=max(1, stride),
            )
            + DONE_HOOK
        )
        return Workload("uncached", script, f"{PREFIX}/dashboard")

    def zipf(self, offset: int, threads: int) -> Workload:
        script = self.directory / f"zipf-{offset}.lua"
        script.write_text(
            LIST_SCRIPT.format(
                tokens_file=self.directory / "tokens.txt",
                requests_file=self.directory / "zipf.txt",
                offset=offset,
                stride=max(1, len(self.zipf_lines) // max(threads, 1)),
            )
            + DONE_HOOK
        )
        return Workload("zipf", script, f"{PREFIX}/dashboard")

    def distinct_keys(self, offset: int, requests: int) -> int:
        """Distinct cache keys among the ``requests`` Zipf requests from ``offset`` on."""
        seen = set()
        for index in range(requests):
            seen.add(self.zipf_lines[(offset + index) % len(self.zipf_lines)])
        return len(seen)


def build_workloads(
    directory: Path,
    secret: str,
    salon_ids: list[int],
    cached_salon: int,
    today: date,
    zipf_count: int,
) -> Workloads:
    admin = issue_token(secret, role="admin", ttl_seconds=TOKEN_TTL_SECONDS, subject="loadtest")
    tokens = [admin]  # line 1: admin (platform-wide requests); then one owner per salon
    owner_index: dict[int | None, int] = {None: 1}
    for salon in salon_ids:
        tokens.append(
            issue_token(
                secret,
                role="owner",
                salon_ids=[salon],
                ttl_seconds=TOKEN_TTL_SECONDS,
                subject=f"owner-{salon}",
            )
        )
        owner_index[salon] = len(tokens)
    (directory / "tokens.txt").write_text("\n".join(tokens) + "\n")

    uncached = distinct_dashboards(salon_ids, today)
    (directory / "uncached.txt").write_text("".join(f"1 {path}\n" for path in uncached))
    zipf = zipf_requests(salon_ids, today, zipf_count)
    (directory / "zipf.txt").write_text(
        "".join(f"{owner_index[salon]} {path}\n" for salon, path in zipf)
    )

    owner = tokens[owner_index[cached_salon] - 1]
    cached_script = directory / "cached.lua"
    cached_script.write_text(STATIC_SCRIPT.format(token=owner) + DONE_HOOK)
    # The same request headers everywhere (the token too, unread by healthz and the bare app).
    healthz_script = directory / "healthz.lua"
    healthz_script.write_text(STATIC_SCRIPT.format(token=owner) + DONE_HOOK)
    return Workloads(
        directory=directory,
        admin_token=admin,
        cached=Workload("cached", cached_script, f"{PREFIX}/dashboard?salon_id={cached_salon}"),
        healthz=Workload("healthz", healthz_script, "/healthz"),
        bare=Workload("bare", healthz_script, bare_app.PATH),
        uncached_count=len(uncached),
        zipf_lines=zipf,
        owner_index=owner_index,
    )


# -- running wrk ------------------------------------------------------------------------------


def wrk_command(
    server: Server,
    workload: Workload,
    connections: int,
    duration: float,
    threads: int,
    timeout_s: float,
) -> list[str]:
    return [
        shutil.which("wrk") or "/usr/bin/wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration:g}s",
        f"--timeout={timeout_s:g}s",
        "--latency",
        "-s",
        str(workload.script),
        f"{server.base}{workload.path}",
    ]


def run_wrk(
    server: Server,
    workload: Workload,
    connections: int,
    duration: float,
    threads: int,
    timeout_s: float,
) -> dict[str, Any]:
    command = wrk_command(server, workload, connections, duration, threads, timeout_s)
    load_before = os.getloadavg()[0]
    cpu_before = server.cpu_seconds()
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=duration + timeout_s + 30, check=False
    )
    cpu_used = server.cpu_seconds() - cpu_before
    result = parse_wrk(completed.returncode, completed.stdout, completed.stderr, load_before)
    # The server's own CPU time per request: unlike req/s, hardly moved by what else runs on
    # a shared machine (wrk, the other servers, other people's work).
    result["cpu_us_per_request"] = (
        round(cpu_used * 1e6 / result["requests"], 1) if result["requests"] else None
    )
    return {"connections": connections, "threads": threads, **result}


def parse_wrk(returncode: int, stdout: str, stderr: str, load_before: float) -> dict[str, Any]:
    """wrk's summary (the ``done()`` hook's JSON line) as one run's figures."""
    match = re.search(r"^WRKJSON (\{.*\})$", stdout, re.MULTILINE)
    if returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({returncode}): {stderr.strip()}\n{stdout[-2000:]}")
    raw = json.loads(match.group(1))
    seconds = raw["duration_us"] / 1e6
    socket_errors = raw["connect"] + raw["read"] + raw["write"] + raw["timeout"]
    # The list workloads count 429s (a salon over its fair share): answers, not errors.
    counted = re.search(r"^WRKTHROTTLED (\d+)$", stdout, re.MULTILINE)
    throttled = int(counted.group(1)) if counted else 0
    return {
        "duration_s": round(seconds, 2),
        "requests": raw["requests"],
        "rps": round(raw["requests"] / seconds, 1),
        "p50_ms": raw["p50_us"] / 1000,
        "p95_ms": raw["p95_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "mean_ms": round(raw["mean_us"] / 1000, 3),
        "errors": raw["status"] - throttled + socket_errors,
        "non_2xx": raw["status"],
        "throttled": throttled,
        "socket_errors": {key: raw[key] for key in ("connect", "read", "write", "timeout")},
        "load_average_1m_before": round(load_before, 2),
    }


# -- the hit rate under writes ----------------------------------------------------------------


class BookingWriter(threading.Thread):
    """``per_minute`` booking writes a minute, evenly spaced, each to one salon: the price of a
    booking of the last 30 days (of the dataset) goes up by one cent, or, if this run already
    raised it, back down; whatever is still raised at the end is put back, so the dataset
    keeps its figures. Each write is its own transaction, folded and notified by the service's
    change stream like any booking app's write. Salons are drawn uniformly (``uniform``) or
    with the popularity of the reads (``zipf``: busy salons take more bookings)."""

    def __init__(
        self, url: str, salon_ids: list[int], today: date, per_minute: float, salons: str
    ) -> None:
        super().__init__(name="booking-writer", daemon=True)
        self.url = url
        self.today = today
        self.interval = 60.0 / per_minute
        rng = random.Random(7)  # the reads' popularity order (zipf_requests, same seed)
        ordered = salon_ids[:]
        rng.shuffle(ordered)
        self.salons = ordered
        self.weights = _zipf_weights(len(ordered), 1.1) if salons == "zipf" else None
        self.rng = random.Random(23)
        self.stop = threading.Event()
        self.raised: set[int] = set()
        self.writes: list[float] = []  # monotonic time of each committed write
        self.error: str | None = None

    def run(self) -> None:
        try:
            engine = create_engine(self.url, isolation_level="AUTOCOMMIT")
            try:
                with engine.connect() as conn:
                    next_at = time.monotonic()
                    while not self.stop.wait(max(0.0, next_at - time.monotonic())):
                        next_at += self.interval
                        self._write(conn)
                    self._restore(conn)
            finally:
                engine.dispose()
        except Exception as error:  # reported with the results
            self.error = f"{type(error).__name__}: {error}"

    def _write(self, conn: Any) -> None:
        salon = self.rng.choices(self.salons, weights=self.weights)[0]
        booking = conn.execute(
            text(
                "SELECT id FROM bookings WHERE salon_id = :salon AND scheduled_at >= :since"
                " AND scheduled_at < :until ORDER BY scheduled_at OFFSET :skip LIMIT 1"
            ),
            {
                "salon": salon,
                "since": self.today - timedelta(days=30),
                "until": self.today,
                "skip": self.rng.randrange(20),
            },
        ).scalar()
        if booking is None:
            return
        step = -1 if booking in self.raised else 1
        conn.execute(
            text("UPDATE bookings SET price_cents = price_cents + :step WHERE id = :id"),
            {"step": step, "id": booking},
        )
        self.raised ^= {booking}
        self.writes.append(time.monotonic())

    def _restore(self, conn: Any) -> None:
        for booking in sorted(self.raised):
            conn.execute(
                text("UPDATE bookings SET price_cents = price_cents - 1 WHERE id = :id"),
                {"id": booking},
            )
        self.raised.clear()


def hit_rate_under_writes(
    server: Server,
    workloads: Workloads,
    writer: BookingWriter,
    minutes: float,
    connections: int,
    threads: int,
    timeout_s: float,
    log: Any,
) -> dict[str, Any]:
    """The Zipf mix from an empty cache for ``minutes`` while ``writer`` writes bookings; the
    hit rate (telemetry/README.md) per minute, from ``/performance/stats`` read every minute.

    wrk runs the whole time; the stats are read without waiting for the workers' next
    publication, so each reading trails by up to the 2 s publication interval, alike for every
    minute."""
    clear_cache(server, workloads.admin_token)
    workload = workloads.zipf(0, threads)
    duration = minutes * 60
    first = cache_counts(server, workloads.admin_token)
    load_before = os.getloadavg()[0]
    command = wrk_command(server, workload, connections, duration, threads, timeout_s)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = time.monotonic()
    writer.start()
    readings = [first]
    per_minute: list[dict[str, Any]] = []
    seen: set[tuple[int | None, str]] = set()
    walked = 0  # requests of the list sent so far (wrk walks it in order, one thread)
    try:
        previous = started
        for minute in range(1, int(-(-duration // 60)) + 1):
            at = started + min(minute * 60, duration)
            time.sleep(max(0.0, at - time.monotonic()))
            readings.append(cache_counts(server, workloads.admin_token, settle=False))
            rate = hit_rate(readings[-2], readings[-1])
            rate["minute"] = minute
            rate["writes"] = sum(1 for t in writer.writes if previous <= t < at)
            previous = at
            # The best any cache could do on these requests: each key's first request misses.
            first_seen = 0
            for index in range(walked, walked + rate["lookups"]):
                request = workloads.zipf_lines[index % len(workloads.zipf_lines)]
                if request not in seen:
                    seen.add(request)
                    first_seen += 1
            walked += rate["lookups"]
            rate["first_requests"] = first_seen
            rate["ceiling"] = (
                round(1 - first_seen / rate["lookups"], 4) if rate["lookups"] else None
            )
            per_minute.append(rate)
            log(
                f"minute {minute}: hit rate {_pct1(rate['hit_rate'])} of {rate['lookups']:,}"
                f" lookups (ceiling {_pct1(rate['ceiling'])}), {rate['writes']} writes"
            )
        stdout, stderr = process.communicate(timeout=timeout_s + 60)
    finally:
        writer.stop.set()
        if process.poll() is None:
            process.kill()
            process.communicate()
        writer.join(timeout=60)
    result = {
        "connections": connections,
        "threads": threads,
        **parse_wrk(process.returncode, stdout, stderr, load_before),
    }
    after_first = hit_rate(readings[1], readings[-1]) if len(readings) > 2 else None
    result["cache"] = {
        "per_minute": per_minute,
        "after_first_minute": after_first,
        "every_minute_after_the_first_at_least_target": (
            all((minute["hit_rate"] or 0) >= TARGET_HIT_RATE for minute in per_minute[1:])
            if len(per_minute) > 1
            else None
        ),
        "writes": len(writer.writes),
        "writes_per_minute": round(60 / writer.interval, 1),
        "write_salons": "zipf" if writer.weights else "uniform",
        "writer_error": writer.error,
        "distinct_keys_requested": workloads.distinct_keys(0, result["requests"]),
    }
    return result


def check_report(server: Server, path: str, token: str) -> bytes:
    """The cached report must answer 200 before it is measured; its body."""
    status, body = http_get(f"{server.base}{path}", token, timeout=60)
    if status != 200:
        raise RuntimeError(f"{path} answered {status} ({body[:200]!r}); see {server.log_path}")
    return body


def clear_cache(server: Server, admin_token: str) -> None:
    status, body = http_post(f"{server.base}{PREFIX}/cache/clear", admin_token, {})
    if status != 200:
        raise RuntimeError(f"cache clear answered {status}: {body[:200]!r}")


def read_stats(server: Server, admin_token: str, settle: bool = True) -> dict[str, Any]:
    """``/performance/stats``, once every worker has published what it counted so far
    (unless ``settle`` is false: then the others' counts are up to 2 s old)."""
    if settle:
        time.sleep(STATS_SETTLE_SECONDS)
    status, body = http_get(f"{server.base}{STATS_PATH}", admin_token, timeout=10)
    if status != 200:
        raise RuntimeError(f"/performance/stats answered {status}: {body[:300]!r}")
    stats: dict[str, Any] = json.loads(body)
    return stats


def cache_counts(server: Server, admin_token: str, settle: bool = True) -> dict[str, Any]:
    stats = read_stats(server, admin_token, settle)
    cache = stats["since_start"]["cache"]
    return {
        "hits": cache["hits"],
        "stale": cache["stale"],
        "misses": cache["misses"],
        "errors": cache["errors"],
        "workers": stats["workers"],
        "partial": stats["partial"],
    }


def hit_rate(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    hits = after["hits"] - before["hits"]
    stale = after["stale"] - before["stale"]
    misses = after["misses"] - before["misses"]
    errors = after["errors"] - before["errors"]
    rate = cache_hit_rate(hits, stale, misses, errors)  # telemetry/README.md, "Cache hit rate"
    return {
        "hits": hits,
        "stale": stale,
        "misses": misses,
        "errors": errors,
        "lookups": hits + stale + misses + errors,
        "hit_rate": None if rate is None else round(rate, 4),
        "workers_reporting": after["workers"],
        "partial": after["partial"],
    }


def idle_timing(server: Server, path: str, token: str) -> dict[str, Any]:
    try:
        return server_timing(server, path, token)
    except (OSError, http.client.HTTPException) as error:
        return {"error": f"{type(error).__name__}: {error}"}


def server_timing(server: Server, path: str, token: str, count: int = 200) -> dict[str, Any]:
    """Idle, sequential requests: client latency and the server's own Server-Timing split."""
    client_ms, cache_ms, total_ms = [], [], []
    connection = http.client.HTTPConnection(HOST, server.port, timeout=10)  # kept alive
    try:
        for _ in range(count):
            started = time.perf_counter()
            connection.request("GET", path, headers={"Authorization": f"Bearer {token}"})
            response = connection.getresponse()
            response.read()
            timing = response.getheader("Server-Timing", "")
            client_ms.append((time.perf_counter() - started) * 1000)
            parts = dict(re.findall(r"(\w+);dur=([\d.]+)", timing))
            if "cache" in parts:
                cache_ms.append(float(parts["cache"]))
            if "total" in parts:
                total_ms.append(float(parts["total"]))
    finally:
        connection.close()

    def median(values: list[float]) -> float | None:
        return round(sorted(values)[len(values) // 2], 3) if values else None

    return {
        "requests": count,
        "client_p50_ms": median(client_ms),
        "server_cache_p50_ms": median(cache_ms),
        "server_total_p50_ms": median(total_ms),
    }


# -- the plan ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Config:
    name: str
    tracing: str  # "sampler 1.0", "disabled", ...
    env: dict[str, str]
    misses: bool = False  # also runs the uncached and Zipf workloads (healthz, cached: all do)


def server_env(
    base: dict[str, str], dataset: Dataset, redis_url: str, secret: str, extra: dict[str, str]
) -> dict[str, str]:
    env = {
        key: value
        for key, value in base.items()
        if not key.startswith("OTEL_") and key not in ("REPORTS_READ_DATABASE_URL",)
    }
    env.update(
        {
            "DATABASE_URL": dataset.url,
            "REDIS_URL": redis_url,
            "REPORTS_JWT_SECRET": secret,
            "OTEL_SERVICE_NAME": "salon-reports-loadtest",
            "PYTHONPATH": str(ROOT),  # the server runs the code tree these benchmarks belong to
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def configs(samplers: list[float]) -> list[Config]:
    out = []
    for index, ratio in enumerate(samplers):
        out.append(
            Config(
                name=f"tracing-{ratio:g}",
                tracing=f"on, parentbased_traceidratio {ratio:g}",
                env={
                    "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                    "OTEL_TRACES_SAMPLER_ARG": f"{ratio:g}",
                },
                misses=index == 0,
            )
        )
    # Metrics on, no spans: what the spans alone cost is measured against this one.
    out.append(
        Config(
            name="spans-off",
            tracing="OTEL_TRACES_SAMPLER=always_off (metrics on)",
            env={"OTEL_TRACES_SAMPLER": "always_off"},
        )
    )
    out.append(
        Config(
            name="sdk-disabled",
            tracing="OTEL_SDK_DISABLED=true",
            env={"OTEL_SDK_DISABLED": "true"},
        )
    )
    return out


def _salons(url: str) -> tuple[list[int], int]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            ids = [
                int(i) for i in conn.execute(text("SELECT id FROM salons ORDER BY id")).scalars()
            ]
            busiest = conn.execute(
                text(
                    "SELECT salon_id FROM bookings GROUP BY salon_id ORDER BY count(*) DESC,"
                    " salon_id LIMIT 1"
                )
            ).scalar_one()
    finally:
        engine.dispose()
    return ids, int(busiest)


def _median_of(group: list[dict[str, Any]], key: str) -> float | None:
    values = [float(run[key]) for run in group if run.get(key) is not None]
    return round(statistics.median(values), 1) if values else None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, 3)


def _cost(measured: float | None, reference: float | None) -> float | None:
    """The share of ``reference``'s throughput lost in ``measured``."""
    kept = _ratio(measured, reference)
    return None if kept is None else round(1 - kept, 3)


def summarise(
    runs: list[dict[str, Any]], samplers: list[float], connections: list[int]
) -> dict[str, Any]:
    def rps(config: str, workload: str, conns: int) -> float | None:
        """The median throughput of that configuration's runs (interleaved repeats)."""
        values = [
            float(run["rps"])
            for run in runs
            if (run["config"], run["workload"], run["connections"]) == (config, workload, conns)
        ]
        return statistics.median(values) if values else None

    def cpu(config: str, workload: str, conns: int) -> float | None:
        """The median CPU time per request of that configuration's runs, in µs."""
        values = [
            float(run["cpu_us_per_request"])
            for run in runs
            if (run["config"], run["workload"], run["connections"]) == (config, workload, conns)
            and run.get("cpu_us_per_request")
        ]
        return statistics.median(values) if values else None

    ratios: dict[str, Any] = {}
    vs_bare: dict[str, Any] = {}
    for conns in connections:
        per: dict[str, Any] = {}
        bare = rps(BARE_SERVER, "bare", conns)
        disabled_cached = rps("sdk-disabled", "cached", conns)
        disabled_healthz = rps("sdk-disabled", "healthz", conns)
        per["sdk-disabled"] = {"cached_vs_healthz": _ratio(disabled_cached, disabled_healthz)}
        spans_off_cached = rps("spans-off", "cached", conns)
        spans_off_healthz = rps("spans-off", "healthz", conns)
        per["spans-off"] = {
            "cached_vs_healthz": _ratio(spans_off_cached, spans_off_healthz),
            "metrics_cost_cached": _cost(spans_off_cached, disabled_cached),
        }
        for ratio in samplers:
            name = f"tracing-{ratio:g}"
            cached, healthz = rps(name, "cached", conns), rps(name, "healthz", conns)
            per[name] = {
                "cached_vs_healthz": _ratio(cached, healthz),
                # spans and metrics together, against the SDK disabled
                "tracing_cost_cached": _cost(cached, disabled_cached),
                "tracing_cost_healthz": _cost(healthz, disabled_healthz),
                # the spans alone, against the same SDK with the always_off sampler
                "span_cost_cached": _cost(cached, spans_off_cached),
                "span_cost_healthz": _cost(healthz, spans_off_healthz),
            }
        ratios[str(conns)] = per
        bare_cpu = cpu(BARE_SERVER, "bare", conns)
        vs_bare[str(conns)] = {
            config: {
                **{
                    workload: _ratio(rps(config, workload, conns), bare)
                    for workload in ("cached", "healthz")
                },
                # The same share from CPU time per request (bare's / ours): what the server
                # could serve with a core to itself.
                **{
                    f"{workload}_by_cpu": _ratio(bare_cpu, cpu(config, workload, conns))
                    for workload in ("cached", "healthz")
                },
            }
            for config in [f"tracing-{ratio:g}" for ratio in samplers]
            + ["spans-off", "sdk-disabled"]
        }
    zipf = [run for run in runs if run["workload"] in ("zipf", "zipf-steady")]
    errors_at = {
        str(conns): sum(run["errors"] for run in runs if run["connections"] == conns)
        for conns in connections
    }
    targets = [
        {
            "workload": workload,
            "server": config,
            "connections": conns,
            "at_least": least,
            "measured": vs_bare[str(conns)].get(config, {}).get(workload),
            "met": (vs_bare[str(conns)].get(config, {}).get(workload) or 0) >= least,
        }
        for conns in connections
        for (workload, config), least in TARGETS_VS_BARE.items()
    ]
    return {
        "rows": aggregate(runs),
        "vs_bare": vs_bare,
        "targets_vs_bare": targets,
        "ratios": ratios,
        "zipf_hit_rates": [run.get("cache") for run in zipf],
        "errors_by_connections": errors_at,
    }


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (server, workload, connections): medians over its repeats, errors summed."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["config"], run["workload"], run["connections"]), []).append(run)
    rows = []
    for (config, workload, conns), group in groups.items():

        def median(key: str, group: list[dict[str, Any]] = group) -> float:
            return float(statistics.median(float(run[key]) for run in group))

        rows.append(
            {
                "config": config,
                "workload": workload,
                "connections": conns,
                "runs": len(group),
                "rps": median("rps"),
                "rps_min": min(float(run["rps"]) for run in group),
                "rps_max": max(float(run["rps"]) for run in group),
                "cpu_us_per_request": _median_of(group, "cpu_us_per_request"),
                "p50_ms": median("p50_ms"),
                "p95_ms": median("p95_ms"),
                "p99_ms": median("p99_ms"),
                "max_ms": max(float(run["max_ms"]) for run in group),
                "errors": sum(run["errors"] for run in group),
                "non_2xx": sum(run["non_2xx"] for run in group),
                "throttled": sum(run.get("throttled", 0) for run in group),
                "socket_errors": sum(sum(run["socket_errors"].values()) for run in group),
                "cache": group[-1].get("cache"),
                "load_average_1m": median("load_average_1m_before"),
            }
        )
    return rows


def _table(runs: list[dict[str, Any]]) -> Table:
    table = Table(title="HTTP load (wrk, loopback; latency in ms)")
    for header in (
        "server",
        "workload",
        "conns",
        "req/s",
        "p50",
        "p95",
        "p99",
        "max",
        "errors",
        "hit rate",
        "load1",
    ):
        table.add_column(header)
    for run in aggregate(runs):
        cache = run.get("cache") or {}
        rate = cache.get("hit_rate")
        spread = f" ({run['rps_min']:,.0f} to {run['rps_max']:,.0f})" if run["runs"] > 1 else ""
        table.add_row(
            run["config"],
            run["workload"],
            str(run["connections"]),
            f"{run['rps']:,.0f}{spread}",
            f"{run['p50_ms']:.1f}",
            f"{run['p95_ms']:.1f}",
            f"{run['p99_ms']:.1f}",
            f"{run['max_ms']:.0f}",
            (
                str(run["errors"])
                if not run["errors"]
                else f"{run['errors']} ({run['non_2xx']} non-2xx, {run['socket_errors']} socket)"
            )
            + (f" + {run['throttled']} 429" if run["throttled"] else ""),
            "—" if rate is None else f"{rate:.1%}",
            f"{run['load_average_1m']:.1f}",
        )
    return table


def _vs_bare_table(runs: list[dict[str, Any]], summary: dict[str, Any]) -> Table:
    """The issue's table: medians (range) of req/s, and the shares of the bare app's."""
    table = Table(title="Against a bare FastAPI app (medians of interleaved rounds; range)")
    for header in (
        "conns",
        "server",
        "cached",
        "its /healthz",
        "bare FastAPI",
        "cached ÷ bare",
        "healthz ÷ bare",
        "by CPU/req: cached",
        "healthz",
    ):
        table.add_column(header)
    rows = {(row["config"], row["workload"], row["connections"]): row for row in aggregate(runs)}

    def cell(config: str, workload: str, conns: int) -> str:
        row = rows.get((config, workload, conns))
        if row is None:
            return "—"
        cpu = row.get("cpu_us_per_request")
        return f"{row['rps']:,.0f} ({row['rps_min']:,.0f} to {row['rps_max']:,.0f})" + (
            "" if cpu is None else f", {cpu:.0f} µs CPU"
        )

    for conns, per in summary["vs_bare"].items():
        for config, shares in per.items():
            table.add_row(
                conns,
                config,
                cell(config, "cached", int(conns)),
                cell(config, "healthz", int(conns)),
                cell(BARE_SERVER, "bare", int(conns)),
                _pct(shares["cached"]),
                _pct(shares["healthz"]),
                _pct(shares["cached_by_cpu"]),
                _pct(shares["healthz_by_cpu"]),
            )
    return table


def _ratios_table(summary: dict[str, Any], samplers: list[float]) -> Table:
    table = Table(title="Telemetry costs (same run): throughput lost against the SDK disabled")
    for header in (
        "conns",
        "tracing",
        "cached/healthz (same server)",
        "telemetry cost, cached",
        "telemetry cost, healthz",
        "span cost, cached",
        "span cost, healthz",
    ):
        table.add_column(header)
    for conns, per in summary["ratios"].items():
        for ratio in samplers:
            row = per[f"tracing-{ratio:g}"]
            table.add_row(
                conns,
                f"sampler {ratio:g}",
                _pct(row["cached_vs_healthz"]),
                _pct(row["tracing_cost_cached"]),
                _pct(row["tracing_cost_healthz"]),
                _pct(row["span_cost_cached"]),
                _pct(row["span_cost_healthz"]),
            )
        off = per["spans-off"]
        table.add_row(
            conns,
            "spans off (metrics on)",
            _pct(off["cached_vs_healthz"]),
            _pct(off["metrics_cost_cached"]),
            *["—"] * 3,
        )
        table.add_row(
            conns, "SDK disabled", _pct(per["sdk-disabled"]["cached_vs_healthz"]), *["—"] * 4
        )
    return table


def _under_writes_table(result: dict[str, Any]) -> Table:
    cache = result["cache"]
    table = Table(
        title=f"Zipf mix from an empty cache, {result['connections']} connections,"
        f" {cache['writes_per_minute']:g} booking writes/min ({cache['write_salons']} salons):"
        f" hit rate per minute (hit + stale) / (hit + stale + miss + error)"
    )
    columns = ("minute", "lookups", "hit", "stale", "miss", "error", "writes", "hit rate")
    for column in (*columns, "ceiling (first requests miss)"):
        table.add_column(column, justify="right")
    for minute in cache["per_minute"]:
        table.add_row(
            str(minute["minute"]),
            f"{minute['lookups']:,}",
            f"{minute['hits']:,}",
            f"{minute['stale']:,}",
            f"{minute['misses']:,}",
            f"{minute['errors']:,}",
            str(minute["writes"]),
            _pct1(minute["hit_rate"]),
            _pct1(minute["ceiling"]),
        )
    after = cache["after_first_minute"]
    if after is not None:
        table.add_row(
            "2 to end",
            f"{after['lookups']:,}",
            f"{after['hits']:,}",
            f"{after['stale']:,}",
            f"{after['misses']:,}",
            f"{after['errors']:,}",
            str(sum(minute["writes"] for minute in cache["per_minute"][1:])),
            _pct1(after["hit_rate"]),
            _pct1(after_ceiling(cache["per_minute"][1:])),
        )
    return table


def after_ceiling(minutes: list[dict[str, Any]]) -> float | None:
    lookups = sum(minute["lookups"] for minute in minutes)
    first = sum(minute["first_requests"] for minute in minutes)
    return round(1 - first / lookups, 4) if lookups else None


def _pct1(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"


def main() -> None:
    parser = argparse.ArgumentParser(description="HTTP load test (make loadtest).")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per run")
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved rounds of bare, healthz and cached"
    )
    parser.add_argument(
        "--mix",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also the uncached and Zipf runs (--no-mix: only the rounds against bare)",
    )
    parser.add_argument(
        "--mix-duration", type=float, default=10.0, help="seconds per uncached and Zipf run"
    )
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per kind")
    parser.add_argument(
        "--zipf-steady",
        type=float,
        default=40.0,
        help="seconds of a last Zipf run, after the others (0: none)",
    )
    parser.add_argument("--connections", default="50")
    parser.add_argument("--samplers", default="1.0,0.1", help="trace sampling ratios")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--timeout", type=float, default=10.0, help="wrk request timeout, s")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--redis-db", type=int, default=15)
    parser.add_argument(
        "--hit-rate-minutes",
        type=float,
        default=5.0,
        help="minutes of the Zipf mix from an empty cache under booking writes, hit rate per"
        " minute (0: none)",
    )
    parser.add_argument("--writes-per-minute", type=float, default=30.0)
    parser.add_argument(
        "--write-salons",
        choices=("uniform", "zipf"),
        default="uniform",
        help="salons written: uniformly, or with the reads' popularity",
    )
    parser.add_argument(
        "--hit-rate-only",
        action="store_true",
        help="run only the hit-rate run under writes (one server, tracing at the first ratio)",
    )
    args = parser.parse_args()
    if args.hit_rate_only and args.hit_rate_minutes <= 0:
        parser.error("--hit-rate-only needs --hit-rate-minutes > 0")
    connections = [int(c) for c in args.connections.split(",") if c]
    samplers = [float(s) for s in args.samplers.split(",") if s]
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    started = time.perf_counter()
    if shutil.which("wrk") is None and not Path("/usr/bin/wrk").exists():
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk)")
    limits = raise_open_files()
    if limits[0] != resource.RLIM_INFINITY and limits[0] < max(connections) * 2 + 256:
        console.print(
            f"[yellow]open files limit {limits[0]} may be too low for "
            f"{max(connections)} connections[/]"
        )
    signal.signal(signal.SIGTERM, _on_signal)

    settings = get_settings()
    dataset = ensure_dataset(log=console.log, stream=True)
    salon_ids, busiest = _salons(dataset.url)
    redis_url = _redis_url(settings.redis_url, args.redis_db)
    workdir = Path(tempfile.mkdtemp(prefix="salon-reports-loadtest-"))
    zipf_count = 200_000
    workloads = build_workloads(
        workdir, settings.jwt_secret, salon_ids, busiest, dataset.seeded_on, zipf_count
    )
    console.log(f"dataset {dataset.as_dict()}; redis db {args.redis_db}; scripts in {workdir}")
    runs: list[dict[str, Any]] = []
    timings: dict[str, Any] = {}
    server_stats: dict[str, Any] = {}
    uncached_offset = 0
    zipf_offset = 0
    servers: list[Server] = []
    failure: str | None = None
    owner = _owner_token(workloads, busiest)
    under_writes: dict[str, Any] | None = None

    def record(result: dict[str, Any], config: Config, kind: str, path: str) -> None:
        result.update(config=config.name, tracing=config.tracing, workload=kind, path=path)
        runs.append(result)
        rate = (result.get("cache") or {}).get("hit_rate")
        console.log(
            f"{config.name:<14} {kind:<11} c={result['connections']:<4} {result['rps']:>9,.0f}"
            f" req/s p50 {result['p50_ms']:.1f} p99 {result['p99_ms']:.1f} ms"
            f" errors {result['errors']}" + ("" if rate is None else f" hit rate {rate}")
        )

    try:
        plan = configs(samplers)[:1] if args.hit_rate_only else configs(samplers)
        for config in plan:
            env = server_env(dict(os.environ), dataset, redis_url, settings.jwt_secret, config.env)
            server = Server(config.name, env, args.workers, workdir / f"{config.name}.log")
            servers.append(server)
            server.start()
            console.log(f"server {config.name} ({config.tracing}) on {server.base}")
            clear_cache(server, workloads.admin_token)
            body = check_report(server, workloads.cached.path, owner)
            if args.hit_rate_only:
                continue
            for workload in (workloads.healthz, workloads.cached):
                if args.warmup > 0:
                    run_wrk(server, workload, connections[0], args.warmup, args.threads, 10)
            timings[config.name] = idle_timing(server, workloads.cached.path, owner)
        # The bare app answers the very bytes of the cached dashboard (same size).
        bare_config = Config(BARE_SERVER, "bare FastAPI app (benchmarks.bare_app)", {})
        bare = Server(BARE_SERVER, dict(os.environ), args.workers, workdir / "bare.log")
        if not args.hit_rate_only:
            (workdir / "dashboard.json").write_bytes(body)
            bare.command = [
                *(sys.executable, "-m", "benchmarks.bare_app", "--port", str(bare.port)),
                *("--workers", str(args.workers), "--body-file", str(workdir / "dashboard.json")),
            ]
            bare.ready_path = bare_app.PATH
            servers.append(bare)
            bare.start()
            if args.warmup > 0:
                run_wrk(bare, workloads.bare, connections[0], args.warmup, args.threads, 10)

        # 1. Throughput ratios: the bare app, then healthz and cached on every server,
        # interleaved and repeated, so that the machine's drift and noise fall on every
        # configuration alike (medians kept).
        for _ in range(0 if args.hit_rate_only else args.repeats):
            for conns in connections:
                runs_of_round = [(bare_config, bare, "bare", workloads.bare)]
                for config, server in zip(plan, servers, strict=False):
                    runs_of_round.append((config, server, "healthz", workloads.healthz))
                    runs_of_round.append((config, server, "cached", workloads.cached))
                for config, server, kind, workload in runs_of_round:
                    result = run_wrk(
                        server, workload, conns, args.duration, args.threads, args.timeout
                    )
                    record(result, config, kind, workload.path)

        # 2. Misses and the Zipf mix, on the servers that run them (the first one).
        for config, server in zip(plan, servers, strict=False):
            for kind in (
                ("uncached", "zipf")
                if config.misses and args.mix and not args.hit_rate_only
                else ()
            ):
                steps = [(i, conns, args.mix_duration) for i, conns in enumerate(connections)]
                if kind == "zipf" and args.zipf_steady > 0:
                    # then the same mix, on, for longer: the hit rate once warm
                    steps.append((len(connections), connections[0], args.zipf_steady))
                for index, conns, duration in steps:
                    if kind == "uncached":
                        # Each run its own slice of the list: no key is requested twice.
                        share = workloads.uncached_count // len(connections)
                        workload = workloads.uncached(uncached_offset, share // args.threads)
                        uncached_offset += share
                    else:
                        if index == 0:  # the first Zipf run starts from an empty cache
                            clear_cache(server, workloads.admin_token)
                        workload = workloads.zipf(zipf_offset, args.threads)
                    before = cache_counts(server, workloads.admin_token)
                    result = run_wrk(server, workload, conns, duration, args.threads, args.timeout)
                    result["cache"] = hit_rate(before, cache_counts(server, workloads.admin_token))
                    if kind == "zipf":
                        result["cache"]["distinct_keys_requested"] = workloads.distinct_keys(
                            zipf_offset, result["requests"]
                        )
                        result["cache"]["started_cold"] = index == 0
                        zipf_offset += result["requests"]
                    steady = kind == "zipf" and index == len(connections)
                    record(result, config, "zipf-steady" if steady else kind, workload.path)

        # 3. The hit rate, minute by minute, from an empty cache under booking writes.
        if args.hit_rate_minutes > 0:
            writer = BookingWriter(
                dataset.url,
                salon_ids,
                dataset.seeded_on,
                args.writes_per_minute,
                args.write_salons,
            )
            result = hit_rate_under_writes(
                servers[0],
                workloads,
                writer,
                args.hit_rate_minutes,
                connections[0],
                args.threads,
                args.timeout,
                console.log,
            )
            record(result, plan[0], "zipf+writes", f"{PREFIX}/…")
            under_writes = result

        for config, server in zip(plan, servers, strict=False):
            final = read_stats(server, workloads.admin_token)
            server_stats[config.name] = {
                "endpoints": final["since_start"]["endpoints"],
                "pool": final.get("pool"),
                "alerts": final.get("alerts"),
            }
    except (Interrupted, KeyboardInterrupt) as error:
        failure = f"interrupted: {error}"
    except Exception as error:
        failure = f"{type(error).__name__}: {error}"
        console.print_exception()
    finally:
        for server in servers:
            server.stop()
        # The scripts and the token list carry signed tokens; the server logs stay for reading.
        for secret in [*workdir.glob("*.lua"), workdir / "tokens.txt"]:
            secret.unlink(missing_ok=True)

    summary = summarise(runs, samplers, connections)
    summary["zipf_simulated_steady_state"] = (
        [] if args.hit_rate_only else steady_state(runs, salon_ids, dataset.seeded_on, settings)
    )
    console.print(_table(runs))
    if runs and not args.hit_rate_only:
        console.print(_vs_bare_table(runs, summary))
        console.print(_ratios_table(summary, samplers))
        for target in summary["targets_vs_bare"]:
            console.print(
                f"target: {target['workload']} on {target['server']} >= {target['at_least']:.0%}"
                f" of bare at {target['connections']} connections: measured"
                f" {_pct(target['measured'])}, {'met' if target['met'] else 'NOT met'}"
            )
    for estimate in summary["zipf_simulated_steady_state"]:
        console.print(
            f"Zipf mix, simulated steady state at {estimate['rps']:,.0f} req/s (TTLs"
            f" {estimate['ttls_s']}, stale grace {estimate['stale_grace_s']} s, no writes):"
            f" hit rate {estimate['hit_rate']:.1%}"
        )
    if under_writes is not None:
        console.print(_under_writes_table(under_writes))
    for name, timing in timings.items():
        if "error" in timing:
            console.print(f"idle cached request, {name}: {timing['error']}")
            continue
        console.print(
            f"idle cached request, {name}: client p50 {timing['client_p50_ms']} ms,"
            f" server total p50 {timing['server_total_p50_ms']} ms, of which cache"
            f" lookup {timing['server_cache_p50_ms']} ms"
        )
    elapsed = time.perf_counter() - started
    payload = {
        "kind": "load",
        "command": "make loadtest  (python -m benchmarks.load)",
        "args": vars(args),
        "machine": machine(),
        "dataset": dataset.as_dict(),
        "cached_salon": busiest,
        "open_files_limit": list(limits),
        "notes": [
            "wrk, server workers, PostgreSQL and Redis share the same cores",
            "no OTLP exporter endpoint: sampled spans are created, ended and dropped",
            "closed-loop load (wrk): overload shows as latency, not as dropped requests",
        ],
        "targets": {
            "vs_bare_fastapi_at_least": {
                f"{workload} on {config}": least
                for (workload, config), least in TARGETS_VS_BARE.items()
            },
            "tracing_cost_at_most": TARGET_TRACING_COST,
            "hit_rate_above": TARGET_HIT_RATE,
            "connections_without_errors": TARGET_CONNECTIONS,
        },
        "runs": runs,
        "summary": summary,
        "hit_rate_under_writes": under_writes,
        "idle_cached_request": timings,
        "server_endpoint_stats": server_stats,
        "failure": failure,
        "elapsed_s": round(elapsed, 1),
        "server_logs": str(workdir),
    }
    path = write_results("load", payload)
    console.print(f"wrote {path} in {elapsed:.0f} s; server logs in {workdir}")
    if failure:
        console.print(f"[red]load test incomplete: {failure}[/]")
        raise SystemExit(1)


def steady_state(
    runs: list[dict[str, Any]], salon_ids: list[int], today: date, settings: Any
) -> list[dict[str, Any]]:
    """The Zipf mix's simulated steady-state hit rate at the measured rate, 100 and 1000 req/s."""
    measured = [float(run["rps"]) for run in runs if run["workload"] == "zipf"]
    rates = sorted({100.0, 1000.0, *([max(measured)] if measured else [])})
    ttls = {str(name): settings.cache_ttl(name) for name in CACHED_REPORTS}
    longest = max(ttls.values()) + 600
    requests = zipf_requests(salon_ids, today, int(max(rates) * longest) + 1)
    return [simulated_hit_rate(requests, rate, ttls, settings.cache_stale_grace) for rate in rates]


def _owner_token(workloads: Workloads, salon: int) -> str:
    tokens = (workloads.directory / "tokens.txt").read_text().splitlines()
    return tokens[workloads.owner_index[salon] - 1]


if __name__ == "__main__":
    main()
