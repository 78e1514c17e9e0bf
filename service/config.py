"""Settings: one pydantic-settings class; environment variables override ``.env``.

Outside an explicitly chosen ``REPORTS_ENVIRONMENT=development`` (the default is
``production``) a missing, short or placeholder ``REPORTS_JWT_SECRET`` refuses to start: anyone
who can read this file could otherwise sign an admin token. ``serving_settings`` adds the same
rule for a server listening beyond the loopback interface, whatever the environment.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.reports.names import ReportName

DEV_PLACEHOLDER_SECRET = "dev-only-insecure-secret-change-me"
MIN_SECRET_BYTES = 32
# Words of secrets copied from an example rather than generated.
PLACEHOLDER_WORDS = ("change-me", "changeme", "change_me", "placeholder", "insecure")
SECRET_ADVICE = (
    "set REPORTS_JWT_SECRET to a random value of at least 32 bytes (for example the output of "
    "`openssl rand -hex 32`); only an explicit REPORTS_ENVIRONMENT=development on a loopback "
    "address runs without one"
)


class ConfigurationError(SystemExit):
    """The configuration is unsafe or invalid: the process exits with this message.

    A ``SystemExit``: the CLI prints the message (never a traceback, nor the values read,
    which may hold passwords) and exits with status 1.
    """

    def __init__(self, message: str) -> None:
        super().__init__(f"salon-reports: refusing to start: {message}")


def weak_secret_reason(secret: str, *, explicitly_set: bool = True) -> str | None:
    """Why ``secret`` must not sign tokens, or None when it may."""
    if not explicitly_set or not secret:
        return "REPORTS_JWT_SECRET is not set"
    if secret == DEV_PLACEHOLDER_SECRET or any(
        word in secret.lower() for word in PLACEHOLDER_WORDS
    ):
        return "REPORTS_JWT_SECRET is a placeholder"
    if len(secret.encode()) < MIN_SECRET_BYTES:
        return f"REPORTS_JWT_SECRET is shorter than {MIN_SECRET_BYTES} bytes"
    return None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    environment: Literal["development", "test", "production"] = Field(
        "production", alias="REPORTS_ENVIRONMENT"
    )
    database_url: str = Field(..., alias="DATABASE_URL")
    read_database_url: str | None = Field(None, alias="REPORTS_READ_DATABASE_URL")
    # Behind a transaction-pooling PgBouncer: the listener and the change stream need a session
    # of their own (LISTEN, the replication protocol, session advisory locks), so they connect
    # here; the pools' per-session settings become per-transaction ones (``db.async_engine``).
    direct_database_url: str | None = Field(None, alias="REPORTS_DIRECT_DATABASE_URL")
    transaction_pooling: bool = Field(False, alias="REPORTS_DB_TRANSACTION_POOLING")
    redis_url: str = Field("", alias="REDIS_URL")
    # REDIS_URL names one node of a Redis Cluster: redis-py's cluster client discovers the rest.
    redis_cluster: bool = Field(False, alias="REPORTS_REDIS_CLUSTER")
    jwt_secret: str = Field(DEV_PLACEHOLDER_SECRET, alias="REPORTS_JWT_SECRET", repr=False)
    jwt_leeway: float = Field(30.0, alias="REPORTS_JWT_LEEWAY", ge=0, le=3600)
    jwt_issuer: str | None = Field(None, alias="REPORTS_JWT_ISSUER")
    jwt_audience: str | None = Field(None, alias="REPORTS_JWT_AUDIENCE")

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
    # After an invalidation's writes, WAIT until this many replicas have them (0: never; a node
    # with no replica connected is not waited on), at most this long (service/cache/durability.py).
    redis_wait_replicas: int = Field(1, alias="REPORTS_REDIS_WAIT_REPLICAS", ge=0)
    redis_wait_timeout_ms: int = Field(100, alias="REPORTS_REDIS_WAIT_TIMEOUT_MS", ge=1, le=5000)
    cache_lock_lease: float = Field(15.0, alias="REPORTS_CACHE_LOCK_LEASE", gt=0)
    cache_local_entries: int = Field(5000, alias="REPORTS_CACHE_LOCAL_ENTRIES", ge=0)
    cache_local_max_age: float = Field(30.0, alias="REPORTS_CACHE_LOCAL_MAX_AGE", gt=0)
    # Keys read within this many seconds are recomputed after an invalidation and refreshed
    # ahead of their expiry (0: neither).
    cache_refresh_recent: float = Field(120.0, alias="REPORTS_CACHE_REFRESH_RECENT", ge=0)
    jaeger_url: str = Field("http://localhost:16686", alias="REPORTS_JAEGER_URL")
    # Fair share between tenants (service/fairness.py); None: derived from the pool size.
    tenant_max_concurrent: int | None = Field(None, alias="REPORTS_TENANT_MAX_CONCURRENT", ge=1)
    tenant_queue: int | None = Field(None, alias="REPORTS_TENANT_QUEUE", ge=0)
    tenant_queue_timeout: float = Field(1.0, alias="REPORTS_TENANT_QUEUE_TIMEOUT", gt=0, le=60)
    admin_max_concurrent: int | None = Field(None, alias="REPORTS_ADMIN_MAX_CONCURRENT", ge=1)
    # A tenant refused again within its Retry-After gets that 429 after this many seconds
    # (0: at once): a closed-loop flood then sends fewer requests (service/fairness.py).
    tenant_repeat_refusal_delay: float = Field(
        0.5, alias="REPORTS_TENANT_REPEAT_REFUSAL_DELAY", ge=0, le=10
    )

    @property
    def session_database_url(self) -> str:
        """Where connections that need a server session of their own go."""
        return self.direct_database_url or self.database_url

    @property
    def tenant_limit(self) -> int:
        """Report computations one tenant may run at once, across every worker: a quarter of
        one worker's connections (rounded up) unless set."""
        if self.tenant_max_concurrent is not None:
            return self.tenant_max_concurrent
        return max(1, -(-(self.pool_size + self.pool_max_overflow) // 4))

    @property
    def admin_limit(self) -> int | None:
        """The admin class's share (the back office and platform-wide reports): none unless
        set; its computations still take connection turns round-robin with the salons'."""
        return self.admin_max_concurrent

    @property
    def tenant_queue_length(self) -> int:
        """Computations of one tenant that may wait in a worker beyond its running ones."""
        return self.tenant_queue if self.tenant_queue is not None else 2 * self.tenant_limit

    @property
    def tenant_lease_seconds(self) -> float:
        """How long a shared tenant slot outlives a worker that crashed holding it: longer
        than a computation may take (connection wait plus statement timeout)."""
        return self.statement_timeout_ms / 1000 + self.pool_timeout + 5.0

    def cache_ttl(self, report: str) -> int:
        """Seconds a cached report stays fresh (``report``: one of ``CACHED_REPORTS``)."""
        ttls = {
            ReportName.DASHBOARD: self.cache_ttl_dashboard,
            ReportName.BOOKINGS: self.cache_ttl_bookings,
            ReportName.PROFESSIONALS: self.cache_ttl_professionals,
        }
        return ttls[ReportName(report)]

    @property
    def weak_secret(self) -> str | None:
        """Why the JWT secret is unfit outside development, or None."""
        return weak_secret_reason(
            self.jwt_secret, explicitly_set="jwt_secret" in self.model_fields_set
        )

    @field_validator("jwt_issuer", "jwt_audience")
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        return value or None

    @model_validator(mode="after")
    def _refuse_weak_secret(self) -> Settings:
        reason = self.weak_secret
        if reason is not None and self.environment != "development":
            raise ValueError(f"{reason} (REPORTS_ENVIRONMENT={self.environment}); {SECRET_ADVICE}")
        return self


def _describe(error: ValidationError) -> str:
    """The errors without the input values (they may hold the database password)."""
    lines = []
    for detail in error.errors(include_url=False, include_input=False, include_context=False):
        message = detail["msg"].removeprefix("Value error, ")
        names = ".".join(str(part) for part in detail["loc"])
        lines.append(f"{names}: {message}" if names else message)
    return "; ".join(lines)


@lru_cache
def get_settings() -> Settings:
    """The process's settings; ``ConfigurationError`` (exit 1, a clear message) when unsafe."""
    try:
        return Settings()
    except ValidationError as error:
        raise ConfigurationError(_describe(error)) from None


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve to any interface


def serving_settings(host: str) -> Settings:
    """``get_settings()`` for a server about to listen on ``host``.

    Beyond the loopback interface a weak secret is refused even in development: whoever can
    reach the port could sign their own admin token.
    """
    settings = get_settings()
    reason = settings.weak_secret
    if reason is not None and not is_loopback(host):
        raise ConfigurationError(f"{reason} and the server would listen on {host}; {SECRET_ADVICE}")
    return settings
