"""The load generator of the chaos scenarios, and the figures it produces.

``clients`` asyncio tasks share one httpx connection pool and loop over a fixed mix of report
requests (owners of a few salons and an admin asking platform-wide; dashboard, bookings and
professionals over a few date windows), with a short pause between requests. Every request has
a total time limit, so a hang is counted as a ``timeout`` instead of being waited for. Each
response is recorded with the phase it started in (``before`` / ``during`` / ``after`` the
fault, set by the test), its status, latency, ``X-Cache`` and whether the body equals the
reference answer computed before the fault.

What can go wrong with a request, besides its status:

- ``refused``: no connection (nothing listens);
- ``no-response``: the connection closed before a response started (e.g. a keep-alive
  connection the server closed while shutting down);
- ``cut``: the response started but its body did not arrive whole;
- ``timeout``: no complete answer within the client's time limit.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

import httpx
import orjson

from benchmarks.stats import percentile

PREFIX = "/api/v1/optimized-reports"
PHASES = ("before", "during", "after")
REPORTS = ("dashboard", "bookings", "professionals")


@dataclass(frozen=True)
class Call:
    """One kind of request of the mix."""

    label: str
    report: str
    params: tuple[tuple[str, str], ...]
    token: str
    cold: bool = False  # a new random window every time: never answered from the cache

    @property
    def path(self) -> str:
        return f"{PREFIX}/{self.report}"

    def request_params(self, rng: random.Random, today: date) -> dict[str, str]:
        params = dict(self.params)
        if self.cold:
            end = today - timedelta(days=rng.randrange(1, 150))
            start = end - timedelta(days=rng.randrange(3, 60))
            params.update(start=start.isoformat(), end=end.isoformat())
        return params


def windows(today: date) -> dict[str, tuple[str, str]]:
    """A few date windows, fixed for a run (explicit dates: no default depends on the clock)."""

    def days_ago(days: int) -> str:
        return (today - timedelta(days=days)).isoformat()

    return {
        "30d": (days_ago(30), days_ago(1)),
        "90d": (days_ago(90), days_ago(1)),
        "week-60d-ago": (days_ago(66), days_ago(60)),
    }


def standard_mix(
    today: date, salons: list[int], owner_token: dict[int, str], admin_token: str, *, cold: bool
) -> list[Call]:
    """Owners of ``salons``, every report, every window, an admin's platform-wide dashboard
    and bookings; with ``cold``, also one never-cached professionals request per salon."""
    calls = []
    for salon in salons:
        for report in REPORTS:
            for name, (start, end) in windows(today).items():
                params = (("salon_id", str(salon)), ("start", start), ("end", end))
                calls.append(
                    Call(f"owner s{salon} {report} {name}", report, params, owner_token[salon])
                )
    start, end = windows(today)["30d"]
    for report in ("dashboard", "bookings"):
        calls.append(
            Call(
                f"admin platform {report} 30d",
                report,
                (("start", start), ("end", end)),
                admin_token,
            )
        )
    if cold:
        for salon in salons:
            salon_only = (("salon_id", str(salon)),)
            calls.append(
                Call(
                    f"owner s{salon} professionals cold",
                    "professionals",
                    salon_only,
                    owner_token[salon],
                    cold=True,
                )
            )
    return calls


@dataclass
class Sample:
    call: int
    phase: str
    started: float  # time.monotonic() when it was sent
    seconds: float
    status: int | None = None
    failure: str | None = None  # refused, no-response, cut, timeout
    cache: str | None = None
    correct: bool | None = None  # 200 and equal to the reference; None: no reference
    json_body: bool = False  # the body (answer or error) is complete, valid JSON
    error_code: str | None = None
    retry_after: str | None = None
    trace_id: str | None = None

    @property
    def ended(self) -> float:
        return self.started + self.seconds

    @property
    def kind(self) -> str:
        """The status code, or how it failed."""
        return str(self.status) if self.status is not None else str(self.failure)


@dataclass
class LoadGenerator:
    base_url: str
    calls: list[Call]
    expected: dict[int, Any]  # call index -> the reference body (parsed), for warm calls
    today: date
    clients: int = 8
    timeout: float = 10.0
    pause: float = 0.01
    seed: int = 1
    phase: str = "before"
    samples: list[Sample] = field(default_factory=list)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _http: httpx.AsyncClient | None = None

    async def __aenter__(self) -> LoadGenerator:
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(self.timeout),
            limits=httpx.Limits(
                max_connections=self.clients, max_keepalive_connections=self.clients
            ),
        )
        return self

    def start(self) -> None:
        """Start the clients (after the warm-up)."""
        self._tasks = [
            asyncio.create_task(self._client(random.Random(self.seed * 1000 + number)))
            for number in range(self.clients)
        ]

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Stop sending; the requests in flight finish (each within its time limit)."""
        self._stopping.set()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks = []
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def run_phase(self, name: str, seconds: float) -> None:
        self.phase = name
        await asyncio.sleep(seconds)

    async def _client(self, rng: random.Random) -> None:
        position = rng.randrange(len(self.calls))
        while not self._stopping.is_set():
            position = (position + 1) % len(self.calls)
            self.samples.append(await self.send(position, rng))
            await asyncio.sleep(self.pause * rng.uniform(0.5, 1.5))

    async def send(self, index: int, rng: random.Random | None = None) -> Sample:
        """One request of the mix, measured and checked."""
        assert self._http is not None
        call = self.calls[index]
        params = call.request_params(rng or random.Random(), self.today)
        headers = {"Authorization": f"Bearer {call.token}"}
        sample = Sample(index, self.phase, time.monotonic(), 0.0)
        body = b""
        started_response = False
        try:
            async with asyncio.timeout(self.timeout):
                async with self._http.stream(
                    "GET", call.path, params=params, headers=headers
                ) as response:
                    started_response = True
                    sample.status = response.status_code
                    sample.cache = response.headers.get("x-cache")
                    sample.retry_after = response.headers.get("retry-after")
                    sample.trace_id = response.headers.get("x-trace-id")
                    body = await response.aread()
        except (TimeoutError, httpx.TimeoutException):
            sample.failure = "timeout"
        except httpx.ConnectError:
            sample.failure = "refused"
        except httpx.TransportError:
            sample.failure = "cut" if started_response else "no-response"
        sample.seconds = time.monotonic() - sample.started
        if sample.failure is not None:
            sample.status = None
            return sample
        try:
            parsed = orjson.loads(body)
            sample.json_body = True
        except orjson.JSONDecodeError:
            return sample
        if sample.status == 200:
            if index in self.expected:
                sample.correct = parsed == self.expected[index]
        elif isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            sample.error_code = parsed["error"].get("code")
        return sample


