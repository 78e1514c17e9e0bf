"""What a plan is made of (salons, services, professionals, users, where ids start) and the
date arithmetic every step shares."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from service.tools.seed.catalog import DAY


@dataclass(slots=True)
class Service:
    id: int
    category: int  # index into the salon's categories
    name: str
    price_cents: int
    duration_min: int
    weight: float


@dataclass(slots=True)
class Professional:
    id: int
    name: str
    categories: list[int]
    start_day: int  # first day index it takes bookings
    end_day: int  # first day index it no longer does (days when still active)
    created_at: int  # epoch seconds
    weight: int  # 1 or 2: senior professionals are booked twice as often
    user: int = -1  # index into the user list, then the user id


@dataclass(slots=True)
class Salon:
    id: int
    name: str
    timezone: str
    created_at: int
    start_day: int
    weight: float
    cancel_rate: float
    no_show_rate: float
    hours: list[tuple[int, int] | None]  # (open, close) minutes per weekday, None = closed
    categories: list[str] = field(default_factory=list)
    services: list[Service] = field(default_factory=list)
    professionals: list[Professional] = field(default_factory=list)
    owner: int = -1  # index into the user list
    bookings: int = 0
    clients: list[int] = field(default_factory=list)  # global client indexes, by signup
    client_cumulative: list[float] = field(default_factory=list)
    client_signup_days: list[int] = field(default_factory=list)


@dataclass(slots=True)
class User:
    role: str
    created_at: int
    id: int = 0


@dataclass(frozen=True, slots=True)
class Start:
    """Where appended rows start: the current maximum id of every table."""

    salons: int
    users: int
    professionals: int
    services: int
    bookings: int
    audit_events: int
    has_admins: bool


def local_day_starts(zone: str, first: date, days: int) -> list[int]:
    """Per local date from ``first``: the epoch to which adding a wall-clock time of that day
    (in seconds since midnight) gives its instant in the zone.

    DST switches happen at night, so the UTC offset at noon holds for any time from about
    04:00 on, which covers every time a booking is scheduled at.
    """
    tz = ZoneInfo(zone)
    starts = []
    for day in range(days):
        current = first + timedelta(days=day)
        offset = datetime(current.year, current.month, current.day, 12, tzinfo=tz).utcoffset()
        assert offset is not None
        starts.append(epoch_of(current) - int(offset.total_seconds()))
    return starts


def cumulative(weights: Iterable[float]) -> list[float]:
    total, out = 0.0, []
    for weight in weights:
        total += weight
        out.append(total)
    return out


def epoch_of(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())


class Timestamps(dict[int, str]):
    """Days since the epoch -> ``"YYYY-MM-DD "`` (filled on demand), with the 86,400 times of
    day as ``"HH:MM:SS+00"``: an epoch becomes timestamptz text in two look-ups."""

    def __init__(self) -> None:
        super().__init__()
        self.time_of_day = [
            f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}+00" for s in range(DAY)
        ]

    def __missing__(self, epoch_day: int) -> str:
        text = (date(1970, 1, 1) + timedelta(days=epoch_day)).isoformat() + " "
        self[epoch_day] = text
        return text

    def format(self, epoch: int) -> str:
        return self[epoch // DAY] + self.time_of_day[epoch % DAY]
