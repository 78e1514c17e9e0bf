"""Markdown tables from the latest benchmark results, for docs/performance.md.

python -m benchmarks.report            # both, from benchmarks/results/*-latest.json
python -m benchmarks.report queries    # one of them
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.stats import RESULTS_DIR


def _load(kind: str) -> dict[str, Any] | None:
    path = RESULTS_DIR / f"{kind}-latest.json"
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(Path(path).read_text())
    return data


def _ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _machine(data: dict[str, Any]) -> str:
    machine = data["machine"]
    return (
        f"{machine['cores']} cores ({machine['cpu']}), {machine['memory_gib']} GiB,"
        f" Linux {machine['kernel']}, Python {machine['python']}, commit"
        f" {machine['git_commit']}, load average at the end {machine['load_average']}"
    )


def queries_markdown(data: dict[str, Any]) -> str:
    lines = [
        f"`{data['command']}` — {data['elapsed_s']:.0f} s; {_machine(data)}.",
        f"Dataset: {data['dataset']['bookings']:,} bookings, {data['dataset']['params']['salons']}"
        f" salons, {data['dataset']['params']['days']} days, seed"
        f" {data['dataset']['params']['seed']}; windows end {data['dataset']['seeded_on']}; salon"
        f" {data['salon']['id']} ({data['salon']['timezone']}) is the busiest"
        f" ({data['salon']['bookings']:,} bookings).",
        "",
        "| report | window | bookings in window | optimised p50 / p95 / max ms (n)"
        " | p95 < 100 ms | naive p50 / p95 ms (n) | speed-up (p50)"
        " | plan: top node; hottest node (exclusive ms) |",
        "|---|---|--:|--:|:-:|--:|--:|---|",
    ]
    for row in data["rows"]:
        opt, naive = row["optimised"], row["naive"]
        if naive is None:
            naive_text = "not run"
        elif naive["n"] == 0:
            naive_text = f"> {naive['lower_bound_ms'] / 1000:,.0f} s (cut short, 0 finished)"
        else:
            naive_text = f"{_ms(naive['p50_ms'])} / {_ms(naive['p95_ms'])} ({naive['n']})"
        speedup = row["speedup"]
        speed_text = (
            "—"
            if speedup is None
            else (f"≥ {speedup:,.0f}x" if row["speedup_is_lower_bound"] else f"{speedup:,.0f}x")
        )
        plan = opt["plans"][0] if opt["plans"] else {}
        lines.append(
            f"| {row['report']} | {row['window']} | {row['bookings_in_window']:,}"
            f" | {_ms(opt['p50_ms'])} / {_ms(opt['p95_ms'])} / {_ms(opt['max_ms'])} ({opt['n']})"
            f" | {'yes' if row['meets_p95_target'] else '**no**'} | {naive_text} | {speed_text}"
            f" | {plan.get('top_node', '—')}; {plan.get('hottest_node', '—')}"
            f" ({_ms(plan.get('hottest_exclusive_ms'))}) |"
        )
    return "\n".join(lines)


def load_markdown(data: dict[str, Any]) -> str:
    lines = [
        f"`{data['command']}` — {data['elapsed_s']:.0f} s; {_machine(data)}.",
        f"wrk {data['args']['threads']} thread(s); bare and cached: {data['args']['repeats']}"
        f" interleaved rounds of {data['args']['duration']:g} s per server (medians, range in"
        f" brackets); uncached and Zipf: {data['args']['mix_duration']:g} s, the last Zipf run"
        f" {data['args']['zipf_steady']:g} s; timeout {data['args']['timeout']:g} s,"
        f" {data['args']['workers']} uvicorn workers; wrk, the workers, PostgreSQL and Redis"
        " share the cores.",
        "",
        "| server | workload | connections | req/s | p50 ms | p95 ms | p99 ms | errors |"
        " hit rate |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for run in data["summary"]["rows"]:
        cache = run.get("cache") or {}
        rate = cache.get("hit_rate")
        errors = str(run["errors"])
        if run["errors"]:
            errors += f" ({run['non_2xx']} non-2xx)"
        spread = f" ({run['rps_min']:,.0f} to {run['rps_max']:,.0f})" if run["runs"] > 1 else ""
        lines.append(
            f"| {run['config']} | {run['workload']} | {run['connections']}"
            f" | {run['rps']:,.0f}{spread}"
            f" | {run['p50_ms']:.1f} | {run['p95_ms']:.1f} | {run['p99_ms']:.1f} | {errors}"
            f" | {'—' if rate is None else f'{rate:.1%}'} |"
        )

    def pct(value: float | None) -> str:
        return "—" if value is None else f"{value:.0%}"

    rows = {(r["config"], r["workload"], r["connections"]): r for r in data["summary"]["rows"]}

    def cell(config: str, workload: str, conns: str) -> str:
        row = rows.get((config, workload, int(conns)))
        if row is None:
            return "—"
        cpu = row.get("cpu_us_per_request")
        return f"{row['rps']:,.0f} ({row['rps_min']:,.0f} to {row['rps_max']:,.0f})" + (
            "" if cpu is None else f"; {cpu:.0f} µs"
        )

    lines += [
        "",
        "Against the bare FastAPI app (`benchmarks/bare_app.py`): req/s, median (range) of the"
        " interleaved rounds; server CPU time per request after the semicolon.",
        "",
        "| connections | configuration | cached dashboard | its `/healthz` | bare FastAPI"
        " | cached ÷ bare | healthz ÷ bare | by CPU per request: cached ÷ bare, healthz ÷ bare |",
        "|--:|---|--:|--:|--:|--:|--:|--:|",
    ]
    for conns, per in data["summary"].get("vs_bare", {}).items():
        for config, shares in per.items():
            lines.append(
                f"| {conns} | {config} | {cell(config, 'cached', conns)}"
                f" | {cell(config, 'healthz', conns)} | {cell('bare-fastapi', 'bare', conns)}"
                f" | {pct(shares['cached'])} | {pct(shares['healthz'])}"
                f" | {pct(shares.get('cached_by_cpu'))}, {pct(shares.get('healthz_by_cpu'))} |"
            )
    lines += [
        "",
        "| connections | telemetry | cached ÷ healthz (same server) | spans + metrics cost,"
        " cached (vs SDK disabled) | spans + metrics cost, healthz | span cost, cached (vs"
        " always_off sampler, metrics on) | span cost, healthz |",
        "|--:|---|--:|--:|--:|--:|--:|",
    ]
    for conns, per in data["summary"]["ratios"].items():
        for name, row in per.items():
            if name == "sdk-disabled":
                lines.append(
                    f"| {conns} | SDK disabled | {pct(row['cached_vs_healthz'])} | — | — | — | — |"
                )
                continue
            if name == "spans-off":
                lines.append(
                    f"| {conns} | spans off (always_off sampler), metrics on"
                    f" | {pct(row['cached_vs_healthz'])} | {pct(row['metrics_cost_cached'])}"
                    " | — | — | — |"
                )
                continue
            lines.append(
                f"| {conns} | {name.replace('tracing-', 'sampler ')}"
                f" | {pct(row['cached_vs_healthz'])}"
                f" | {pct(row['tracing_cost_cached'])} | {pct(row['tracing_cost_healthz'])}"
                f" | {pct(row.get('span_cost_cached'))} | {pct(row.get('span_cost_healthz'))} |"
            )
    estimates = data["summary"].get("zipf_simulated_steady_state") or []
    if estimates:
        lines.append("")
        lines.append(
            "Zipf mix, simulated steady state (same request list, the cache's TTLs and stale"
            " grace, no writes): "
            + ", ".join(f"{e['hit_rate']:.1%} at {e['rps']:,.0f} req/s" for e in estimates)
            + "."
        )
    return "\n".join(lines)


def main() -> None:
    kinds = sys.argv[1:] or ["queries", "load"]
    for kind in kinds:
        data = _load(kind)
        if data is None:
            target = "bench" if kind == "queries" else "loadtest"
            print(f"(no {kind} results yet: run `make {target}`)")
            continue
        print(queries_markdown(data) if kind == "queries" else load_markdown(data))
        print()


if __name__ == "__main__":
    main()