# -- figures ----------------------------------------------------------------------------------


def served_from_cache(sample: Sample) -> bool:
    return sample.cache in ("HIT", "STALE")


def hit_rate(samples: Iterable[Sample]) -> float | None:
    """Share of the answered report requests that the cache served (HIT or STALE)."""
    answered = [sample for sample in samples if sample.status == 200 and sample.cache is not None]
    if not answered:
        return None
    return round(sum(served_from_cache(sample) for sample in answered) / len(answered), 4)


def phase_figures(samples: list[Sample]) -> dict[str, Any]:
    latencies = [sample.seconds * 1000 for sample in samples]
    return {
        "requests": len(samples),
        "by_status": dict(sorted(Counter(sample.kind for sample in samples).items())),
        "by_cache": dict(sorted(Counter(sample.cache or "-" for sample in samples).items())),
        "p50_ms": round(percentile(latencies, 0.50), 1) if latencies else None,
        "p99_ms": round(percentile(latencies, 0.99), 1) if latencies else None,
        "max_ms": round(max(latencies), 1) if latencies else None,
        "hit_rate": hit_rate(samples),
        "wrong_answers": sum(sample.correct is False for sample in samples),
    }


def by_phase(samples: list[Sample]) -> dict[str, list[Sample]]:
    grouped: dict[str, list[Sample]] = {phase: [] for phase in PHASES}
    for sample in samples:
        grouped.setdefault(sample.phase, []).append(sample)
    return grouped


def figures(samples: list[Sample]) -> dict[str, Any]:
    """Per phase: requests, by status, p50/p99/max, hit rate; and the totals."""
    return {
        "requests": len(samples),
        "by_status": dict(sorted(Counter(sample.kind for sample in samples).items())),
        "phases": {name: phase_figures(group) for name, group in by_phase(samples).items()},
    }


def describe(samples: Iterable[Sample], limit: int = 5) -> str:
    """A few samples, readably, for assertion messages."""
    lines = [
        f"{sample.phase} call={sample.call} status={sample.kind} cache={sample.cache} "
        f"{sample.seconds * 1000:.0f} ms code={sample.error_code} correct={sample.correct}"
        for sample in list(samples)[:limit]
    ]
    return "\n".join(lines)
