"""A real Prometheus and Alertmanager for tests, on loopback, paging a webhook in the test.

    with WebhookReceiver() as webhook, PromStack("127.0.0.1:8123", webhook.url) as stack:
        ...  # make the service misbehave
        alert = webhook.wait_for("SalonReportsSlowQueries", "firing", timeout=40)
        ...  # make it behave
        webhook.wait_for("SalonReportsSlowQueries", "resolved", timeout=40)

- Prometheus (the Debian ``prometheus``) scrapes ``scrape_target`` (``host:port``, path
  ``/metrics``) as the job ``salon-reports`` every second, evaluates the project's rule files
  every second and sends to Alertmanager with ``--rules.alert.resend-delay=1s``; its external
  labels are those of ``alerts/prometheus.yml`` (the bases of ``runbook_url`` and
  ``dashboard_url``).
- Alertmanager (``prometheus-alertmanager``) runs the project's ``alerts/alertmanager.yml``
  (its routes, receivers and inhibitions) with every webhook URL replaced by ``webhook_url``
  and ``group_wait``/``group_interval`` at 1 s, clustering off.
- The rules are loaded once the target has been scraped (``rules_after_first_scrape``):
  before that there is no ``up`` series and ``absent(up)`` would page SalonReportsDown. Pass
  ``rules_after_first_scrape=False`` to start with a target that is not there yet.
- Both listen on free 127.0.0.1 ports, keep their data in a temporary directory and are
  stopped (terminate, then kill) on exit; their logs are in ``stack.logs()``.

Time is compressed: with ``time_scale=30`` (the default) every ``for:`` and every range
selector (``[5m]``, subqueries too) of the rules is divided by 30 (range windows no shorter
than ``min_range``), so a rule that pages after 5 minutes of a 5-minute p95 pages after 10 s
of a 10 s p95. Expressions, thresholds, labels and annotations are the project's own; the
real durations are proven by ``promtool test rules`` (alerts/tests/). ``time_scale=1`` runs the
rules unchanged.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from tests.ops.tools import ALERTMANAGER_CONFIG, PROMETHEUS_CONFIG, RULE_FILES, require_tool

SERVICE_JOB = "salon-reports"  # the rules select job="salon-reports"

_DURATION_PART = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
_RANGE = re.compile(r"\[\s*([0-9smhdwy]+)\s*(?::\s*([0-9smhdwy]*)\s*)?\]")


class PromStackError(RuntimeError):
    """Prometheus or Alertmanager did not start or answer."""


# -- durations and rules ----------------------------------------------------------------------


def parse_duration(text: str) -> float:
    """Seconds of a Prometheus duration (``90s``, ``1h30m``, ``500ms``)."""
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text.strip():
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(int(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def format_duration(seconds: float) -> str:
    milliseconds = round(seconds * 1000)
    if milliseconds % 1000 == 0:
        return f"{milliseconds // 1000}s"
    return f"{milliseconds}ms"


def compress_expr(expr: str, time_scale: float, min_range: float = 5.0) -> str:
    """``expr`` with every range selector / subquery window divided by ``time_scale``."""

    def scale(match: re.Match[str]) -> str:
        window = max(parse_duration(match.group(1)) / time_scale, min_range)
        if match.group(2) is None:
            return f"[{format_duration(window)}]"
        step = match.group(2)
        scaled_step = format_duration(max(parse_duration(step) / time_scale, 1.0)) if step else ""
        return f"[{format_duration(window)}:{scaled_step}]"

    return _RANGE.sub(scale, expr)


def compress_rules(
    rule_files: Iterable[Path], directory: Path, time_scale: float, min_range: float = 5.0
) -> list[Path]:
    """Copies of the rule files with time compressed (see the module docstring)."""
    written = []
    for path in rule_files:
        document = yaml.safe_load(path.read_text())
        for group in document["groups"]:
            group.pop("interval", None)  # evaluate at the test's global interval
            for rule in group["rules"]:
                rule["expr"] = compress_expr(str(rule["expr"]), time_scale, min_range)
                if "for" in rule:
                    seconds = parse_duration(str(rule["for"]))
                    rule["for"] = format_duration(max(seconds / time_scale, 1.0) if seconds else 0)
        target = directory / path.name
        target.write_text(yaml.safe_dump(document, sort_keys=False, allow_unicode=True))
        written.append(target)
    return written


def alertmanager_test_config(
    webhook_url: str, source: Path = ALERTMANAGER_CONFIG
) -> dict[str, Any]:
    """The project's Alertmanager config, every webhook sent to ``webhook_url``, 1 s grouping."""
    config: dict[str, Any] = yaml.safe_load(source.read_text())
    for receiver in config.get("receivers", []):
        for webhook in receiver.get("webhook_configs", []):
            webhook["url"] = webhook_url
            webhook.pop("url_file", None)

    def fast(route: dict[str, Any]) -> None:
        route["group_wait"] = "1s"
        route["group_interval"] = "1s"
        for child in route.get("routes", []):
            fast(child)

    fast(config["route"])
    return config


