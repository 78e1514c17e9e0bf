"""Settings: the JWT secret rule, and the container image started as its Dockerfile says."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.config import (
    DEV_PLACEHOLDER_SECRET,
    ConfigurationError,
    Settings,
    get_settings,
    serving_settings,
)
from tests.support import free_port

DOCKERFILE = Path(__file__).resolve().parent.parent / "Dockerfile"
SALON_REPORTS = Path(sys.executable).parent / "salon-reports"
DATABASE_PASSWORD = "db-password-not-to-print"
DATABASE_URL = f"postgresql+psycopg://salon:{DATABASE_PASSWORD}@127.0.0.1:1/salon_reports"
STRONG_SECRET = "k3P9x2LqV7mZ8wR4tY6uB1nC5dF0gH2jS8aE4vQ7"
WEAK_SECRETS = {
    "missing": None,
    "empty": "",
    "short": "x" * 31,
    "the placeholder": DEV_PLACEHOLDER_SECRET,
    "a copied example": "please-change-me-to-a-long-random-string-0000",
}


# -- the Dockerfile, read as Docker reads it ----------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def image_environment() -> dict[str, str]:
    """The ENV of the final stage (the image that runs)."""
    environment: dict[str, str] = {}
    for keyword, arguments in _instructions():
        if keyword == "FROM":
            environment = {}
        elif keyword == "ENV":
            for pair in shlex.split(arguments):
                name, _, value = pair.partition("=")
                environment[name] = value
    return environment


def image_serve_arguments() -> list[str]:
    """The arguments of the image's ``salon-reports serve …`` command (``serve`` first)."""
    [command] = [arguments for keyword, arguments in _instructions() if keyword == "CMD"]
    script = " ".join(json.loads(command))
    match = re.search(r"salon-reports serve[^;&|\"]*", script)
    assert match is not None, script
    return shlex.split(match.group(0))[1:]  # without the program name


def test_the_image_runs_as_production() -> None:
    assert image_environment()["REPORTS_ENVIRONMENT"] == "production"
    assert "REPORTS_JWT_SECRET" not in image_environment()


def test_the_image_refuses_to_serve_with_only_a_database_url(tmp_path: Path) -> None:
    """Issue 13: started with only DATABASE_URL, the image used to accept admin tokens signed
    with the placeholder printed in our own source."""
    arguments = image_serve_arguments()
    assert arguments[arguments.index("--host") + 1] == "0.0.0.0"
    # Another port than the image's: if the refusal were missing, nothing else is disturbed.
    arguments[arguments.index("--port") + 1] = str(free_port())
    environment = {**image_environment(), "DATABASE_URL": DATABASE_URL}
    server = subprocess.Popen(
        [str(SALON_REPORTS), *arguments],
        env=environment,
        cwd=tmp_path,  # as in the image: no .env to read a secret from
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its workers too can be stopped if it does start
    )
    try:
        stdout, stderr = server.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.communicate()
        pytest.fail("the server started without a JWT secret")
    assert server.returncode != 0
    assert "refusing to start: REPORTS_JWT_SECRET is not set" in stderr
    assert "openssl rand" in stderr  # says what to do
    assert "Traceback" not in stderr
    assert DATABASE_PASSWORD not in stderr + stdout


# -- the rule ------------------------------------------------------------------------------


def _settings(environment: str | None, secret: str | None) -> Settings:
    values = {"DATABASE_URL": DATABASE_URL}
    if environment is not None:
        values["REPORTS_ENVIRONMENT"] = environment
    if secret is not None:
        values["REPORTS_JWT_SECRET"] = secret
    return Settings(_env_file=None, **values)  # type: ignore[call-arg,arg-type]


@pytest.mark.parametrize("environment", [None, "production", "test"])
@pytest.mark.parametrize("secret", WEAK_SECRETS.values(), ids=WEAK_SECRETS.keys())
def test_a_weak_secret_is_refused_outside_development(
    environment: str | None, secret: str | None
) -> None:
    weak = r"REPORTS_JWT_SECRET is (not set|a placeholder|shorter than 32 bytes)"
    with pytest.raises(ValidationError, match=weak):
        _settings(environment, secret)


@pytest.mark.parametrize("secret", WEAK_SECRETS.values(), ids=WEAK_SECRETS.keys())
def test_development_must_be_chosen_explicitly(secret: str | None) -> None:
    assert _settings("development", secret).environment == "development"


def test_a_strong_secret_is_accepted_and_the_default_is_production() -> None:
    settings = _settings(None, STRONG_SECRET)
    assert settings.environment == "production"
    assert settings.weak_secret is None
    assert STRONG_SECRET not in repr(settings)


def test_length_is_counted_in_bytes() -> None:
    assert _settings("production", "é" * 16).weak_secret is None  # 32 bytes in UTF-8
    with pytest.raises(ValidationError):
        _settings("production", "é" * 15 + "x")


@pytest.fixture
def environment_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """``get_settings()`` reading only the variables the test sets (no .env)."""
    monkeypatch.chdir(tmp_path)
    for name in ("REPORTS_ENVIRONMENT", "REPORTS_JWT_SECRET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATABASE_URL", DATABASE_URL)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.mark.usefixtures("environment_only")
def test_the_cli_message_names_the_problem_and_no_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPORTS_JWT_SECRET", "short-secret")
    with pytest.raises(ConfigurationError) as refused:
        get_settings()
    message = str(refused.value)
    assert message.startswith("salon-reports: refusing to start: ")
    assert "shorter than 32 bytes" in message
    assert "short-secret" not in message
    assert DATABASE_PASSWORD not in message


@pytest.mark.usefixtures("environment_only")
@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "reports.example"])
def test_development_never_serves_a_weak_secret_beyond_loopback(
    monkeypatch: pytest.MonkeyPatch, host: str
) -> None:
    monkeypatch.setenv("REPORTS_ENVIRONMENT", "development")
    with pytest.raises(ConfigurationError, match=f"would listen on {re.escape(host)}"):
        serving_settings(host)


@pytest.mark.usefixtures("environment_only")
@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1"])
def test_development_serves_on_loopback(monkeypatch: pytest.MonkeyPatch, host: str) -> None:
    monkeypatch.setenv("REPORTS_ENVIRONMENT", "development")
    assert serving_settings(host).environment == "development"


@pytest.mark.usefixtures("environment_only")
def test_a_strong_secret_serves_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPORTS_JWT_SECRET", STRONG_SECRET)
    assert serving_settings("0.0.0.0").environment == "production"
