"""The schema as SQLAlchemy 2 models; the Alembic migrations create exactly these tables, and
the ones in ``NOT_MODELLED``.

Not modelled: the tables derived from ``bookings`` (``service.changes.derived``: rollups, visit
days and pairs, first bookings) and the change stream's position. The migrations create them in
SQL, the change stream writes them in SQL, and no code maps them to objects. ``include_name``
keeps ``alembic revision --autogenerate`` from proposing to drop them (``migrations/env.py``);
``tests/test_migrations.py`` checks that autogenerate proposes nothing at all.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from service.changes import derived

BOOKING_STATUSES = ("pending", "confirmed", "completed", "cancelled", "no_show")
NOT_MODELLED = frozenset((*derived.TABLES, "change_stream_position"))


def include_name(name: str | None, type_: str, parent_names: object) -> bool:
    """Alembic's filter: autogenerate compares every table but those ``NOT_MODELLED``."""
    return not (type_ == "table" and name in NOT_MODELLED)


class Base(DeclarativeBase):
    pass


class Salon(Base):
    __tablename__ = "salons"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    timezone: Mapped[str] = mapped_column(Text, server_default="UTC")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class User(Base):
    __tablename__ = "users"
    __table_args__ = (Index("idx_users_role_created", "role", "created_at"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    role: Mapped[str] = mapped_column(Text)
    email: Mapped[str] = mapped_column(Text, unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Professional(Base):
    __tablename__ = "professionals"
    __table_args__ = (Index("idx_professionals_salon_active", "salon_id", "is_active"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    salon_id: Mapped[int] = mapped_column(ForeignKey("salons.id", ondelete="CASCADE"))
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    name: Mapped[str] = mapped_column(Text)
    is_active: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Service(Base):
    __tablename__ = "services"
    __table_args__ = (
        Index("idx_services_salon_category", "salon_id", "category"),
        CheckConstraint("price_cents >= 0", name="ck_services_price_nonnegative"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    salon_id: Mapped[int] = mapped_column(ForeignKey("salons.id", ondelete="CASCADE"))
    category: Mapped[str] = mapped_column(Text)
    name: Mapped[str] = mapped_column(Text)
    price_cents: Mapped[int] = mapped_column(Integer)
    duration_min: Mapped[int] = mapped_column(Integer)


class Booking(Base):
    __tablename__ = "bookings"
    __table_args__ = (
        CheckConstraint(
            "status IN ('pending', 'confirmed', 'completed', 'cancelled', 'no_show')",
            name="ck_bookings_status",
        ),
        CheckConstraint("price_cents >= 0", name="ck_bookings_price_nonnegative"),
        Index("idx_bookings_scheduled_at_status", "scheduled_at", "status"),
        Index("idx_bookings_professional_scheduled", "professional_id", "scheduled_at"),
        Index("idx_bookings_service_scheduled", "service_id", "scheduled_at"),
        Index("idx_bookings_client_scheduled", "client_id", "scheduled_at"),
        Index("idx_bookings_status_completed", "status", "completed_at"),
        # Covering index for every per-salon report: the period scan is index-only.
        Index(
            "idx_bookings_salon_scheduled_covering",
            "salon_id",
            "scheduled_at",
            postgresql_include=[
                "status",
                "price_cents",
                "client_id",
                "service_id",
                "professional_id",
            ],
        ),
        # "Has this client booked at this salon before the period?" (new vs returning clients).
        Index("idx_bookings_salon_client_scheduled", "salon_id", "client_id", "scheduled_at"),
        # A period of every salon's bookings, index-only (migration 0003).
        Index(
            "idx_bookings_scheduled_covering",
            "scheduled_at",
            postgresql_include=[
                "salon_id",
                "status",
                "price_cents",
                "client_id",
                "service_id",
                "professional_id",
            ],
        ),
        # The professionals' own clients on a page of the report (migration 0004).
        Index(
            "idx_bookings_professional_scheduled_covering",
            "professional_id",
            "scheduled_at",
            postgresql_include=["client_id", "status"],
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    salon_id: Mapped[int] = mapped_column(ForeignKey("salons.id", ondelete="CASCADE"))
    client_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    professional_id: Mapped[int] = mapped_column(ForeignKey("professionals.id"))
    service_id: Mapped[int] = mapped_column(ForeignKey("services.id"))
    scheduled_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    status: Mapped[str] = mapped_column(Text)
    price_cents: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class AuditEvent(Base):
    __tablename__ = "audit_events"
    __table_args__ = (
        Index("idx_audit_events_created_type", "created_at", "event_type"),
        Index("idx_audit_events_entity", "entity_type", "entity_id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    entity_type: Mapped[str] = mapped_column(Text)
    entity_id: Mapped[int] = mapped_column(BigInteger)
    event_type: Mapped[str] = mapped_column(Text)
    actor_id: Mapped[int | None] = mapped_column(BigInteger)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
