"""The set-up scripts run in the environment CI gives them: none of their variables set.

`make test` on a fresh clone calls `scripts/services.sh start` with no `PG_PORT`, `REDIS_PORT`
or any other of its settings in the environment; the script runs under `set -u`, so a default
that refers to another setting before that one has its own default stops it at once. These
tests run each script's argument check with an environment stripped of every setting, which
evaluates all the defaults and starts nothing.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bare_environment() -> dict[str, str]:
    """Only what a login shell has: no port, replica, cluster or database setting."""
    return {name: os.environ[name] for name in ("PATH", "HOME", "LANG") if name in os.environ}


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"REPLICA": "1", "PGBOUNCER": "1", "REDIS_CLUSTER": "1"},
        {"PG_PORT": "55500", "REDIS_PORT": "56500"},
    ],
    ids=["defaults", "every-extra", "own-ports"],
)
def test_services_script_evaluates_its_defaults_without_any_setting(
    overrides: dict[str, str],
) -> None:
    completed = subprocess.run(
        ["bash", str(ROOT / "scripts" / "services.sh"), "no-such-command"],
        env={**_bare_environment(), **overrides},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert "unbound variable" not in completed.stderr, completed.stderr
    assert completed.returncode == 1
    assert "usage:" in completed.stderr
