"""Bearer tokens: HS256 JWTs carrying ``sub``, ``role``, ``salon_ids`` and ``exp``."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, get_args

import jwt

Role = Literal["admin", "ops", "owner"]
ROLES: tuple[str, ...] = get_args(Role)
ALGORITHM = "HS256"
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
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def decode_token(secret: str, token: str) -> Principal:
    """Verify ``token`` (algorithm pinned to HS256) and return who it speaks for."""
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={"require": ["exp", "sub", "role"]},
            leeway=0,
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

    def __init__(self, secret: str, max_entries: int = 10_000) -> None:
        self.secret = secret
        self.max_entries = max_entries
        self._verified: dict[str, Principal] = {}

    def verify(self, token: str) -> Principal:
        known = self._verified.get(token)
        if known is not None and known.expires_at > time.time():
            return known
        principal = decode_token(self.secret, token)
        if len(self._verified) >= self.max_entries:
            self._verified.clear()
        self._verified[token] = principal
        return principal
