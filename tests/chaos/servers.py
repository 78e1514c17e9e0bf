"""The real servers a chaos scenario breaks: a private PostgreSQL cluster, the service itself
(``salon-reports serve --workers 2``) and a small OTLP/HTTP receiver.

Everything listens on 127.0.0.1 on a free port and is torn down by its owner, also when a
test fails. The shared PostgreSQL and Redis of ``make services`` are never touched.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psycopg
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).parent / "salon-reports")


def _postgres_bin() -> Path:
    """The newest Debian PostgreSQL server binaries, else those on PATH (as scripts/services.sh)."""
    found = [
        path
        for path in Path("/usr/lib/postgresql").glob("*/bin")
        if (path / "initdb").exists() and path.parent.name.isdigit()
    ]
    if found:
        return max(found, key=lambda path: int(path.parent.name))
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else Path("/usr/lib/postgresql/15/bin")


POSTGRES_BIN = _postgres_bin()


class PostgresCluster:
    """A throw-away cluster (initdb into a temporary directory) that a test may stop.

    As root it runs as the ``postgres`` user, which owns the data directory (PostgreSQL refuses
    to run as root); otherwise as the current user.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.base = Path(tempfile.mkdtemp(prefix="salon-reports-chaos-pg-"))
        self.data = self.base / "data"
        self.log = self.base / "postgres.log"
        self.as_root = os.geteuid() == 0
        self.running = False

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://chaos@127.0.0.1:{self.port}/{database}"

    def dsn(self, database: str) -> str:
        return f"postgresql://chaos@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = 60) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self.as_root else []
        result = subprocess.run(
            [*prefix, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout}\n{result.stderr}"

    def init(self) -> None:
        initdb = POSTGRES_BIN / "initdb"
        assert initdb.exists(), "PostgreSQL 15 is not installed; run `make services`"
        if self.as_root:
            shutil.chown(self.base, "postgres", "postgres")
        self._run(
            str(initdb),
            "-D",
            str(self.data),
            "-U",
            "chaos",
            "-A",
            "trust",  # loopback only, throw-away data
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.base} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100"
            # the change stream: logical decoding through a replication slot (wal2json)
            " -c wal_level=logical -c max_replication_slots=8 -c max_wal_senders=8"
        )
        self._run(
            str(POSTGRES_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            options,
            "-w",
            "-t",
            "30",
            "start",
        )
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """``fast``: every session is terminated, like a restart by an operator."""
        self._run(str(POSTGRES_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")
        self.running = False

    def create_database(self, name: str) -> None:
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')

    def destroy(self) -> None:
        if self.running or (self.data / "postmaster.pid").exists():
            with contextlib.suppress(Exception):
                self.stop("immediate")
        pid_file = self.data / "postmaster.pid"
        if pid_file.exists():  # pg_ctl could not stop it: kill the postmaster
            with contextlib.suppress(Exception):
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
        shutil.rmtree(self.base, ignore_errors=True)


class ServiceProcess:
    """``salon-reports serve --workers 2`` on a free loopback port, in its own process group."""

    def __init__(self, env: dict[str, str], log: Path, workers: int = 2) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = env
        self.log = log
        self.workers = workers
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("wb") as output:
            self.process = subprocess.Popen(
                [CLI, "serve", "--port", str(self.port), "--workers", str(self.workers)],
                cwd=ROOT,
                env=self.env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: cleanup reaches the workers
            )
        # Ready when several probes in a row (answered by either worker) see the database and
        # a connected invalidation listener: before that the cache is bypassed.
        deadline = time.monotonic() + 40
        ready = 0
        while time.monotonic() < deadline and ready < 2 * self.workers + 2:
            assert self.process.poll() is None, self.log.read_text()
            try:
                probe = httpx.get(f"{self.url}/readyz", timeout=2)
                body = probe.json() if probe.status_code == 200 else {}
                listening = body.get("invalidation_listener") == "connected"
                ready = ready + 1 if listening else 0
            except httpx.HTTPError:
                ready = 0
            time.sleep(0.1)
        assert ready, f"the service did not become ready:\n{self.log.read_text()}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def terminate(self) -> None:
        """SIGTERM to the main process only, as an orchestrator sends it."""
        os.kill(self.pid, signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            group = os.getpgid(self.process.pid)
            os.killpg(group, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(group, signal.SIGKILL)
                self.process.wait(5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # workers left behind, if any
        self.process = None


def service_env(database_url: str, redis_url: str, secret: str, **settings: str) -> dict[str, str]:
    """The service's environment: this test's servers, nothing inherited from ``.env`` that
    matters, and the given ``REPORTS_*`` / ``OTEL_*`` settings."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("OTEL_", "REPORTS_", "DATABASE_URL", "REDIS_URL"))
    }
    env.update(
        {
            "DATABASE_URL": database_url,
            "REPORTS_READ_DATABASE_URL": "",
            "REDIS_URL": redis_url,
            "REPORTS_ENVIRONMENT": "test",
            "REPORTS_JWT_SECRET": secret,
            # The chaos load is a few owners standing in for a whole platform's traffic, so
            # each of them runs far more uncached reports at once than a tenant's fair share
            # allows: here that share would answer 429 where these tests look at what faults
            # do. The fair share has its own tests (tests/test_fairness.py).
            "REPORTS_TENANT_MAX_CONCURRENT": "64",
            "PYTHONUNBUFFERED": "1",
            **settings,
        }
    )
    return env


def new_secret() -> str:
    return secrets.token_hex(32)


@contextlib.contextmanager
def running_service(env: dict[str, str], log: Path) -> Iterator[ServiceProcess]:
    service = ServiceProcess(env, log)
    try:
        service.start()
        yield service
    finally:
        service.stop()


# -- OTLP/HTTP ---------------------------------------------------------------------------------


class _Receiver(BaseHTTPRequestHandler):
    received: list[tuple[str, bytes]]
    lock: threading.Lock

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            self.received.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


class OtlpSink:
    """Receives OTLP/HTTP exports (protobuf) and keeps every body."""

    def __init__(self) -> None:
        self.received: list[tuple[str, bytes]] = []
        handler = type(
            "Handler", (_Receiver,), {"received": self.received, "lock": threading.Lock()}
        )
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> OtlpSink:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def spans(self) -> list[tuple[dict[str, Any], Span]]:
        """Every span received, with its resource attributes."""
        found: list[tuple[dict[str, Any], Span]] = []
        for path, body in list(self.received):
            if path != "/v1/traces":
                continue
            request = ExportTraceServiceRequest.FromString(body)
            for resource_spans in request.resource_spans:
                resource = {a.key: a.value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    found.extend((resource, span) for span in scope_spans.spans)
        return found