# -- processes --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get_json(url: str, timeout: float = 5) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


def wait_until(condition: Callable[[], Any], timeout: float, interval: float = 0.2) -> Any:
    """Poll ``condition`` until it returns something truthy (returned) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            return value
        time.sleep(interval)


class _Process:
    def __init__(self, name: str, args: list[str], log: Path) -> None:
        self.name = name
        self.log = log
        self._log_file = log.open("wb")
        self.popen = subprocess.Popen(args, stdout=self._log_file, stderr=subprocess.STDOUT)

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name} log (last {lines} lines) ---\n" + "\n".join(
            text.splitlines()[-lines:]
        )

    def wait_ready(self, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise PromStackError(
                    f"{self.name} exited with {self.popen.returncode}\n{self.log_tail()}"
                )
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
            time.sleep(0.1)
        raise PromStackError(f"{self.name} not ready at {url} after {timeout}s\n{self.log_tail()}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        self._log_file.close()


class PromStack:
    """Prometheus + Alertmanager scraping ``scrape_target`` and paging ``webhook_url``."""

    def __init__(
        self,
        scrape_target: str,
        webhook_url: str,
        *,
        rule_files: Iterable[Path] = RULE_FILES,
        time_scale: float = 30.0,
        min_range: float = 5.0,
        job: str = SERVICE_JOB,
        metrics_path: str = "/metrics",
        rules_after_first_scrape: bool = True,
        startup_timeout: float = 30.0,
        prometheus_flags: Iterable[str] = (),
    ) -> None:
        self.scrape_target = scrape_target
        self.webhook_url = webhook_url
        self.rule_files = list(rule_files)
        self.time_scale = time_scale
        self.min_range = min_range
        self.job = job
        self.metrics_path = metrics_path
        self.rules_after_first_scrape = rules_after_first_scrape
        self.startup_timeout = startup_timeout
        self.prometheus_flags = list(prometheus_flags)  # e.g. --enable-feature=exemplar-storage
        project_config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
        self.external_labels: dict[str, str] = project_config["global"].get("external_labels", {})
        self.prometheus_url = ""
        self.alertmanager_url = ""
        self._directory: Path | None = None
        self._processes: list[_Process] = []

    # -- lifecycle --

    def __enter__(self) -> PromStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        prometheus = require_tool("prometheus")
        alertmanager = require_tool("prometheus-alertmanager", "alertmanager")
        self._directory = Path(tempfile.mkdtemp(prefix="promstack-"))
        try:
            self._start_alertmanager(alertmanager, self._directory)
            self._start_prometheus(prometheus, self._directory)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for process in reversed(self._processes):
            process.stop()
        self._processes.clear()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None

    def _start_alertmanager(self, binary: str, directory: Path) -> None:
        config = directory / "alertmanager.yml"
        config.write_text(yaml.safe_dump(alertmanager_test_config(self.webhook_url)))
        port = free_port()
        process = _Process(
            "alertmanager",
            [
                binary,
                f"--config.file={config}",
                f"--storage.path={directory / 'alertmanager-data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--cluster.listen-address=",
                "--log.level=info",
            ],
            directory / "alertmanager.log",
        )
        self._processes.append(process)
        self.alertmanager_url = f"http://127.0.0.1:{port}"
        process.wait_ready(f"{self.alertmanager_url}/-/ready", self.startup_timeout)

    def _start_prometheus(self, binary: str, directory: Path) -> None:
        rules_directory = directory / "rules"
        rules_directory.mkdir()
        if self.time_scale == 1:
            rules = [Path(shutil.copy(path, rules_directory)) for path in self.rule_files]
        else:
            rules = compress_rules(
                self.rule_files, rules_directory, self.time_scale, self.min_range
            )
        config_file = directory / "prometheus.yml"
        # Before its first scrape Prometheus has no `up` series, and absent(up) would page
        # SalonReportsDown within seconds under compressed time: load the rules once the
        # target has been scraped (a reload, as on SIGHUP).
        self._write_prometheus_config(config_file, [] if self.rules_after_first_scrape else rules)
        port = free_port()
        process = _Process(
            "prometheus",
            [
                binary,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={directory / 'prometheus-data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--rules.alert.resend-delay=1s",
                "--log.level=info",
                *self.prometheus_flags,
            ],
            directory / "prometheus.log",
        )
        self._processes.append(process)
        self.prometheus_url = f"http://127.0.0.1:{port}"
        process.wait_ready(f"{self.prometheus_url}/-/ready", self.startup_timeout)
        if self.rules_after_first_scrape:
            self.wait_for_target_up(self.startup_timeout)
            self._write_prometheus_config(config_file, rules)
            process.popen.send_signal(signal.SIGHUP)
            expected = sum(len(yaml.safe_load(path.read_text())["groups"]) for path in rules)
            if not wait_until(lambda: len(self.rule_groups()) == expected, self.startup_timeout):
                raise PromStackError(f"rules not loaded after a reload\n{self.logs()}")

    def _write_prometheus_config(self, path: Path, rules: list[Path]) -> None:
        config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
                # The project's runbook and dashboard link bases (runbook_url, dashboard_url).
                "external_labels": self.external_labels,
            },
            "rule_files": [str(rule) for rule in rules],
            "alerting": {
                "alertmanagers": [
                    {"static_configs": [{"targets": [self.alertmanager_url.split("//")[1]]}]}
                ]
            },
            "scrape_configs": [
                {
                    "job_name": self.job,
                    "metrics_path": self.metrics_path,
                    "static_configs": [{"targets": [self.scrape_target]}],
                }
            ],
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))

    # -- looking inside --

    def logs(self) -> str:
        return "\n".join(process.log_tail() for process in self._processes)

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; the ``result`` list of the API's answer."""
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        answer = http_get_json(url)
        if answer.get("status") != "success":
            raise PromStackError(f"query {expr!r} failed: {answer}")
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def exemplars(self, expr: str, since: float) -> list[dict[str, Any]]:
        """The exemplars of the series ``expr`` selects, stored since ``since`` (Unix time)
        until now (``/api/v1/query_exemplars``; needs ``--enable-feature=exemplar-storage``)."""
        query = {"query": expr, "start": f"{since:.3f}", "end": f"{time.time() + 1:.3f}"}
        url = f"{self.prometheus_url}/api/v1/query_exemplars?" + urllib.parse.urlencode(query)
        answer = http_get_json(url)
        if answer.get("status") != "success":
            raise PromStackError(f"exemplars of {expr!r} failed: {answer}")
        result: list[dict[str, Any]] = answer["data"]
        return result

    def rule_groups(self) -> list[dict[str, Any]]:
        """The rule groups Prometheus has loaded."""
        groups: list[dict[str, Any]] = http_get_json(f"{self.prometheus_url}/api/v1/rules")["data"][
            "groups"
        ]
        return groups

    def alerts(self) -> list[dict[str, Any]]:
        """Prometheus' active alerts (pending and firing)."""
        alerts: list[dict[str, Any]] = http_get_json(f"{self.prometheus_url}/api/v1/alerts")[
            "data"
        ]["alerts"]
        return alerts

    def wait_for_target_up(self, timeout: float = 15) -> None:
        """Wait until the service's target has been scraped successfully."""

        def up() -> bool:
            return any(
                sample["value"][1] == "1" for sample in self.query(f'up{{job="{self.job}"}}')
            )

        if not wait_until(up, timeout):
            raise PromStackError(
                f"target {self.scrape_target} not up after {timeout}s\n{self.logs()}"
            )


