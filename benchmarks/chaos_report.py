"""A markdown table from the chaos suite's figures (``benchmarks/results/chaos-latest.json``).

python -m benchmarks.chaos_report            # prints the table
python -m benchmarks.chaos_report FILE       # from another results file

One row per scenario: the fault, the requests and their statuses per phase (before / during /
after the fault), p50 and p99 latency and the cache hit rate per phase, and the outcome.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.stats import RESULTS_DIR

RESULTS_FILE = RESULTS_DIR / "chaos-latest.json"
PHASES = ("before", "during", "after")


def _ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}" if value >= 100 else f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _rate(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.0f} %"


def _statuses(by_status: dict[str, int]) -> str:
    return ", ".join(f"{status}: {count}" for status, count in by_status.items()) or "—"


def _per_phase(scenario: dict[str, Any], cell: Any) -> str:
    phases = scenario.get("phases", {})
    return " / ".join(cell(phases[name]) if name in phases else "—" for name in PHASES)


def render(results: dict[str, Any]) -> str:
    """The markdown table (and the legend under it) for a chaos results document."""
    lines = [
        "| scenario | fault | requests | statuses during the fault | p50 ms (before / during /"
        " after) | p99 ms (before / during / after) | hit rate (before / during / after) |"
        " outcome |",
        "|---|---|---:|---|---|---|---|---|",
    ]
    for name, scenario in results.get("scenarios", {}).items():
        during = scenario.get("phases", {}).get("during", {})
        lines.append(
            "| "
            + " | ".join(
                [
                    f"`{name}`",
                    str(scenario.get("fault", "")),
                    f"{scenario.get('requests', 0):,}",
                    _statuses(during.get("by_status", {})),
                    _per_phase(scenario, lambda phase: _ms(phase.get("p50_ms"))),
                    _per_phase(scenario, lambda phase: _ms(phase.get("p99_ms"))),
                    _per_phase(scenario, lambda phase: _rate(phase.get("hit_rate"))),
                    str(scenario.get("outcome", "?")),
                ]
            )
            + " |"
        )
    notes = [
        f"- `{name}`: {scenario['notes']}"
        for name, scenario in results.get("scenarios", {}).items()
        if scenario.get("notes")
    ]
    if notes:
        lines += ["", "What each scenario checked:", "", *notes]
    lines += [
        "",
        "Statuses other than HTTP codes: `refused` (nothing listening), `no-response` (the"
        " connection closed before a response began), `cut` (a response ended mid-body),"
        " `timeout` (no answer within the client's limit). Hit rate: the share of answered"
        " report requests served by the cache (`X-Cache: HIT` or `STALE`).",
    ]
    machine = results.get("machine")
    if machine:
        lines += [
            "",
            f"Measured on {machine.get('cores')} cores, Linux {machine.get('kernel')},"
            f" Python {machine.get('python')}.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS_FILE
    if not path.exists():
        sys.exit(f"{path} does not exist: run `make chaos` first")
    sys.stdout.write(render(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
