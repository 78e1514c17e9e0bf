"""Property-based fuzzing of every operation in the app's own ``/openapi.json`` (schemathesis).

Every check schemathesis has (positive data acceptance and negative data rejection included:
what the document allows is accepted, what it forbids is refused with a 4xx), valid and invalid
inputs, as an admin, ops, an owner and with no token, against a real server with seeded data.
Derandomized: the same examples every run.

The document cannot state three rules that involve more than one value, so a valid generated
request is made to follow them before it is sent (``_follow_the_documented_rules``):
``start`` is not after ``end`` and a period spans at most 366 days (``start`` alone ends today);
and a cursor is one the server issued (anything else is documented as a 400).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from opentelemetry.sdk.trace import TracerProvider
from schemathesis import Case
from schemathesis.checks import CHECKS, load_all_checks

from service.config import Settings
from service.main import create_app
from service.reports.params import MAX_PERIOD_DAYS
from telemetry.setup import configure
from tests.security.conftest import LiveServer

# Per operation, principal and mode (positive, negative), on top of the boundary cases of the
# coverage phase: seven operations, four principals, about two minutes in all.
MAX_EXAMPLES = 25
FUZZ = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
PRINCIPALS = ("admin", "ops", "owner", "anonymous")


@pytest.fixture(scope="module")
def http_session() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


def _published_schema() -> dict[str, Any]:
    """What ``/openapi.json`` serves; it depends on the code alone, not on the settings.

    Loaded at import (schemathesis parametrizes at collection time, before any fixture); a test
    below checks the running server publishes this very document.
    """
    config = Settings(  # type: ignore[call-arg]
        DATABASE_URL="postgresql+psycopg://unused/unused", REPORTS_ENVIRONMENT="development"
    )
    telemetry = configure(
        version="test",
        environment="test",
        slow_query_ms=500.0,
        tracer_provider=TracerProvider(),
        env={},
    )
    try:
        return create_app(config, telemetry).openapi()
    finally:
        telemetry.shutdown()


OPENAPI = _published_schema()
schema = schemathesis.openapi.from_dict(OPENAPI)


def _authorization(live_server: LiveServer, principal: str) -> dict[str, str]:
    if principal == "anonymous":
        return {}
    salons = [live_server.data["lisbon"]] if principal == "owner" else None
    return {"Authorization": f"Bearer {live_server.token(principal, salons)}"}  # type: ignore[arg-type]


def _seeded_salon(case: Case, live_server: LiveServer) -> None:
    """Point half the generated salon ids at a real salon, so reports carry data."""
    query = case.query
    if isinstance(query, dict) and isinstance(query.get("salon_id"), int) and query["salon_id"] % 2:
        query["salon_id"] = live_server.data["lisbon"]


def _day(value: Any) -> date | None:
    try:
        return date.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _follow_the_documented_rules(case: Case, live_server: LiveServer) -> None:
    """Make a valid request follow the rules the parameters' descriptions state together."""
    query = case.query
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return
    if not isinstance(query, dict):
        return
    start, end = _day(query.get("start")), _day(query.get("end"))
    if start is not None and end is not None:
        start, end = min(start, end), max(start, end)
        end = min(end, start + timedelta(days=MAX_PERIOD_DAYS - 1))
        query["start"], query["end"] = start.isoformat(), end.isoformat()
    elif start is not None:
        # Alone, the period ends today, in the salon's time zone: a day either side of UTC's.
        today = datetime.now(UTC).date()
        if not today - timedelta(days=MAX_PERIOD_DAYS - 2) <= start <= today - timedelta(days=1):
            query["end"] = start.isoformat()
    if "cursor" in query:
        issued = orjson.dumps({"after": live_server.data["pro_lisbon"]})
        query["cursor"] = base64.urlsafe_b64encode(issued).decode().rstrip("=")


@pytest.mark.parametrize("principal", PRINCIPALS)
@schema.parametrize()
@FUZZ
def test_only_declared_and_consistent_responses(
    case: Case, principal: str, live_server: LiveServer, http_session: requests.Session
) -> None:
    _seeded_salon(case, live_server)
    _follow_the_documented_rules(case, live_server)
    headers = _authorization(live_server, principal)
    if case.operation.schema.is_security_param_negated(case):
        headers = {}  # the invalid request is one without (or with a broken) Authorization
    if principal == "anonymous":
        case.headers = {
            name: value
            for name, value in (case.headers or {}).items()
            if name.lower() != "authorization"
        }
    # No `checks=`: every check schemathesis has (see test_every_check_runs).
    response = case.call_and_validate(
        base_url=live_server.url, session=http_session, headers=headers
    )
    if (
        principal == "anonymous"
        and case.path.startswith("/api/")
        and case.method == case.operation.method.upper()
    ):
        # Authentication comes first: nothing about the parameters leaks to a stranger.
        assert response.status_code == 401, response.text


def test_every_check_runs() -> None:
    """The fuzzing above runs every check schemathesis registers, none switched off."""
    load_all_checks()
    names = set(CHECKS.get_all_names())
    assert {"positive_data_acceptance", "negative_data_rejection", "ignored_auth"} <= names
    checks_config = schema.config.checks_config_for()
    for name in names:
        config = getattr(checks_config, name, None)
        assert config is None or config.enabled, f"{name} is disabled"


def test_the_fuzzed_schema_is_the_one_the_server_publishes(live_server: LiveServer) -> None:
    assert httpx.get(f"{live_server.url}/openapi.json").json() == OPENAPI


def test_the_fuzzer_reaches_seeded_data(live_server: LiveServer) -> None:
    """Guard against fuzzing an empty database: the seeded salon has bookings to report."""
    response = httpx.get(
        f"{live_server.url}/api/v1/optimized-reports/dashboard",
        params={"salon_id": live_server.data["lisbon"]},
        headers={"Authorization": f"Bearer {live_server.token('admin')}"},
    )
    assert response.status_code == 200
    assert response.json()["bookings_total"] > 0
