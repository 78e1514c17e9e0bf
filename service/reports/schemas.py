"""Response models of the report endpoints (the OpenAPI contract).

Money is integer cents; rates are floats in [0, 1] rounded to 4 decimals.
"""

from __future__ import annotations

from datetime import date, datetime

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StatusCounts(_Model):
    pending: int
    confirmed: int
    completed: int
    cancelled: int
    no_show: int


class ReportMeta(_Model):
    salon_id: int | None = Field(description="The salon, or null for a platform-wide report.")
    timezone: str = Field(description="Time zone of the calendar days (the salon's, or UTC).")
    start: date
    end: date


class TopService(_Model):
    service_id: int
    name: str
    bookings: int
    revenue_cents: int


class DailyPoint(_Model):
    date: date
    bookings: int
    completed: int
    revenue_cents: int


class DashboardReport(_Model):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "meta": {
                        "salon_id": 7,
                        "timezone": "Europe/Lisbon",
                        "start": "2026-10-28",
                        "end": "2026-11-26",
                    },
                    "bookings_total": 412,
                    "by_status": {
                        "pending": 20,
                        "confirmed": 41,
                        "completed": 301,
                        "cancelled": 38,
                        "no_show": 12,
                    },
                    "completion_rate": 0.7306,
                    "cancellation_rate": 0.0922,
                    "no_show_rate": 0.0291,
                    "revenue_cents": 1204500,
                    "average_ticket_cents": 4002,
                    "unique_clients": 233,
                    "new_clients": 61,
                    "returning_clients": 172,
                    "top_services": [
                        {
                            "service_id": 70,
                            "name": "Cut & blow-dry",
                            "bookings": 96,
                            "revenue_cents": 384000,
                        }
                    ],
                    "daily": [
                        {
                            "date": "2026-10-28",
                            "bookings": 14,
                            "completed": 10,
                            "revenue_cents": 41000,
                        }
                    ],
                }
            ]
        }
    )

    meta: ReportMeta
    bookings_total: int
    by_status: StatusCounts
    completion_rate: float = Field(ge=0, le=1)
    cancellation_rate: float = Field(ge=0, le=1)
    no_show_rate: float = Field(ge=0, le=1)
    revenue_cents: int = Field(description="Sum of completed bookings' prices.")
    average_ticket_cents: int = Field(description="revenue_cents / completed, rounded half up.")
    unique_clients: int
    new_clients: int = Field(
        description="Clients whose first booking ever in scope is in the period."
    )
    returning_clients: int
    top_services: list[TopService] = Field(max_length=5)
    daily: list[DailyPoint]


class SeriesPoint(_Model):
    bucket_start: date
    bookings: int
    completed: int
    cancelled: int
    no_show: int
    revenue_cents: int


class CategoryPoint(_Model):
    category: str
    bookings: int
    revenue_cents: int


class HourPoint(_Model):
    hour: int = Field(ge=0, le=23)
    bookings: int


class BookingsReport(_Model):
    meta: ReportMeta
    granularity: str
    series: list[SeriesPoint]
    by_category: list[CategoryPoint]
    by_hour: list[HourPoint]


class ProfessionalItem(_Model):
    professional_id: int
    name: str
    bookings: int
    completed: int
    cancelled: int
    no_show: int
    revenue_cents: int
    unique_clients: int
    returning_clients: int
    client_retention_rate: float = Field(ge=0, le=1)
    revenue_rank: int


class ProfessionalsReport(_Model):
    meta: ReportMeta
    items: list[ProfessionalItem]
    next_cursor: str | None


class RealtimeReport(_Model):
    salon_id: int | None
    timezone: str
    date: date
    as_of: datetime
    bookings_total: int
    by_status: StatusCounts
    revenue_cents: int
