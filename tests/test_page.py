"""The performance page (issue 8): its data contract, how it is served, and a real browser.

The page's script lists every stats field it reads in one place (``STATS_FIELDS`` in
``service/static/page.js``). Here each of them must exist in a real ``/performance/stats``
response after a small workload, with one worker and with two; and in headless Chromium the
page must read no field outside that list, draw every chart from real data, link real trace
ids to Jaeger and log no error (a Content-Security-Policy violation would be one).

The browser test needs the Debian packages ``chromium`` and ``chromium-driver`` and the
``selenium`` package; it fails, never skips, without them. It leaves a screenshot in
``test-artifacts/performance-page.png``, and refreshes the README's
``docs/performance-page.png`` when that file is missing or ``UPDATE_SCREENSHOT=1``.
"""

from __future__ import annotations

import html.parser
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest
import redis

from service.auth import issue_token
from service.config import Settings
from service.page import CONTENT_SECURITY_POLICY
from service.tools.seed import seed_database
from service.workers import STATS_KEY
from telemetry.stats import StatsAggregator
from tests.conftest import Api, RunningApi, app_settings
from tests.factories import small_dataset
from tests.support import free_port

ROOT = Path(__file__).resolve().parent.parent
PAGE_JS = ROOT / "service" / "static" / "page.js"
ARTIFACTS = ROOT / "test-artifacts"
README_SCREENSHOT = ROOT / "docs" / "performance-page.png"
STATS = "/api/v1/optimized-reports/performance/stats"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,1000",
)
TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
JAEGER = "http://jaeger.test:16686"
# The console script installed beside this interpreter (.venv/bin/salon-reports).
CLI = str(Path(sys.executable).parent / "salon-reports")
SERVE = [CLI, "serve"]


# -- the contract ------------------------------------------------------------------------------


def stats_fields() -> list[str]:
    """``STATS_FIELDS`` of page.js: the one list of the stats paths the page reads."""
    match = re.search(r"const STATS_FIELDS = \[(.*?)\];", PAGE_JS.read_text(), re.DOTALL)
    assert match, "page.js no longer declares STATS_FIELDS"
    fields: list[str] = json.loads(f"[{match.group(1).strip().rstrip(',')}]")
    return fields


def _tokens(path: str) -> list[str]:
    tokens = []
    for part in path.split("."):
        name, brackets, _ = part.partition("[]")
        tokens.append(name)
        if brackets:
            tokens.append("[]")
    return tokens


def _present(value: Any, tokens: list[str]) -> bool:
    """The path exists; a map (``*``) or list (``[]``) must be non-empty and hold it throughout."""
    if not tokens:
        return True
    token, rest = tokens[0], tokens[1:]
    if token == "[]":
        return isinstance(value, list) and bool(value) and all(_present(v, rest) for v in value)
    if token == "*":
        return (
            isinstance(value, dict)
            and bool(value)
            and all(_present(v, rest) for v in value.values())
        )
    return isinstance(value, dict) and token in value and _present(value[token], rest)


def missing_fields(stats: dict[str, Any], fields: list[str]) -> list[str]:
    return [field for field in fields if not _present(stats, _tokens(field))]


def test_the_contract_checker_can_fail() -> None:
    stats = {"a": {"b": 1}, "m": {}, "l": [{"x": 1}, {"y": 2}], "n": None}
    assert missing_fields(stats, ["a.b", "a.c", "m.*.x", "l[].x", "l[].y", "n.z", "a"]) == [
        "a.c",
        "m.*.x",
        "l[].x",
        "l[].y",
        "n.z",
    ]
    assert "last_5m.endpoints.*.p95_ms" in stats_fields()


async def _workload(api: Api, salons: list[int]) -> None:
    """Every report cold then warm (slow_query_ms is tiny: every query is a slow one)."""
    for salon in salons:
        for _ in range(2):
            for report in ("dashboard", "bookings", "professionals", "realtime"):
                assert (await api.report(report, salon_id=salon)).status_code == 200
    # The N+1 list has no other way in: no endpoint of the service has that bug.
    api.resources.telemetry.stats.record_n_plus_one(
        "GET /test-only/n-plus-one",
        "SELECT name FROM professionals WHERE id = %(id)s",
        7,
        "ab" * 16,
    )


