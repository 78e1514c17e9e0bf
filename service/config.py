"""Settings: one pydantic-settings class; environment variables override ``.env``."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_PLACEHOLDER_SECRET = "dev-only-insecure-secret-change-me"
MIN_SECRET_LENGTH = 32


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    environment: Literal["development", "test", "production"] = Field(
        "development", alias="REPORTS_ENVIRONMENT"
    )
    database_url: str = Field(..., alias="DATABASE_URL")
    read_database_url: str | None = Field(None, alias="REPORTS_READ_DATABASE_URL")
    redis_url: str = Field("", alias="REDIS_URL")
    jwt_secret: str = Field(DEV_PLACEHOLDER_SECRET, alias="REPORTS_JWT_SECRET")

    cache_ttl_dashboard: int = Field(900, alias="REPORTS_CACHE_TTL_DASHBOARD", ge=1)
    cache_ttl_bookings: int = Field(600, alias="REPORTS_CACHE_TTL_BOOKINGS", ge=1)
    cache_ttl_professionals: int = Field(600, alias="REPORTS_CACHE_TTL_PROFESSIONALS", ge=1)
    cache_stale_grace: int = Field(60, alias="REPORTS_CACHE_STALE_GRACE", ge=0)

    slow_query_ms: float = Field(500.0, alias="REPORTS_SLOW_QUERY_MS", gt=0)
    statement_timeout_ms: int = Field(10_000, alias="REPORTS_STATEMENT_TIMEOUT_MS", ge=100)
    pool_size: int = Field(10, alias="REPORTS_DB_POOL_SIZE", ge=1)
    pool_max_overflow: int = Field(5, alias="REPORTS_DB_POOL_MAX_OVERFLOW", ge=0)
    pool_timeout: float = Field(5.0, alias="REPORTS_DB_POOL_TIMEOUT", gt=0)
    redis_timeout: float = Field(0.25, alias="REPORTS_REDIS_TIMEOUT", gt=0)
    redis_breaker_threshold: int = Field(3, alias="REPORTS_REDIS_BREAKER_THRESHOLD", ge=1)
    redis_breaker_cooldown: float = Field(5.0, alias="REPORTS_REDIS_BREAKER_COOLDOWN", gt=0)
    cache_lock_lease: float = Field(15.0, alias="REPORTS_CACHE_LOCK_LEASE", gt=0)
    cache_local_entries: int = Field(5000, alias="REPORTS_CACHE_LOCAL_ENTRIES", ge=0)
    cache_local_max_age: float = Field(30.0, alias="REPORTS_CACHE_LOCAL_MAX_AGE", gt=0)
    jaeger_url: str = Field("http://localhost:16686", alias="REPORTS_JAEGER_URL")

    @property
    def report_database_url(self) -> str:
        return self.read_database_url or self.database_url

    def cache_ttl(self, report: str) -> int:
        ttls = {
            "dashboard": self.cache_ttl_dashboard,
            "bookings": self.cache_ttl_bookings,
            "professionals": self.cache_ttl_professionals,
        }
        return ttls[report]

    @model_validator(mode="after")
    def _refuse_weak_secret(self) -> Settings:
        weak = self.jwt_secret == DEV_PLACEHOLDER_SECRET or len(self.jwt_secret) < MIN_SECRET_LENGTH
        if weak and self.environment != "development":
            raise ValueError(
                "REPORTS_JWT_SECRET is missing or weak (under 32 characters); "
                "set a long random value outside development"
            )
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()
