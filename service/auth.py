"""Bearer tokens: HS256 JWTs carrying ``sub``, ``role``, ``salon_ids`` and ``exp``.

``iat``, ``nbf`` and ``exp`` are checked with a leeway of a few seconds (two hosts' clocks are
never exactly equal); ``iss`` and ``aud`` are required and checked when the service is given
an issuer and an audience.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, get_args

import jwt

Role = Literal["admin", "ops", "owner"]
ROLES: tuple[str, ...] = get_args(Role)
ALGORITHM = "HS256"
DEFAULT_LEEWAY_SECONDS = 30.0
LATEST_EXPIRY = 253_402_300_799  # 9999-12-31T23:59:59Z: beyond it, not a real expiry


class InvalidToken(Exception):
    """The token is missing, malformed, badly signed, expired or carries bad claims."""


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str
    role: Role
    salon_ids: frozenset[int]
    expires_at: float = 0.0

    @property
    def scope_key(self) -> str:
        """The part of a cache key that separates what principals may see."""
        return self.role


def issue_token(
    secret: str,
    *,
    role: Role,
    salon_ids: list[int] | None = None,
    ttl_seconds: int = 3600,
    subject: str | None = None,
    issuer: str | None = None,
    audience: str | None = None,
) -> str:
    now = int(time.time())
    claims: dict[str, object] = {
        "sub": subject or f"{role}-cli",
        "role": role,
        "iat": now,
        "exp": now + ttl_seconds,
    }
    if role == "owner":
        claims["salon_ids"] = sorted(set(salon_ids or []))
    if issuer is not None:
        claims["iss"] = issuer
    if audience is not None:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def decode_token(
    secret: str,
    token: str,
    *,
    leeway: float = DEFAULT_LEEWAY_SECONDS,
    issuer: str | None = None,
    audience: str | None = None,
) -> Principal:
    """Verify ``token`` (algorithm pinned to HS256) and return who it speaks for.

    ``leeway`` seconds of clock skew are accepted on ``iat``, ``nbf`` and ``exp``. With an
    ``issuer`` or an ``audience`` the claim must be present and equal; without an audience a
    token naming one is refused (it was meant for another service).
    """
    required = ["exp", "sub", "role"]
    if issuer is not None:
        required.append("iss")
    if audience is not None:
        required.append("aud")
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={"require": required},
            leeway=leeway,
            issuer=issuer,
            audience=audience,
        )
    except jwt.PyJWTError as error:
        raise InvalidToken(str(error)) from error
    role = claims.get("role")
    subject = claims.get("sub")
    if role not in ROLES or not isinstance(subject, str) or not subject:
        raise InvalidToken("unknown role or subject")
    expiry = claims["exp"]
    # PyJWT accepts any `int()`-able expiry ("123", 10**400); only a plain number is one.
    if isinstance(expiry, bool) or not isinstance(expiry, int | float) or expiry > LATEST_EXPIRY:
        raise InvalidToken("exp must be a number of seconds since the epoch")
    raw_ids = claims.get("salon_ids", [])
    if role == "owner":
        if not isinstance(raw_ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in raw_ids
        ):
            raise InvalidToken("salon_ids must be a list of integers")
        salon_ids = frozenset(raw_ids)
    else:
        salon_ids = frozenset()
    return Principal(subject=subject, role=role, salon_ids=salon_ids, expires_at=float(expiry))


class TokenVerifier:
    """Verifies tokens, remembering each verified one until it expires.

    The same string carries the same signature, so a token verified once need not be verified
    again; its expiry is still checked on every use. Bounded: the memory is dropped when full.
    """

    def __init__(
        self,
        secret: str,
        max_entries: int = 10_000,
        *,
        leeway: float = DEFAULT_LEEWAY_SECONDS,
        issuer: str | None = None,
        audience: str | None = None,
    ) -> None:
        self.secret = secret
        self.max_entries = max_entries
        self.leeway = leeway
        self.issuer = issuer
        self.audience = audience
        self._verified: dict[str, Principal] = {}

    def verify(self, token: str) -> Principal:
        known = self._verified.get(token)
        if known is not None and known.expires_at + self.leeway > time.time():
            return known
        principal = decode_token(
            self.secret, token, leeway=self.leeway, issuer=self.issuer, audience=self.audience
        )
        if len(self._verified) >= self.max_entries:
            self._verified.clear()
        self._verified[token] = principal
        return principal
