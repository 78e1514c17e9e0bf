"""Reading the service's ``/metrics`` and ``/performance/stats`` during a scenario."""

from __future__ import annotations

from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

Series = list[tuple[dict[str, str], float]]


def samples(exposition: str, name: str) -> Series:
    """Every sample of the series ``name`` (exact sample name, e.g. ``…_total``)."""
    found = []
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name:
                found.append((dict(sample.labels), float(sample.value)))
    return found


def total(series: Series, **labels: str) -> float:
    return sum(
        value for found, value in series if all(found.get(k) == v for k, v in labels.items())
    )


async def scrape(base_url: str) -> str:
    async with httpx.AsyncClient(base_url=base_url, timeout=5) as http:
        response = await http.get("/metrics")
        response.raise_for_status()
        return response.text


async def stats(base_url: str, token: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base_url, timeout=5) as http:
        response = await http.get(
            "/api/v1/optimized-reports/performance/stats",
            headers={"Authorization": f"Bearer {token}"},
        )
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body


def cache_results(exposition: str) -> dict[str, float]:
    """``reports.cache.requests`` by result, summed over reports and workers."""
    series = samples(exposition, "reports_cache_requests_total")
    results = {labels["cache_result"] for labels, _ in series}
    return {result: total(series, cache_result=result) for result in sorted(results)}
