"""Where the API lives: the one place that spells the prefix of its paths."""

from __future__ import annotations

API_PREFIX = "/api/v1/optimized-reports"
STATS_PATH = f"{API_PREFIX}/performance/stats"
