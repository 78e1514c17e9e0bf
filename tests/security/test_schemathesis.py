"""Property-based fuzzing of every operation in the app's own ``/openapi.json`` (schemathesis).

Valid and invalid inputs, once as an admin and once with no token, against a real server with
seeded data. Every response must come from a declared status code, with the declared content
type and a body matching the declared schema; a 5xx fails the test outright.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from opentelemetry.sdk.trace import TracerProvider
from schemathesis import Case
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from service.config import Settings
from service.main import create_app
from telemetry.setup import configure
from tests.security.conftest import LiveServer

# Per operation and mode; seven operations, two principals: about 30 s in all.
MAX_EXAMPLES = 40
CHECKS: list[Callable[..., Any]] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
FUZZ = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


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


def _seeded_salon(case: Case, live_server: LiveServer) -> None:
    """Point half the generated salon ids at a real salon, so reports carry data."""
    query = case.query
    if isinstance(query, dict) and isinstance(query.get("salon_id"), int) and query["salon_id"] % 2:
        query["salon_id"] = live_server.data["lisbon"]


@schema.parametrize()
@FUZZ
def test_admin_gets_only_declared_responses(
    case: Case, live_server: LiveServer, http_session: requests.Session
) -> None:
    _seeded_salon(case, live_server)
    case.call_and_validate(
        base_url=live_server.url,
        session=http_session,
        headers={"Authorization": f"Bearer {live_server.token('admin')}"},
        checks=CHECKS,
    )


@schema.parametrize()
@FUZZ
def test_anonymous_gets_only_declared_responses(
    case: Case, live_server: LiveServer, http_session: requests.Session
) -> None:
    case.headers = {
        name: value
        for name, value in (case.headers or {}).items()
        if name.lower() != "authorization"
    }
    response = case.call_and_validate(base_url=live_server.url, session=http_session, checks=CHECKS)
    if case.path.startswith("/api/") and case.method == case.operation.method.upper():
        # Authentication comes first: nothing about the parameters leaks to a stranger.
        assert response.status_code == 401, response.text


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
