"""``salon-reports rollups verify`` and ``rollups rebuild``, as an operator runs them."""

from __future__ import annotations

import os
import subprocess
import sys

import psycopg


def _cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": url, "REPORTS_ENVIRONMENT": "test"}
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "rollups", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_verify_finds_a_corrupted_row_and_rebuild_repairs_it(
    private: tuple[str, str],
) -> None:
    url, dsn = private
    clean = _cli(url, "verify", "--rounds", "1")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "equals its recomputation" in clean.stdout
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(
            "UPDATE platform_day_rollups SET completed = completed + 1"
            " WHERE day = (SELECT min(day) FROM platform_day_rollups)"
        )
        connection.execute("DELETE FROM salon_client_first_bookings WHERE client_id % 7 = 0")
    broken = _cli(url, "verify", "--rounds", "1")
    assert broken.returncode == 1
    assert "platform_day_rollups: +" in broken.stdout
    assert "platform_day_rollups: -" in broken.stdout
    assert "salon_client_first_bookings: -" in broken.stdout
    rebuilt = _cli(url, "rebuild")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "rebuilt" in rebuilt.stdout
    assert _cli(url, "verify", "--rounds", "1").returncode == 0
