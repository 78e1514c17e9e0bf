"""alerts/webhook_sink.py, the compose stack's stand-in pager, prints what it is sent."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

from tests.ops.promstack import free_port, wait_until
from tests.ops.tools import ALERTS

PAYLOAD = {
    "receiver": "pager",
    "status": "firing",
    "alerts": [
        {
            "status": "firing",
            "labels": {
                "alertname": "SalonReportsSlowQueries",
                "severity": "page",
                "job": "salon-reports",
                "db_query_summary": "report.dashboard",
            },
            "annotations": {"summary": "Query report.dashboard is slow: p95 812ms"},
        }
    ],
}


def test_sink_answers_health_checks_and_prints_each_alert() -> None:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            str(ALERTS / "webhook_sink.py"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as response:
                    return bool(response.status == 200)
            except OSError:
                return False

        assert wait_until(healthy, timeout=10, interval=0.1)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/pages",
            data=json.dumps(PAYLOAD).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200
        time.sleep(0.2)
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=10)
    assert (
        "[pages] FIRING SalonReportsSlowQueries severity=page db_query_summary=report.dashboard"
        in output
    )
    assert "Query report.dashboard is slow: p95 812ms" in output
