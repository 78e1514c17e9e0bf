"""The reports, by name: the one list every other module names a report from."""

from __future__ import annotations

from enum import StrEnum


class ReportName(StrEnum):
    DASHBOARD = "dashboard"
    BOOKINGS = "bookings"
    PROFESSIONALS = "professionals"
    REALTIME = "realtime"


# The reports the cache holds (realtime is never cached).
CACHED_REPORTS = (ReportName.DASHBOARD, ReportName.BOOKINGS, ReportName.PROFESSIONALS)
