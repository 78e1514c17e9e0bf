"""The Prometheus command-line tools the ops tests run, and where the ops files live.

A missing tool fails the test with what to install (``make test`` installs them); it never
skips, so a machine without them cannot pass the suite silently.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "alerts"
DASHBOARDS = ROOT / "dashboards"
RULE_FILES = sorted(ALERTS.glob("*.rules.yml"))
RULE_TESTS = sorted((ALERTS / "tests").glob("*.yml"))
PROMETHEUS_CONFIG = ALERTS / "prometheus.yml"
ALERTMANAGER_CONFIG = ALERTS / "alertmanager.yml"
COMPOSE_FILE = ROOT / "docker-compose.yml"
COLLECTOR_CONFIG = ROOT / "otel-collector.yaml"
JAEGER_CONFIG = ROOT / "jaeger.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DASHBOARD_FILES = sorted(DASHBOARDS.glob("*.json"))
OPERATIONS_DOC = ROOT / "docs" / "operations.md"

_PACKAGES = {
    "promtool": "prometheus",
    "prometheus": "prometheus",
    "amtool": "prometheus-alertmanager",
    "prometheus-alertmanager": "prometheus-alertmanager",
    "alertmanager": "prometheus-alertmanager",
}


def require_tool(*names: str) -> str:
    """Path of the first of ``names`` found on PATH; fails the test when there is none."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    package = _PACKAGES.get(names[0], names[0])
    pytest.fail(
        f"{' / '.join(names)} not found on PATH: install the Debian package `{package}` "
        f"(apt-get install {package}; `make test` does it when run as root)",
        pytrace=False,
    )


def run_tool(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a tool, capturing its output (text)."""
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


def assert_tool_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"`{' '.join(result.args)}` exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