async def _stats(api: Api) -> dict[str, Any]:
    response = await api.get(STATS, api.token("ops"))
    assert response.status_code == 200
    stats: dict[str, Any] = response.json()
    return stats


async def test_every_field_the_page_reads_is_in_the_stats(
    base_settings: Settings, database_url: str, db: psycopg.Connection, redis_url: str
) -> None:
    data = small_dataset(db)
    settings = app_settings(base_settings, database_url, redis_url, slow_query_ms=0.001)
    async with RunningApi(settings) as api:
        await _workload(api, [data["lisbon"], data["newyork"]])
        stats = await _stats(api)
    assert stats["workers"] == 1
    assert missing_fields(stats, stats_fields()) == []


async def test_every_field_the_page_reads_is_in_the_stats_of_two_workers(
    base_settings: Settings, database_url: str, db: psycopg.Connection, redis_url: str
) -> None:
    data = small_dataset(db)
    settings = app_settings(base_settings, database_url, redis_url, slow_query_ms=0.001)
    async with RunningApi(settings) as one, RunningApi(settings) as two:
        await _workload(one, [data["lisbon"]])
        await _workload(two, [data["newyork"]])
        publisher = two.resources.publisher
        assert publisher is not None
        await publisher.publish()
        stats = await _stats(one)
    assert stats["workers"] == 2
    assert len(stats["pool"]["workers"]) == 2
    assert {query["worker"] for query in stats["recent_slow_queries"]} == set(stats["worker_ids"])
    assert missing_fields(stats, stats_fields()) == []


# -- how the page is served ---------------------------------------------------------------------


