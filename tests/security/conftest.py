"""Fixtures of the hostile-input tests: seeded data and a real uvicorn server.

The in-process ASGI client has no limits on URL or header size; the real server does, and
it is what a client on the network reaches. ``LiveServer`` runs the app exactly as
``salon-reports serve`` does (uvicorn, lifespan included) on a loopback port, in a thread.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import psycopg
import pytest
import uvicorn
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.id_generator import IdGenerator

from service.auth import Role, issue_token
from service.config import Settings
from service.main import create_app
from telemetry.setup import configure
from tests.conftest import TABLES, app_settings
from tests.factories import small_dataset
from tests.support import (
    close_client,
    cluster_url,
    crossslot_errors,
    free_port,
    redis_client,
    reset_error_stats,
)

START_TIMEOUT_SECONDS = 20.0
PREFIX = "/api/v1/optimized-reports"
REPORTS = ("dashboard", "bookings", "professionals", "realtime")


@dataclass
class LiveServer:
    """A uvicorn server on 127.0.0.1 with the seeded data of ``small_dataset``."""

    url: str
    settings: Settings
    data: dict[str, int]

    def token(self, role: Role = "admin", salons: list[int] | None = None) -> str:
        return issue_token(self.settings.jwt_secret, role=role, salon_ids=salons)


def raw_request(live_server: LiveServer, head: bytes, body: bytes = b"") -> httpx.Response:
    """Send bytes no HTTP client library would (blank header values, huge lines) and parse.

    ``head`` is the request line and headers without the final blank line; the connection is
    closed after one response.
    """
    port = int(live_server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(head + b"\r\nConnection: close\r\n\r\n" + body)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    status_line, _, rest = received.partition(b"\r\n")
    header_block, _, content = rest.partition(b"\r\n\r\n")
    headers = [
        tuple(part.strip() for part in line.split(b":", 1))
        for line in header_block.split(b"\r\n")
        if b":" in line
    ]
    return httpx.Response(
        int(status_line.split()[1]),
        headers=headers,
        content=content,
        request=httpx.Request("GET", live_server.url),
    )


def assert_json_error(response: httpx.Response, status: int, code: str | None = None) -> None:
    """The response is ``status`` with exactly the JSON error body (and no stack trace)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json", response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    assert "Traceback" not in response.text
    if code is not None:
        assert body["error"]["code"] == code, body


def _seed(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
        return small_dataset(connection)


class PrivateRandomIds(IdGenerator):
    """Trace and span ids from a generator of its own.

    The SDK's default draws them from the global ``random``, which hypothesis watches while it
    generates a case: a span made by the server thread meanwhile (a request's, a background
    task's) would read as the strategy using ``random``.
    """

    def __init__(self) -> None:
        self._random = random.Random()

    def generate_span_id(self) -> int:
        return self._random.getrandbits(64) or self.generate_span_id()

    def generate_trace_id(self) -> int:
        return self._random.getrandbits(128) or self.generate_trace_id()


def _wait_until_ready(url: str, thread: threading.Thread) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if not thread.is_alive():
            raise RuntimeError("the server thread ended before it was ready")
        try:
            ready = httpx.get(f"{url}/readyz", timeout=1.0)
            if ready.status_code == 200 and ready.json()["invalidation_listener"] == "connected":
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError("the server did not become ready")


@pytest.fixture(scope="module")
def live_server(
    base_settings: Settings, database_url: str, dsn: str, redis_test_url: str
) -> Iterator[LiveServer]:
    """One server per test module: seeded once, shared by the module's (read-only) tests."""
    data = _seed(dsn)
    client = redis_client(redis_test_url)
    client.flushdb()
    on_cluster = redis_test_url == cluster_url()
    if on_cluster:
        reset_error_stats(client)
    close_client(client)
    settings = app_settings(base_settings, database_url, redis_test_url)
    telemetry = configure(
        version="test",
        environment="test",
        slow_query_ms=settings.slow_query_ms,
        tracer_provider=TracerProvider(id_generator=PrivateRandomIds()),
        env={},
    )
    port = free_port()
    # The same uvicorn options as `salon-reports serve`.
    config = uvicorn.Config(
        create_app(settings, telemetry),
        host="127.0.0.1",
        port=port,
        access_log=False,
        proxy_headers=False,
        log_level="warning",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="live-server", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_ready(url, thread)
        yield LiveServer(url=url, settings=settings, data=data)
    finally:
        server.should_exit = True
        thread.join(15)
    assert not thread.is_alive(), "the server did not stop"
    if on_cluster:  # no multi-key command or script across slots, whatever was asked
        client = redis_client(redis_test_url)
        try:
            assert crossslot_errors(client) == {}
        finally:
            close_client(client)


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> Iterator[httpx.Client]:
    """An HTTP client of the live server (no token unless a test adds one)."""
    with httpx.Client(base_url=live_server.url, timeout=30.0) as http:
        yield http
