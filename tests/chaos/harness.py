"""What every chaos scenario does around its fault: the data, the reference answers, the
warm-up, and the entry it leaves in ``benchmarks/results/chaos-latest.json``."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg

from benchmarks.stats import RESULTS_DIR
from service.auth import issue_token
from service.config import Settings
from tests.chaos.load import Call, LoadGenerator, Sample, standard_mix
from tests.chaos.servers import PostgresCluster
from tests.conftest import RunningApi

RESULTS_FILE = RESULTS_DIR / "chaos-latest.json"
DATABASE = "salon_reports_chaos"


@dataclass
class ChaosData:
    """The private cluster, its seeded database and the tokens of this session."""

    cluster: PostgresCluster
    secret: str
    salons: list[int]
    today: date

    @property
    def database_url(self) -> str:
        return self.cluster.url(DATABASE)

    @property
    def dsn(self) -> str:
        return self.cluster.dsn(DATABASE)

    def token(self, role: str, salons: list[int] | None = None) -> str:
        return issue_token(self.secret, role=role, salon_ids=salons, ttl_seconds=3600)  # type: ignore[arg-type]

    def mix(self, *, cold: bool = False) -> list[Call]:
        owners = {salon: self.token("owner", [salon]) for salon in self.salons}
        return standard_mix(self.today, self.salons, owners, self.token("admin"), cold=cold)

    def personal_strings(self) -> list[str]:
        """What must never reach telemetry: emails, salon and professional names."""
        with psycopg.connect(self.dsn) as connection:
            rows = connection.execute(
                "SELECT email FROM users UNION ALL SELECT name FROM salons "
                "UNION ALL SELECT name FROM professionals"
            ).fetchall()
        return sorted({row[0] for row in rows if len(row[0]) >= 6})


def reference_settings(data: ChaosData) -> Settings:
    return Settings.model_validate(
        {
            "DATABASE_URL": data.database_url,
            "REPORTS_READ_DATABASE_URL": None,
            "REDIS_URL": "",  # no cache: every answer is a fresh computation
            "REPORTS_ENVIRONMENT": "test",
            "REPORTS_JWT_SECRET": data.secret,
        }
    )


async def reference_bodies(data: ChaosData, calls: list[Call]) -> dict[int, Any]:
    """Every warm call answered by an in-process app without a cache (``X-Cache: BYPASS``)."""
    expected: dict[int, Any] = {}
    async with RunningApi(reference_settings(data)) as api:
        for index, call in enumerate(calls):
            if call.cold:
                continue
            response = await api.get(call.path, call.token, params=dict(call.params))
            assert response.status_code == 200, response.text
            assert response.headers["x-cache"] == "BYPASS"
            expected[index] = orjson.loads(response.content)
    return expected


async def warm(load: LoadGenerator, rounds: int = 2) -> list[Sample]:
    """Each warm call once per round, in order, before the timed phases."""
    samples = []
    load.phase = "warm-up"
    for _ in range(rounds):
        for index, call in enumerate(load.calls):
            if not call.cold:
                samples.append(await load.send(index))
    bad = [sample for sample in samples if sample.status != 200 or sample.correct is False]
    assert not bad, f"warm-up failed: {[(s.call, s.kind, s.correct) for s in bad]}"
    return samples


def write_entry(name: str, entry: dict[str, Any]) -> None:
    """Replace this scenario's entry in chaos-latest.json, keeping the others."""
    results: dict[str, Any] = {}
    if RESULTS_FILE.exists():
        try:
            results = json.loads(RESULTS_FILE.read_text())
        except json.JSONDecodeError:
            results = {}
    scenarios = results.get("scenarios", {})
    scenarios[name] = {"recorded_at": datetime.now(UTC).isoformat(timespec="seconds"), **entry}
    results = {
        "command": "make chaos",
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "kernel": platform.release(),
        },
        "scenarios": dict(sorted(scenarios.items(), key=lambda item: item[1].get("order", 99))),
    }
    Path(RESULTS_FILE).parent.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(json.dumps(results, indent=2) + "\n")
