"""Normalised report parameters: what a report is asked for, independent of HTTP spelling."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

Granularity = Literal["day", "week", "month"]
Status = Literal["pending", "confirmed", "completed", "cancelled", "no_show"]
STATUSES: tuple[Status, ...] = ("pending", "confirmed", "completed", "cancelled", "no_show")
MAX_PERIOD_DAYS = 366
DEFAULT_PERIOD_DAYS = 30
PLATFORM_TIMEZONE = "UTC"
# Far enough inside `date.min`/`date.max` that a period's bounds, its week and month buckets
# and any time zone's offset stay representable (the day after 9999-12-31 is not).
EARLIEST_DATE = date(1900, 1, 1)
LATEST_DATE = date(9998, 12, 31)


@dataclass(frozen=True, slots=True)
class Scope:
    """Whose data: one salon (in its own time zone) or the whole platform (UTC)."""

    salon_id: int | None
    timezone: str = PLATFORM_TIMEZONE

    @property
    def is_platform(self) -> bool:
        return self.salon_id is None


@dataclass(frozen=True, slots=True)
class Period:
    """Inclusive range of local calendar days."""

    start: date
    end: date

    @property
    def days(self) -> int:
        return (self.end - self.start).days + 1

    def bounds(self, timezone: str) -> tuple[datetime, datetime]:
        """Half-open instants [start 00:00 local, day after end 00:00 local)."""
        zone = ZoneInfo(timezone)
        return (
            datetime.combine(self.start, time(), zone),
            datetime.combine(self.end + timedelta(days=1), time(), zone),
        )


@dataclass(frozen=True, slots=True)
class BookingFilters:
    professional_id: int | None = None
    service_id: int | None = None
    status: Status | None = None


def default_period(today: date) -> Period:
    return Period(start=today - timedelta(days=DEFAULT_PERIOD_DAYS - 1), end=today)


def local_today(timezone: str, now: datetime | None = None) -> date:
    moment = now or datetime.now(ZoneInfo("UTC"))
    return moment.astimezone(ZoneInfo(timezone)).date()
