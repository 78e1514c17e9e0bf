"""Cold vs warm response time of each cached report against a running service.

    python -m benchmarks.cold_warm [--url http://127.0.0.1:8000] [--salon 1] [--runs 10]

For each report and window: clears the cache, times the first request (cold: the SQL runs),
then times warm requests (served from Redis). Reports medians over ``--runs`` repetitions.
Needs the server's REPORTS_JWT_SECRET (read from .env like the service does).
"""

from __future__ import annotations

import statistics
import time
from datetime import date, timedelta

import httpx
import typer
from rich.console import Console
from rich.table import Table

from service.auth import issue_token
from service.config import get_settings

PREFIX = "/api/v1/optimized-reports"


def _time(client: httpx.Client, path: str, params: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    response = client.get(path, params=params)
    elapsed = (time.perf_counter() - started) * 1000
    response.raise_for_status()
    return elapsed, response.headers["x-cache"]


def main(
    url: str = "http://127.0.0.1:8000",
    salon: int = 1,
    runs: int = 10,
) -> None:
    token = issue_token(get_settings().jwt_secret, role="admin")
    today = date.today()
    windows = {
        "30 days": (today - timedelta(days=29), today),
        "365 days": (today - timedelta(days=364), today),
    }
    table = Table(title=f"cold vs warm, salon {salon} and platform-wide ({url})")
    for column in ("report", "scope", "window", "cold ms (p50)", "warm ms (p50)", "speed-up"):
        table.add_column(column)
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        for report in ("dashboard", "bookings", "professionals"):
            for scope in (str(salon), None):
                for window, (start, end) in windows.items():
                    params = {"start": start.isoformat(), "end": end.isoformat()}
                    if scope is not None:
                        params["salon_id"] = scope
                    cold, warm = [], []
                    for _ in range(runs):
                        client.post(f"{PREFIX}/cache/clear", json={}).raise_for_status()
                        elapsed, result = _time(client, f"{PREFIX}/{report}", params)
                        assert result == "MISS", result
                        cold.append(elapsed)
                        for _ in range(5):
                            elapsed, result = _time(client, f"{PREFIX}/{report}", params)
                            assert result == "HIT", result
                            warm.append(elapsed)
                    cold_ms, warm_ms = statistics.median(cold), statistics.median(warm)
                    table.add_row(
                        report,
                        "salon" if scope else "platform",
                        window,
                        f"{cold_ms:.1f}",
                        f"{warm_ms:.2f}",
                        f"{cold_ms / warm_ms:.0f}x",
                    )
    Console().print(table)


if __name__ == "__main__":
    typer.run(main)
