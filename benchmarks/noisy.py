"""Noisy neighbour (part of ``make loadtest``): one salon's burst of uncached reports, and
another salon's cold dashboards meanwhile.

On the benchmark dataset (``benchmarks.dataset``: 200 salons, about 5,000 bookings each, as in
the 200,000-booking demo), this starts ``salon-reports serve --workers 2`` on a free loopback
port and measures, for the *victim* (an owner of one salon), 40 cold dashboards asked one after
another (30-day windows never asked before, so each is a cache miss: ``X-Cache: MISS`` is
checked):

- **alone**: nothing else running;
- **under the burst**: while wrk runs 200 connections of the *noisy* salon's uncached
  ``professionals`` reports (its owner's token; windows of 300 to 365 days ending on different
  days, limits 1-200: nearly every request a distinct key), started 2 s before the victim.

For each: the victim's p50/p95/max and errors (anything but a 200 MISS); for the burst, wrk's
requests and statuses (200, 429 with and without ``Retry-After``, 5xx, socket errors), and the
noisy salon's row of ``fairness.tenants`` in ``/performance/stats``; the server's CPU time
over the burst (its whole process group: the master and the workers) per noisy request, and
wrk's own CPU time (the load generator's share of the machine). Run once with the default
share (``REPORTS_TENANT_MAX_CONCURRENT`` etc. unset) and once with the per-tenant share lifted
(skipped with ``--no-compare``: limit and queue 100,000; turns stay round-robin), so the effect
of the share alone shows. Target (issue 19): under the burst the victim's cold p95 within 3x its
idle p95, or at most 50 ms, and no victim error.

    python -m benchmarks.noisy [--burst-seconds 12] [--connections 200] [--no-compare]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.dataset import ensure_dataset
from benchmarks.load import (
    DONE_HOOK,
    HOST,
    PREFIX,
    STATS_PATH,
    STATS_SETTLE_SECONDS,
    Server,
    _redis_url,
    _salons,
    clear_cache,
    http_get,
    raise_open_files,
    server_env,
)
from benchmarks.stats import machine, write_results
from service.auth import issue_token
from service.config import get_settings

TARGET_RATIO = 3.0
TARGET_MS = 50.0
VICTIM_REQUESTS = 40
LIFTED = {"REPORTS_TENANT_MAX_CONCURRENT": "100000", "REPORTS_TENANT_QUEUE": "100000"}

# The noisy salon's requests: distinct (window, limit) per request, spread over the threads.
BURST_SCRIPT = """
wrk.method = "GET"
wrk.headers["Authorization"] = "Bearer {token}"
local threads = {{}}
local counter = 0
function setup(thread)
  thread:set("id", counter)
  table.insert(threads, thread)
  counter = counter + 1
