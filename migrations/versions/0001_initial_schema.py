"""Initial schema: salons, users, professionals, services, bookings, audit events and indexes.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _created_at() -> sa.Column[sa.DateTime]:
    return sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    )


def upgrade() -> None:
    op.create_table(
        "salons",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("timezone", sa.Text, nullable=False, server_default="UTC"),
        _created_at(),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("role", sa.Text, nullable=False),
        sa.Column("email", sa.Text, nullable=False, unique=True),
        _created_at(),
    )
    op.create_index("idx_users_role_created", "users", ["role", "created_at"])
    op.create_table(
        "professionals",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column(
            "salon_id",
            sa.BigInteger,
            sa.ForeignKey("salons.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("user_id", sa.BigInteger, sa.ForeignKey("users.id", ondelete="SET NULL")),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("is_active", sa.Boolean, nullable=False, server_default=sa.true()),
        _created_at(),
    )
    op.create_index("idx_professionals_salon_active", "professionals", ["salon_id", "is_active"])
    op.create_table(
        "services",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column(
            "salon_id",
            sa.BigInteger,
            sa.ForeignKey("salons.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("category", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("price_cents", sa.Integer, nullable=False),
        sa.Column("duration_min", sa.Integer, nullable=False),
        sa.CheckConstraint("price_cents >= 0", name="ck_services_price_nonnegative"),
    )
    op.create_index("idx_services_salon_category", "services", ["salon_id", "category"])
    op.create_table(
        "bookings",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column(
            "salon_id",
            sa.BigInteger,
            sa.ForeignKey("salons.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("client_id", sa.BigInteger, sa.ForeignKey("users.id"), nullable=False),
        sa.Column(
            "professional_id", sa.BigInteger, sa.ForeignKey("professionals.id"), nullable=False
        ),
        sa.Column("service_id", sa.BigInteger, sa.ForeignKey("services.id"), nullable=False),
        sa.Column("scheduled_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("price_cents", sa.Integer, nullable=False),
        _created_at(),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("completed_at", sa.DateTime(timezone=True)),
        sa.Column("cancelled_at", sa.DateTime(timezone=True)),
        sa.CheckConstraint(
            "status IN ('pending', 'confirmed', 'completed', 'cancelled', 'no_show')",
            name="ck_bookings_status",
        ),
        sa.CheckConstraint("price_cents >= 0", name="ck_bookings_price_nonnegative"),
    )
    op.create_index("idx_bookings_scheduled_at_status", "bookings", ["scheduled_at", "status"])
    op.create_index(
        "idx_bookings_professional_scheduled", "bookings", ["professional_id", "scheduled_at"]
    )
    op.create_index("idx_bookings_service_scheduled", "bookings", ["service_id", "scheduled_at"])
    op.create_index("idx_bookings_client_scheduled", "bookings", ["client_id", "scheduled_at"])
    op.create_index("idx_bookings_status_completed", "bookings", ["status", "completed_at"])
    op.create_index(
        "idx_bookings_salon_scheduled_covering",
        "bookings",
        ["salon_id", "scheduled_at"],
        postgresql_include=["status", "price_cents", "client_id", "service_id", "professional_id"],
    )
    op.create_index(
        "idx_bookings_salon_client_scheduled", "bookings", ["salon_id", "client_id", "scheduled_at"]
    )
    op.create_table(
        "audit_events",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("entity_type", sa.Text, nullable=False),
        sa.Column("entity_id", sa.BigInteger, nullable=False),
        sa.Column("event_type", sa.Text, nullable=False),
        sa.Column("actor_id", sa.BigInteger),
        sa.Column("payload", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        _created_at(),
    )
    op.create_index("idx_audit_events_created_type", "audit_events", ["created_at", "event_type"])
    op.create_index("idx_audit_events_entity", "audit_events", ["entity_type", "entity_id"])


def downgrade() -> None:
    for table in ("audit_events", "bookings", "services", "professionals", "users", "salons"):
        op.drop_table(table)
