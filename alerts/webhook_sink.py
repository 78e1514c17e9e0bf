"""A stand-in pager for the docker-compose stack: prints every Alertmanager notification.

Alertmanager (alerts/alertmanager.yml) posts pages to ``/pages`` and warnings to
``/tickets``; this prints one line per alert, e.g.::

    [pages] FIRING SalonReportsSlowQueries severity=page db_query_summary=report.dashboard
            Query report.dashboard is slow: p95 812ms

so that ``docker compose logs -f pager`` shows what on-call would have received. ``GET /``
answers 200 (the container's health check). Standard library only; run with
``python webhook_sink.py [--host 0.0.0.0] [--port 8080]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_SKIPPED_LABELS = {"alertname", "severity", "job", "instance", "component"}


def format_notification(path: str, payload: dict[str, Any]) -> list[str]:
    """One line per alert of an Alertmanager webhook payload."""
    lines = []
    for alert in payload.get("alerts", []):
        labels = alert.get("labels", {})
        extra = " ".join(
            f"{key}={value}" for key, value in sorted(labels.items()) if key not in _SKIPPED_LABELS
        )
        summary = alert.get("annotations", {}).get("summary", "")
        status = alert.get("status", "?").upper()
        head = f"[{path.strip('/') or 'root'}] {status} {labels.get('alertname', '?')}"
        line = f"{head} severity={labels.get('severity', '?')} {extra}".rstrip()
        lines.append(line + (f"\n        {summary}" if summary else ""))
    return lines


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self._answer(200, b"ok\n")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        try:
            payload = json.loads(self.rfile.read(length) or b"{}")
        except json.JSONDecodeError:
            self._answer(400, b"not JSON\n")
            return
        for line in format_notification(self.path, payload):
            print(line, flush=True)
        self._answer(200, b"ok\n")

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per alert is enough; no access log


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    server = ThreadingHTTPServer((args.host, args.port), _Handler)
    print(f"pager sink listening on {args.host}:{args.port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