# -- the receiving end ------------------------------------------------------------------------


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that does not log every request to stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class LoopbackServer:
    """A threaded HTTP server on a free 127.0.0.1 port, serving for the length of a ``with``."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.address = f"127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> LoopbackServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class WebhookReceiver:
    """An HTTP server on 127.0.0.1 that records Alertmanager's webhook notifications."""

    def __init__(self) -> None:
        self.notifications: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        receiver = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                payload = json.loads(body or b"{}")
                payload["_path"] = self.path
                payload["_received_at"] = time.monotonic()
                with receiver._arrived:
                    receiver.notifications.append(payload)
                    receiver._arrived.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._http = LoopbackServer(Handler)
        self.url = f"http://{self._http.address}/alerts"

    def __enter__(self) -> WebhookReceiver:
        self._http.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.__exit__(*exc)

    def alerts(self) -> list[dict[str, Any]]:
        """Every alert of every notification, with the notification's ``receiver``."""
        with self._lock:
            return [
                {**alert, "receiver": notification.get("receiver")}
                for notification in self.notifications
                for alert in notification.get("alerts", [])
            ]

    def wait_for(
        self, alertname: str, status: str = "firing", timeout: float = 60, **labels: str
    ) -> dict[str, Any]:
        """The first alert named ``alertname`` in ``status`` (with ``labels``) to arrive."""

        def match() -> dict[str, Any] | None:
            for alert in self.alerts():
                alert_labels = alert.get("labels", {})
                if (
                    alert_labels.get("alertname") == alertname
                    and alert.get("status") == status
                    and all(alert_labels.get(key) == value for key, value in labels.items())
                ):
                    return alert
            return None

        deadline = time.monotonic() + timeout
        while (found := match()) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            with self._arrived:
                self._arrived.wait(min(remaining, 0.5))
        if found is not None:
            return found
        seen = [
            (alert["labels"].get("alertname"), alert.get("status"), alert.get("receiver"))
            for alert in self.alerts()
        ]
        raise AssertionError(
            f"no {status} {alertname} {labels or ''} reached the webhook within {timeout}s; "
            f"received: {seen or 'nothing'}"
        )