class _Markup(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _markup(text: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Markup()
    parser.feed(text)
    return parser.tags


async def test_the_page_is_a_static_shell_under_a_strict_policy(api: Api) -> None:
    response = await api.get("/performance")  # no token: it carries no data
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "script-src 'self';" in CONTENT_SECURITY_POLICY
    assert "unsafe" not in CONTENT_SECURITY_POLICY
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-store"
    tags = _markup(response.text)
    scripts = [attrs for tag, attrs in tags if tag == "script"]
    assert scripts == [{"src": "/performance/page.js", "defer": None}]
    assert [a["href"] for t, a in tags if t == "link" and a.get("rel") == "stylesheet"] == [
        "/performance/page.css"
    ]
    assert not [tag for tag, attrs in tags if tag == "style" or "style" in attrs]
    assert ("meta", {"name": "jaeger-url", "content": "http://localhost:16686"}) in tags
    # Nothing from elsewhere: the only absolute URL in the script is the SVG namespace.
    script = await api.get("/performance/page.js")
    assert re.findall(r"https?://[^\"'`\s)]+", script.text) == ["http://www.w3.org/2000/svg"]
    assert "innerHTML" not in script.text
    assert "localStorage" not in script.text
    assert "sessionStorage" not in script.text
    assert (await api.get(STATS)).status_code == 401


async def test_the_script_and_style_are_served_with_etags(api: Api) -> None:
    for path, media_type in (
        ("/performance/page.js", "text/javascript; charset=utf-8"),
        ("/performance/page.css", "text/css; charset=utf-8"),
    ):
        first = await api.get(path)
        assert first.status_code == 200
        assert first.headers["content-type"] == media_type
        assert first.headers["x-content-type-options"] == "nosniff"
        again = await api.get(path, headers={"If-None-Match": first.headers["etag"]})
        assert again.status_code == 304
        assert again.content == b""


@pytest.mark.parametrize(
    ("configured", "served"),
    [
        ("https://jaeger.example.org/", "https://jaeger.example.org"),
        ('http://j.test/"><script>alert(1)</script>', "http://j.test/&quot;&gt;&lt;script&gt;"),
        ("javascript:alert(1)", ""),
        ("", ""),
    ],
)
async def test_the_jaeger_url_is_escaped_and_only_http(
    base_settings: Settings,
    database_url: str,
    clean_db: str,
    redis_url: str,
    configured: str,
    served: str,
) -> None:
    settings = app_settings(base_settings, database_url, redis_url, jaeger_url=configured)
    async with RunningApi(settings) as api:
        page = (await api.get("/performance")).text
    [meta] = [line for line in page.splitlines() if 'name="jaeger-url"' in line]
    assert f'content="{served}' in meta
    assert "<script>alert" not in page


# -- in a real browser --------------------------------------------------------------------------


class Server:
    """``salon-reports serve --workers 2`` in a subprocess, on the test database and Redis."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = env
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("wb") as output:
            self.process = subprocess.Popen(
                [*SERVE, "--port", str(self.port), "--workers", "2"],
                cwd=ROOT,
                env=self.env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: the workers die with it
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"the server did not start:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.process is None:
            return
        with_group = os.getpgid(self.process.pid)
        os.killpg(with_group, signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(with_group, signal.SIGKILL)
            self.process.wait(5)
        self.process = None


@pytest.fixture
def server(database_url: str, clean_db: str, redis_url: str, tmp_path: Path) -> Iterator[Server]:
    seed_database(database_url, bookings=6000, salons=6, days=200, seed=8)
    env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
    env.update(
        {
            "DATABASE_URL": database_url,
            "REPORTS_READ_DATABASE_URL": "",
            "REDIS_URL": redis_url,
            "REPORTS_ENVIRONMENT": "test",
            "REPORTS_JWT_SECRET": secrets.token_hex(32),
            "REPORTS_SLOW_QUERY_MS": "1",  # every report query shows up as a slow one
            "REPORTS_JAEGER_URL": JAEGER,
            "PYTHONUNBUFFERED": "1",
        }
    )
    running = Server(env, tmp_path / "server.log")
    try:
        running.start()
        yield running
    finally:
        running.stop()


def _cold_requests(server: Server, token: str) -> list[str]:
    """Platform-wide reports over windows nobody else asks for: SQL runs, under these traces."""
    trace_ids = []
    end = datetime.now(UTC).date() - timedelta(days=3)
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}) as http:
        for days in (150, 160):
            for report in ("dashboard", "bookings", "professionals"):
                params = {"start": (end - timedelta(days=days)).isoformat(), "end": str(end)}
                response = http.get(f"/api/v1/optimized-reports/{report}", params=params)
                assert response.status_code == 200, response.text
                assert response.headers["x-cache"] == "MISS"
                trace_ids.append(response.headers["x-trace-id"])
    return trace_ids


def _publish_a_worker_with_an_n_plus_one(redis_url: str, trace_id: str) -> None:
    """A third worker's snapshot, published as workers do, holding an N+1 detection."""
    stats = StatsAggregator(worker_id="test-only-worker")
    stats.record_n_plus_one(
        "GET /test-only/n-plus-one",
        "SELECT name FROM professionals WHERE id = %(id)s",
        12,
        trace_id,
    )
    snapshot = stats.snapshot(
        pool={"size": 15, "in_use": 0, "waiting": 0, "timeouts": 0},
        memory={"rss_bytes": 50 * 2**20, "limit_bytes": 0},
    )
    client = redis.Redis.from_url(redis_url)
    try:
        client.hset(
            STATS_KEY, "test-only-worker", orjson.dumps({"at": time.time(), "snapshot": snapshot})
        )
    finally:
        client.close()


def _chromium() -> Any:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service as ChromeService
    except ImportError:
        pytest.fail("the browser test needs selenium: pip install 'selenium>=4.20'")
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not binary.exists():
            pytest.fail(
                f"{binary} is missing: apt-get install -y --no-install-recommends"
                " chromium chromium-driver"
            )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=ChromeService(str(CHROMEDRIVER)), options=options)


# What the page shows, read in one go: it redraws every second, so elements go stale.
READ_PAGE = """
const all = (selector) => [...document.querySelectorAll(selector)];
const chart = (id) => ({
  bars: all(`#${id} rect.bar`).map((bar) => ({
    kind: bar.getAttribute("class").split("bar-")[1],
    width: Number(bar.getAttribute("width")),
    ms: Number(bar.getAttribute("data-ms")),
  })),
  labels: all(`#${id} text.label`).map((text) => text.firstChild.nodeValue),
  thresholds: all(`#${id} line.threshold`).map((line) => line.getAttribute("class")),
  text: document.getElementById(id).textContent,
});
const overall = document.querySelector("#chart-hit-rate path.series.overall");
return {
  polls: Number(document.body.dataset.polls || 0),
  login_shown: !document.getElementById("login").hidden,
  status: document.getElementById("status").textContent,
  banner_classes: document.getElementById("alerts").getAttribute("class"),
  breached: all("#alerts li[data-alert]").map((item) => item.dataset.alert),
  endpoints: chart("chart-endpoints"),
  queries: chart("chart-queries"),
  hit_rate: chart("chart-hit-rate"),
  hit_rate_points: overall ? Number(overall.dataset.points) : 0,
  cache: chart("chart-cache"),
  pool: chart("chart-pool"),
  memory: chart("chart-memory"),
  budget: chart("chart-budget"),
  slow_links: all("#table-slow a.trace").map((link) => link.href),
  n_plus_one_links: all("#table-n-plus-one a.trace").map((link) => link.href),
  n_plus_one_text: document.getElementById("table-n-plus-one").textContent,
  fields_read: window.salonReportsPerformance.fieldsRead(),
};
"""


def test_the_page_in_headless_chromium(server: Server, redis_url: str) -> None:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    secret = server.env["REPORTS_JWT_SECRET"]
    simulate = [CLI, "simulate", "--url", server.url]
    simulation = subprocess.run(
        [*simulate, "--rps", "40", "--writes-per-min", "30", "--duration", "5"],
        cwd=ROOT,
        env=server.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert simulation.returncode == 0, simulation.stderr
    assert re.search(r"requests: \d+ sent", simulation.stdout), simulation.stdout
    assert re.search(r"status: 200: \d+", simulation.stdout), simulation.stdout
    cold_traces = _cold_requests(server, issue_token(secret, role="admin"))
    _publish_a_worker_with_an_n_plus_one(redis_url, cold_traces[0])

    driver = _chromium()
    try:
        driver.get(f"{server.url}/performance?refresh=1")
        assert driver.execute_script(READ_PAGE)["login_shown"]
        assert not driver.find_element(By.ID, "dashboard").is_displayed()
        driver.find_element(By.ID, "token").send_keys(issue_token(secret, role="ops"))
        driver.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()

        def trace_ids(links: list[str]) -> set[str]:
            return {link.rsplit("/", 1)[-1] for link in links}

        last: list[dict[str, Any]] = []
        token = issue_token(secret, role="ops")
        # Every slow query's trace id that an answer of the stats showed right after the page
        # was read (the list holds 50, far more than those seconds add). The page shows the
        # merged list of the worker that answered its last poll; another worker merges the
        # first one's entries from a snapshot published up to 2 s later.
        seen: set[str] = set()

        def read_stats() -> dict[str, Any]:
            answer: dict[str, Any] = httpx.get(
                f"{server.url}{STATS}", headers={"Authorization": f"Bearer {token}"}
            ).json()
            seen.update(entry["trace_id"] for entry in answer["recent_slow_queries"])
            return answer

        def settled(_: Any) -> dict[str, Any] | None:
            page: dict[str, Any] = driver.execute_script(READ_PAGE)
            last[:] = [page]
            ready = (
                page["polls"] >= 5
                and trace_ids(page["slow_links"]) & set(cold_traces)
                and page["n_plus_one_links"]
            )
            return page if ready else None

        try:
            page = WebDriverWait(driver, 20, poll_frequency=0.25).until(settled)
        except TimeoutException:
            raise AssertionError(
                f"the page did not settle: {last} {driver.get_log('browser')} cold traces"
                f" {cold_traces}"
            ) from None
        stats = read_stats()
        for _ in range(3):  # and what the workers publish (every 2 s) after the page's poll
            time.sleep(0.8)
            read_stats()

        # Latency charts: bars for real routes and queries, the two threshold lines.
        for chart, label, kinds in (
            ("endpoints", "GET …/dashboard", {"p50", "p95", "p99"}),
            ("queries", "report.dashboard", {"mean", "p95", "max"}),
        ):
            bars = page[chart]["bars"]
            assert {bar["kind"] for bar in bars} == kinds
            assert all(bar["width"] >= 1 and bar["ms"] > 0 for bar in bars)
            assert label in page[chart]["labels"]
            assert sorted(page[chart]["thresholds"]) == ["threshold alert", "threshold target"]
            assert "target 100 ms" in page[chart]["text"]
            assert "alert 500 ms" in page[chart]["text"]
        # Hit rate over time, from the tab's own history, with the 70 % line.
        assert page["hit_rate_points"] >= 3
        assert page["hit_rate"]["thresholds"] == ["threshold alert"]
        assert "alert below 70 %" in page["hit_rate"]["text"]
        # Lookups per report, split by result.
        assert {bar["kind"] for bar in page["cache"]["bars"]} >= {"hits", "misses"}
        assert {"dashboard", "bookings", "professionals"} <= set(page["cache"]["labels"])
        # Pool and memory of every worker: two real ones and the one the test published.
        assert stats["workers"] >= 3
        assert f"{stats['workers']} workers" in page["status"]
        assert re.search(r"\d+ of \d+ in use · \d+ waiting", page["pool"]["text"])
        assert re.search(r"\d+ MiB", page["memory"]["text"])
        # Error budgets: both SLOs, with the figures of every worker's counts in Redis (the
        # last report request was seconds before the page's last poll: all published).
        assert stats["slo"]["source"] == "redis"
        assert sorted(page["budget"]["labels"]) == ["availability", "latency"]
        for objective in stats["slo"]["objectives"].values():
            month = objective["windows"]["30d"]
            assert month["requests"] > 0
            assert f"{month['bad']} bad of {month['requests']}" in page["budget"]["text"]
            assert objective["budget_left"] is not None
        assert "burn 5m" in page["budget"]["text"]
        # The banner: every query is slower than REPORTS_SLOW_QUERY_MS=1.
        assert "breached" in page["banner_classes"].split()
        assert "query_p95" in page["breached"]
        # Trace ids link to Jaeger, and they are real: the ones the stats and clients saw.
        assert page["slow_links"]
        for link in page["slow_links"]:
            assert link.startswith(f"{JAEGER}/trace/")
            assert TRACE_ID.match(link.rsplit("/", 1)[-1])
        assert trace_ids(page["slow_links"]) <= seen
        assert page["n_plus_one_links"] == [f"{JAEGER}/trace/{cold_traces[0]}"]
        assert "SELECT name FROM professionals" in page["n_plus_one_text"]

        # The page read only what it declares, all of it, and nothing went wrong in it.
        declared = set(stats_fields())
        prefixes = {
            field[: match.start()] for field in declared for match in re.finditer(r"\.|\[\]", field)
        }
        assert set(page["fields_read"]) - declared - prefixes == set()
        assert declared <= set(page["fields_read"])
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == []

        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1280, int(height) + 120)
        ARTIFACTS.mkdir(exist_ok=True)
        screenshot = ARTIFACTS / "performance-page.png"
        assert driver.save_screenshot(str(screenshot))
        assert screenshot.stat().st_size > 50_000
        if os.environ.get("UPDATE_SCREENSHOT") == "1" or not README_SCREENSHOT.exists():
            README_SCREENSHOT.parent.mkdir(exist_ok=True)
            shutil.copyfile(screenshot, README_SCREENSHOT)
    finally:
        driver.quit()
