"""Alembic migrations of the salon-reports schema."""
