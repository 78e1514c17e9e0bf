"""Token verification: clock-skew leeway, issuer and audience, and the memory of verified tokens."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from service.auth import InvalidToken, TokenVerifier, decode_token, issue_token
from service.config import Settings
from tests.conftest import Api, RunningApi, app_settings

SECRET = "s" * 40
STATS = "/api/v1/optimized-reports/performance/stats"
ISSUER = "https://auth.salons.example"
AUDIENCE = "salon-reports"


def signed(secret: str = SECRET, **claims: Any) -> str:
    """An ops token issued now, with ``claims`` added or replaced."""
    now = int(time.time())
    return jwt.encode(
        {"sub": "ops-1", "role": "ops", "iat": now, "exp": now + 600, **claims},
        secret,
        algorithm="HS256",
    )


# -- the memory of verified tokens -------------------------------------------------------


def test_a_verified_token_is_remembered_but_its_expiry_still_checked() -> None:
    verifier = TokenVerifier(SECRET, leeway=0)
    token = issue_token(SECRET, role="owner", salon_ids=[3], ttl_seconds=1)
    principal = verifier.verify(token)
    assert principal.role == "owner"
    assert principal.salon_ids == frozenset({3})
    assert verifier.verify(token) is principal  # from memory
    time.sleep(max(0.0, principal.expires_at - time.time()) + 0.05)
    with pytest.raises(InvalidToken):
        verifier.verify(token)


def test_a_changed_token_is_verified_afresh() -> None:
    verifier = TokenVerifier(SECRET)
    token = issue_token(SECRET, role="admin")
    verifier.verify(token)
    header, payload, signature = token.split(".")
    with pytest.raises(InvalidToken):
        verifier.verify(f"{header}.{payload}.{signature[:-2]}AA")
    with pytest.raises(InvalidToken):
        TokenVerifier("another-secret-of-enough-length-000").verify(token)


def test_memory_is_bounded() -> None:
    verifier = TokenVerifier(SECRET, max_entries=3)
    for subject in range(10):
        verifier.verify(issue_token(SECRET, role="ops", subject=f"user-{subject}"))
    assert len(verifier._verified) <= 3


# -- clock skew -----------------------------------------------------------------------------


def test_the_default_leeway_is_30_seconds() -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, DATABASE_URL="postgresql+psycopg://unused/unused", REPORTS_JWT_SECRET=SECRET
    )
    assert settings.jwt_leeway == 30


def test_a_token_issued_by_a_clock_slightly_ahead_is_accepted() -> None:
    ahead = int(time.time()) + 5
    assert decode_token(SECRET, signed(iat=ahead, nbf=ahead)).role == "ops"
    with pytest.raises(InvalidToken, match="not yet valid"):
        decode_token(SECRET, signed(iat=ahead), leeway=0)


def test_leeway_is_small() -> None:
    now = int(time.time())
    assert decode_token(SECRET, signed(exp=now - 10)).role == "ops"
    with pytest.raises(InvalidToken, match="expired"):
        decode_token(SECRET, signed(exp=now - 60))
    with pytest.raises(InvalidToken, match="not yet valid"):
        decode_token(SECRET, signed(iat=now + 60))
    with pytest.raises(InvalidToken, match="not yet valid"):
        decode_token(SECRET, signed(nbf=now + 60))


async def test_the_service_accepts_skew_and_refuses_expired_tokens(api: Api) -> None:
    now = int(time.time())
    secret = api.settings.jwt_secret
    ahead = await api.get(STATS, signed(secret, iat=now + 5))
    assert ahead.status_code == 200, ahead.text
    expired = await api.get(STATS, signed(secret, exp=now - 60))
    assert expired.status_code == 401
    assert expired.json()["error"]["code"] == "unauthorized"


# -- issuer and audience -------------------------------------------------------------------


def test_issuer_and_audience_are_checked_when_set() -> None:
    def decode(token: str) -> str:
        return decode_token(SECRET, token, issuer=ISSUER, audience=AUDIENCE).subject

    assert decode(signed(iss=ISSUER, aud=AUDIENCE)) == "ops-1"
    assert decode(signed(iss=ISSUER, aud=["other", AUDIENCE])) == "ops-1"
    for claims in (
        {"aud": AUDIENCE},
        {"iss": ISSUER},
        {"iss": "https://elsewhere.example", "aud": AUDIENCE},
        {"iss": ISSUER, "aud": "another-service"},
    ):
        with pytest.raises(InvalidToken):
            decode(signed(**claims))


def test_a_token_for_another_audience_is_refused_even_when_none_is_configured() -> None:
    assert decode_token(SECRET, signed(iss=ISSUER)).subject == "ops-1"
    with pytest.raises(InvalidToken):
        decode_token(SECRET, signed(aud="another-service"))


@pytest.fixture
async def bound_api(
    base_settings: Settings, database_url: str, clean_db: str, redis_url: str
) -> AsyncIterator[Api]:
    settings = app_settings(
        base_settings, database_url, redis_url, jwt_issuer=ISSUER, jwt_audience=AUDIENCE
    )
    async with RunningApi(settings) as running:
        yield running


@pytest.mark.parametrize(
    ("claims", "status"),
    [
        ({"iss": ISSUER, "aud": AUDIENCE}, 200),
        ({}, 401),
        ({"iss": "https://elsewhere.example", "aud": AUDIENCE}, 401),
        ({"iss": ISSUER, "aud": "another-service"}, 401),
        ({"iss": ISSUER}, 401),
    ],
)
async def test_the_service_checks_issuer_and_audience(
    bound_api: Api, claims: dict[str, str], status: int
) -> None:
    response = await bound_api.get(STATS, signed(bound_api.settings.jwt_secret, **claims))
    assert response.status_code == status, response.text


def test_the_token_command_sets_issuer_and_audience(tmp_path: Path) -> None:
    environment = {
        "PATH": os.environ.get("PATH", ""),
        "DATABASE_URL": "postgresql+psycopg://unused/unused",
        "REPORTS_ENVIRONMENT": "test",
        "REPORTS_JWT_SECRET": SECRET,
        "REPORTS_JWT_ISSUER": ISSUER,
        "REPORTS_JWT_AUDIENCE": AUDIENCE,
    }
    printed = subprocess.run(
        [str(Path(sys.executable).parent / "salon-reports"), "token", "--role", "admin"],
        env=environment,
        cwd=tmp_path,  # no .env
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    token = printed.stdout.strip()
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], audience=AUDIENCE, issuer=ISSUER)
    assert (claims["iss"], claims["aud"], claims["role"]) == (ISSUER, AUDIENCE, "admin")
    assert decode_token(SECRET, token, issuer=ISSUER, audience=AUDIENCE).role == "admin"