end
local dates = {{}}
for line in io.lines("{dates_file}") do dates[#dates + 1] = line end
local n = 0
ok, throttled, throttled_no_retry, server_errors, other = 0, 0, 0, 0, 0
function request()
  n = n + 1
  local i = n * {threads} + id
  local ending = i % 60
  local span = 300 + math.floor(i / 60) % 66
  local path = "{prefix}/professionals?salon_id={salon}&start=" .. dates[ending + span + 1] ..
    "&end=" .. dates[ending + 1] .. "&limit=" .. (1 + math.floor(i / 3960) % 200)
  return wrk.format(nil, path)
end
function response(status, headers, body)
  if status == 200 then ok = ok + 1
  elseif status == 429 then
    throttled = throttled + 1
    if headers["retry-after"] == nil and headers["Retry-After"] == nil then
      throttled_no_retry = throttled_no_retry + 1
    end
  elseif status >= 500 then server_errors = server_errors + 1
  else other = other + 1 end
end
statuses = function()
  local totals = {{ok = 0, throttled = 0, throttled_no_retry = 0, server_errors = 0, other = 0}}
  for _, thread in ipairs(threads) do
    for name, _ in pairs(totals) do totals[name] = totals[name] + thread:get(name) end
  end
  io.write(string.format(
    "WRKSTATUS {{\\"ok\\":%d,\\"throttled\\":%d,\\"throttled_no_retry\\":%d," ..
    "\\"server_errors\\":%d,\\"other\\":%d}}\\n",
    totals.ok, totals.throttled, totals.throttled_no_retry, totals.server_errors, totals.other))
end
"""


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]


def victim_run(server: Server, token: str, salon: int, ends: list[date]) -> dict[str, Any]:
    """Cold 30-day dashboards, one after another, on one keep-alive connection."""
    connection = http.client.HTTPConnection(HOST, server.port, timeout=30)
    latencies: list[float] = []
    timings: list[tuple[float, str]] = []
    errors: list[str] = []
    try:
        for end in ends:
            start = end - timedelta(days=29)
            path = f"{PREFIX}/dashboard?salon_id={salon}&start={start}&end={end}"
            began = time.perf_counter()
            connection.request("GET", path, headers={"Authorization": f"Bearer {token}"})
            response = connection.getresponse()
            response.read()
            latencies.append((time.perf_counter() - began) * 1000)
            timings.append((latencies[-1], response.getheader("Server-Timing") or ""))
            cache = response.getheader("X-Cache")
            if response.status != 200 or cache != "MISS":
                errors.append(f"{response.status} {cache}")
    finally:
        connection.close()
    return {
        "requests": len(latencies),
        "p50_ms": round(statistics.median(latencies), 1),
        "p95_ms": round(_percentile(latencies, 0.95), 1),
        "max_ms": round(max(latencies), 1),
        "errors": errors,
        # Where the slowest went: the server's own split (cache, db, total) vs the client's.
        "slowest": [
            f"{milliseconds:.0f} ms: {split}" for milliseconds, split in sorted(timings)[-3:]
        ],
    }


def start_burst(
    server: Server, script: Path, connections: int, seconds: float, timeout: float
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds:g}s",
            f"--timeout={timeout:g}s",
            "-s",
            str(script),
            f"{server.base}{PREFIX}/professionals",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def burst_result(process: subprocess.Popen[str]) -> dict[str, Any]:
    assert process.stdout is not None
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    result: dict[str, Any] = {"wrk_cpu_s": round(usage.ru_utime + usage.ru_stime, 2)}
    for line in output.splitlines():
        if line.startswith("WRKJSON "):
            summary = json.loads(line.removeprefix("WRKJSON "))
            result["requests"] = summary["requests"]
            result["per_second"] = round(summary["requests"] / (summary["duration_us"] / 1e6))
            result["socket_errors"] = sum(
                summary[name] for name in ("connect", "read", "write", "timeout")
            )
            result["p50_ms"] = round(summary["p50_us"] / 1000, 1)
            result["p95_ms"] = round(summary["p95_us"] / 1000, 1)
        if line.startswith("WRKSTATUS "):
            result.update(json.loads(line.removeprefix("WRKSTATUS ")))
    if "requests" not in result:
        raise RuntimeError(f"wrk said:\n{output}")
    return result


def group_cpu_seconds(server: Server) -> float:
    """User and system CPU time of the server's process group so far (the master and its
    workers: ``Server.cpu_seconds`` reads the master alone)."""
    if server.process is None:
        return 0.0
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After "(comm)": pgrp is field 5, utime 14 and stime 15 (proc(5)), in clock ticks.
        if int(fields[2]) == server.process.pid:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def noisy_row(server: Server, admin: str, salon: int) -> dict[str, Any] | None:
    time.sleep(STATS_SETTLE_SECONDS)
    status, body = http_get(f"{server.base}{STATS_PATH}", admin, timeout=10)
    if status != 200:
        return None
    fairness = json.loads(body).get("fairness", {})
    for row in fairness.get("tenants", []):
        if row.get("salon_id") == salon:
            return dict(row)
    return None


def scenario(
    name: str,
    env: dict[str, str],
    workdir: Path,
    tokens: dict[str, str],
    salons: tuple[int, int, int],
    seeded_on: date,
    args: argparse.Namespace,
    console: Console,
) -> dict[str, Any]:
    noisy, victim, warm = salons
    server = Server(name, env, 2, workdir / f"{name}.log")
    dates_file = workdir / "dates.txt"
    dates_file.write_text("".join(f"{seeded_on - timedelta(days=n)}\n" for n in range(430)))
    script = workdir / f"burst-{name}.lua"
    script.write_text(
        BURST_SCRIPT.format(
            token=tokens["noisy"],
            dates_file=dates_file,
            threads=1,
            prefix=PREFIX,
            salon=noisy,
        )
        + DONE_HOOK.replace(
            "done = function(summary, latency, requests)",
            "done = function(summary, latency, requests)\n  statuses()",
        )
    )
    try:
        server.start()
        clear_cache(server, tokens["admin"])
        # Warm the process (connections, code paths) on a third salon's cold reports.
        victim_run(server, tokens["warm"], warm, [seeded_on - timedelta(days=d) for d in range(10)])
        alone_ends = [seeded_on - timedelta(days=200 + d) for d in range(VICTIM_REQUESTS)]
        burst_ends = [seeded_on - timedelta(days=100 + d) for d in range(VICTIM_REQUESTS)]
        alone = victim_run(server, tokens["victim"], victim, alone_ends)
        console.log(f"{name}: victim alone {alone}")
        cpu_before = group_cpu_seconds(server)
        burst = start_burst(server, script, args.connections, args.burst_seconds, args.timeout)
        time.sleep(2.0)
        under = victim_run(server, tokens["victim"], victim, burst_ends)
        noisy_result = burst_result(burst)
        # The server's CPU time over the burst (the victim's 40 requests in it too), per
        # request of the noisy salon.
        server_cpu = group_cpu_seconds(server) - cpu_before
        noisy_result["server_cpu_s"] = round(server_cpu, 2)
        noisy_result["server_cpu_ms_per_request"] = (
            round(server_cpu * 1000 / noisy_result["requests"], 3)
            if noisy_result["requests"]
            else None
        )
        console.log(f"{name}: victim under the burst {under}; noisy {noisy_result}")
        row = noisy_row(server, tokens["admin"], noisy)
    finally:
        server.stop()
    ratio = under["p95_ms"] / alone["p95_ms"] if alone["p95_ms"] else None
    return {
        "name": name,
        "alone": alone,
        "under_burst": under,
        "noisy": noisy_result,
        "noisy_in_stats": row,
        "p95_ratio": None if ratio is None else round(ratio, 2),
        "meets_target": (
            (ratio is not None and ratio <= TARGET_RATIO) or under["p95_ms"] <= TARGET_MS
        )
        and not under["errors"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Noisy neighbour scenario (make loadtest).")
    parser.add_argument("--connections", type=int, default=200, help="the noisy salon's")
    parser.add_argument("--burst-seconds", type=float, default=12.0)
    parser.add_argument("--timeout", type=float, default=10.0, help="wrk request timeout, s")
    parser.add_argument("--redis-db", type=int, default=15)
    parser.add_argument(
        "--no-compare", action="store_true", help="skip the run with the per-tenant share lifted"
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for both servers (e.g. REPORTS_TENANT_QUEUE=32)",
    )
    args = parser.parse_args()
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    raise_open_files()
    settings = get_settings()
    dataset = ensure_dataset(log=console.log, stream=True)
    salon_ids, _ = _salons(dataset.url)
    noisy, victim, warm = salon_ids[0], salon_ids[1], salon_ids[2]
    secret = settings.jwt_secret

    def owner(salon: int) -> str:
        return issue_token(secret, role="owner", salon_ids=[salon], ttl_seconds=3600)

    tokens = {
        "admin": issue_token(secret, role="admin", ttl_seconds=3600),
        "noisy": owner(noisy),
        "victim": owner(victim),
        "warm": owner(warm),
    }
    redis_url = _redis_url(settings.redis_url, args.redis_db)
    workdir = Path(tempfile.mkdtemp(prefix="salon-reports-noisy-"))
    base = dict(os.environ)
    runs = []
    plans: list[tuple[str, dict[str, str]]] = [("share", {})] + (
        [] if args.no_compare else [("share-lifted", LIFTED)]
    )
    for name, extra in plans:
        # The production recommendation: a tenth of the traces (docs/operations.md).
        sampling = {
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.1",
        }
        given = dict(item.split("=", 1) for item in args.env)
        env = server_env(base, dataset, redis_url, secret, {**sampling, **given, **extra})
        runs.append(
            scenario(
                name, env, workdir, tokens, (noisy, victim, warm), dataset.seeded_on, args, console
            )
        )

    table = Table(title=f"Noisy neighbour: salon {noisy} bursts, salon {victim}'s cold dashboards")
    for column in (
        "server",
        "victim alone p50/p95/max ms",
        "under burst p50/p95/max ms",
        "p95 ratio",
        "victim errors",
        "noisy req/s",
        "noisy 200 / 429 / 5xx",
        "server CPU ms / noisy req (wrk CPU s)",
        "target",
    ):
        table.add_column(column)
    for run in runs:
        alone, under, noisy_result = run["alone"], run["under_burst"], run["noisy"]
        table.add_row(
            run["name"],
            f"{alone['p50_ms']} / {alone['p95_ms']} / {alone['max_ms']}",
            f"{under['p50_ms']} / {under['p95_ms']} / {under['max_ms']}",
            str(run["p95_ratio"]),
            str(len(under["errors"])),
            str(noisy_result["per_second"]),
            f"{noisy_result.get('ok')} / {noisy_result.get('throttled')} / "
            f"{noisy_result.get('server_errors')}",
            f"{noisy_result.get('server_cpu_ms_per_request')} ({noisy_result.get('wrk_cpu_s')})",
            "met" if run["meets_target"] else "MISSED",
        )
    console.print(table)
    path = write_results(
        "noisy",
        {
            "machine": machine(),
            "dataset": dataset.as_dict(),
            "salons": {"noisy": noisy, "victim": victim},
            "connections": args.connections,
            "burst_seconds": args.burst_seconds,
            "target": f"p95 under the burst <= {TARGET_RATIO}x idle p95 or <= {TARGET_MS} ms",
            "runs": runs,
        },
    )
    console.log(f"results in {path}")


if __name__ == "__main__":
    main()
