"""Token attacks (docs/api.md): every forged, tampered or malformed token is a 401 on every endpoint
that needs one; every valid token out of its scope is a 403, even when the answer is cached.

The simplest cases (a wrong key, an expired token, ``alg: none``, an unknown role, ``salon_ids``
not a list, a payload swapped in) are in ``tests/test_api.py``; this matrix adds the variants an
attacker tries next. Tokens are built by hand (``_jws``) so that nothing a library refuses to
produce is out of reach, and a control case proves the hand-built path yields a good token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from service.auth import Role
from service.cache import NAMESPACE
from tests.security.conftest import (
    PREFIX,
    REPORTS,
    LiveServer,
    assert_json_error,
    raw_request,
)
from tests.support import redis_client

TokenFactory = Callable[[str, dict[str, int]], str]

# Every endpoint behind a token: (method, path, needs a salon_id query).
PROTECTED = [
    *[("GET", f"{PREFIX}/{report}", True) for report in REPORTS],
    ("GET", f"{PREFIX}/performance/stats", False),
    ("POST", f"{PREFIX}/cache/clear", False),
]

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PUBLIC_PEM = RSA_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _json(value: object) -> bytes:
    import json

    return json.dumps(value, separators=(",", ":")).encode()


def _jws(header: object, payload: object | bytes, key: bytes | None, digest: str = "sha256") -> str:
    """A compact JWS with any header and payload, HMAC-signed with ``key`` (unsigned if None)."""
    raw_payload = payload if isinstance(payload, bytes) else _json(payload)
    signing_input = f"{_b64(_json(header))}.{_b64(raw_payload)}"
    if key is None:
        return f"{signing_input}."
    signature = hmac.new(key, signing_input.encode(), getattr(hashlib, digest)).digest()
    return f"{signing_input}.{_b64(signature)}"


HS256 = {"alg": "HS256", "typ": "JWT"}


def _claims(**changes: object) -> dict[str, object]:
    claims: dict[str, object] = {"sub": "mallory", "role": "admin", "exp": int(time.time()) + 600}
    for name, value in changes.items():
        if value is _DROP:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


_DROP = object()


def _signed(secret: str, **changes: object) -> str:
    """A correctly signed HS256 token whose claims are the admin's with ``changes``."""
    return _jws(HS256, _claims(**changes), secret.encode())


def _owner(secret: str, salon_ids: object) -> str:
    return _signed(secret, role="owner", salon_ids=salon_ids)


def _resign_payload(token: str, payload: dict[str, object]) -> str:
    """Swap the payload of a real token, keeping its header and signature."""
    header, _, signature = token.split(".")
    return f"{header}.{_b64(_json(payload))}.{signature}"


UNAUTHORISED: dict[str, TokenFactory] = {
    # The algorithm is pinned: whatever the header says, only HS256 with our secret passes.
    "alg-none-capitalised": lambda s, d: _jws({"alg": "None", "typ": "JWT"}, _claims(), None),
    "alg-none-uppercase": lambda s, d: _jws({"alg": "NONE"}, _claims(), None),
    "alg-none-with-an-hs256-signature": lambda s, d: _jws({"alg": "none"}, _claims(), s.encode()),
    "alg-missing": lambda s, d: _jws({"typ": "JWT"}, _claims(), s.encode()),
    "hs512-with-the-right-secret": lambda s, d: _jws(
        {"alg": "HS512", "typ": "JWT"}, _claims(), s.encode(), "sha512"
    ),
    "hs384-with-the-right-secret": lambda s, d: _jws(
        {"alg": "HS384"}, _claims(), s.encode(), "sha384"
    ),
    "rs256-signed-with-a-generated-rsa-key": lambda s, d: jwt.encode(
        _claims(), RSA_KEY, algorithm="RS256"
    ),
    "hs256-keyed-with-the-rsa-public-pem": lambda s, d: _jws(HS256, _claims(), RSA_PUBLIC_PEM),
    "rs256-header-hmac-keyed-with-the-secret": lambda s, d: _jws(
        {"alg": "RS256"}, _claims(), s.encode()
    ),
    "es256-signed-with-a-generated-ec-key": lambda s, d: jwt.encode(
        _claims(), EC_KEY, algorithm="ES256"
    ),
    # Wrong keys.
    "hs256-empty-key": lambda s, d: _jws(HS256, _claims(), b""),
    "hs256-secret-plus-one-character": lambda s, d: _jws(HS256, _claims(), f"{s}x".encode()),
    "hs256-secret-truncated": lambda s, d: _jws(HS256, _claims(), s[:-1].encode()),
    "hs256-the-placeholder-secret": lambda s, d: _jws(
        HS256, _claims(), b"dev-only-insecure-secret-change-me"
    ),
    # Time claims, beyond the default leeway (30 s of clock skew).
    "expired-a-minute-ago": lambda s, d: _signed(s, exp=int(time.time()) - 60),
    "exp-not-a-number": lambda s, d: _signed(s, exp="never"),
    "exp-null": lambda s, d: _signed(s, exp=None),
    "exp-beyond-any-float": lambda s, d: _jws(
        HS256, b'{"sub":"mallory","role":"admin","exp":1' + b"0" * 400 + b"}", s.encode()
    ),
    "nbf-in-the-future": lambda s, d: _signed(s, nbf=int(time.time()) + 3600),
    "iat-in-the-future": lambda s, d: _signed(s, iat=int(time.time()) + 3600),
    # Tampering after signing.
    "salon-ids-swapped-in-the-signed-payload": lambda s, d: _resign_payload(
        _owner(s, [d["newyork"]]),
        {**_claims(role="owner"), "salon_ids": [d["newyork"], d["lisbon"]]},
    ),
    "role-raised-to-admin-in-the-signed-payload": lambda s, d: _resign_payload(
        _owner(s, [d["newyork"]]), _claims()
    ),
    "signature-stripped": lambda s, d: _signed(s).rsplit(".", 1)[0] + ".",
    "signature-of-another-token": lambda s, d: (
        _signed(s, sub="mallory").rsplit(".", 1)[0]
        + "."
        + _signed(s, sub="someone-else").rsplit(".", 1)[1]
    ),
    # Claims a signed token must still get right.
    "role-missing": lambda s, d: _signed(s, role=_DROP),
    "sub-missing": lambda s, d: _signed(s, sub=_DROP),
    "exp-missing": lambda s, d: _signed(s, exp=_DROP),
    "sub-not-a-string": lambda s, d: _signed(s, sub=7),
    "role-unknown-case": lambda s, d: _signed(s, role="Admin"),
    "role-with-trailing-space": lambda s, d: _signed(s, role="admin "),
    "role-a-list": lambda s, d: _signed(s, role=["admin"]),
    "role-null": lambda s, d: _signed(s, role=None),
    "salon-ids-an-integer": lambda s, d: _owner(s, d["lisbon"]),
    "salon-ids-strings": lambda s, d: _owner(s, [str(d["lisbon"])]),
    "salon-ids-booleans": lambda s, d: _owner(s, [True]),
    "salon-ids-floats": lambda s, d: _owner(s, [float(d["lisbon"])]),
    "salon-ids-nested": lambda s, d: _owner(s, [[d["lisbon"]]]),
    "salon-ids-an-object": lambda s, d: _owner(s, {str(d["lisbon"]): True}),
    "salon-ids-null": lambda s, d: _owner(s, None),
    "payload-a-json-array": lambda s, d: _jws(HS256, [_claims()], s.encode()),
    "payload-json-null": lambda s, d: _jws(HS256, None, s.encode()),
    "payload-not-json": lambda s, d: _jws(HS256, b"role=admin", s.encode()),
    "header-not-json": lambda s, d: "bm90IGpzb24." + _signed(s).split(".", 1)[1],
    # Garbage.
    "one-word": lambda s, d: "garbage",
    "four-segments": lambda s, d: _signed(s) + ".AAAA",
    "dots-only": lambda s, d: "...",
    "non-base64-segments": lambda s, d: "!!!.$$$.%%%",
    "very-long": lambda s, d: "eyJ" * 3000,
    "non-ascii": lambda s, d: "tökén.ünïcödé.☃",
}


def _call(
    client: httpx.Client, method: str, path: str, salon: bool, data: dict[str, int], **kwargs: Any
) -> httpx.Response:
    params = {"salon_id": data["lisbon"]} if salon else {}
    json_body = {} if method == "POST" else None
    return client.request(method, path, params=params, json=json_body, **kwargs)


def _bearer(token: str) -> dict[str, bytes]:
    # bytes: a token may carry characters a str header would refuse to encode.
    return {"Authorization": b"Bearer " + token.encode()}


def test_the_hand_built_tokens_are_accepted_when_nothing_is_wrong(
    live_server: LiveServer, client: httpx.Client
) -> None:
    """The control: the same construction, untampered, passes; so each 401 below is earned."""
    secret, data = live_server.settings.jwt_secret, live_server.data
    for token in (_signed(secret), _jws(HS256, _claims(), secret.encode())):
        for method, path, salon in PROTECTED:
            response = _call(client, method, path, salon, data, headers=_bearer(token))
            assert response.status_code == 200, (path, response.text)
    owner = _owner(secret, [data["lisbon"]])
    response = _call(client, "GET", f"{PREFIX}/dashboard", True, data, headers=_bearer(owner))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("make_token", UNAUTHORISED.values(), ids=UNAUTHORISED.keys())
def test_a_bad_token_is_401_everywhere(
    live_server: LiveServer, client: httpx.Client, make_token: TokenFactory
) -> None:
    token = make_token(live_server.settings.jwt_secret, live_server.data)
    for method, path, salon in PROTECTED:
        response = _call(client, method, path, salon, live_server.data, headers=_bearer(token))
        assert_json_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"


AUTHORIZATION_HEADERS: dict[str, Callable[[str], bytes | None]] = {
    "token-without-the-bearer-prefix": lambda token: token.encode(),
    "token-scheme": lambda token: b"Token " + token.encode(),
    "basic-scheme": lambda token: b"Basic " + base64.b64encode(b"admin:" + token.encode()),
    "bearer-with-no-token": lambda token: b"Bearer",
    "bearer-with-an-empty-token": lambda token: b"Bearer ",
    "bearer-with-blank-token": lambda token: b"Bearer    ",
    "empty-header": lambda token: b"",
    "token-followed-by-junk": lambda token: b"Bearer " + token.encode() + b" junk",
    "two-tokens-with-a-comma": lambda token: b"Bearer " + token.encode() + b", " + token.encode(),
    "tab-instead-of-space": lambda token: b"Bearer\t" + token.encode(),
    "latin1-bytes": lambda token: b"Bearer \xe9\xff\xfe",
    "no-header-token-in-the-query": lambda token: None,
}


@pytest.mark.parametrize(
    "make_header", AUTHORIZATION_HEADERS.values(), ids=AUTHORIZATION_HEADERS.keys()
)
def test_a_malformed_authorization_header_is_401_everywhere(
    live_server: LiveServer, client: httpx.Client, make_header: Callable[[str], bytes | None]
) -> None:
    """A valid admin token, presented any way but ``Authorization: Bearer <token>``."""
    token = live_server.token("admin")
    value = make_header(token)
    header = b"" if value is None else b"\r\nAuthorization: " + value
    for method, path, salon in PROTECTED:
        # Raw bytes: HTTP clients refuse to send some of these (a trailing blank, say).
        query = f"?access_token={token}" + (
            f"&salon_id={live_server.data['lisbon']}" if salon else ""
        )
        body = b"{}" if method == "POST" else b""
        head = (
            f"{method} {path}{query} HTTP/1.1\r\nHost: test\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}"
        ).encode() + header
        assert_json_error(raw_request(live_server, head, body), 401, "unauthorized")


# -- scope: 403 ---------------------------------------------------------------------------


def _warm(client: httpx.Client, live_server: LiveServer, report: str, salon: int | None) -> None:
    """Have an admin put the report in the cache first: a cached answer must not skip scope."""
    params = {} if salon is None else {"salon_id": salon}
    response = client.get(
        f"{PREFIX}/{report}", params=params, headers=_bearer(live_server.token("admin"))
    )
    assert response.status_code == 200, response.text


def _owner_of(live_server: LiveServer, *salons: int) -> str:
    return live_server.token("owner", list(salons))


FORBIDDEN_REPORTS: dict[str, Callable[[LiveServer], tuple[str, int | None]]] = {
    "owner-of-a-asks-for-b": lambda s: (_owner_of(s, s.data["newyork"]), s.data["lisbon"]),
    "owner-of-no-salon-asks-for-one": lambda s: (_owner_of(s), s.data["lisbon"]),
    "owner-of-an-unknown-salon-asks-for-b": lambda s: (_owner_of(s, 999_999), s.data["lisbon"]),
    "owner-asks-platform-wide": lambda s: (_owner_of(s, s.data["lisbon"], s.data["newyork"]), None),
    "owner-of-no-salon-asks-platform-wide": lambda s: (_owner_of(s), None),
    "ops-asks-for-a-salon": lambda s: (s.token("ops"), s.data["lisbon"]),
    "ops-asks-platform-wide": lambda s: (s.token("ops"), None),
}


@pytest.mark.parametrize("report", REPORTS)
@pytest.mark.parametrize("who", FORBIDDEN_REPORTS.values(), ids=FORBIDDEN_REPORTS.keys())
def test_a_valid_token_out_of_scope_is_403_even_when_cached(
    live_server: LiveServer,
    client: httpx.Client,
    report: str,
    who: Callable[[LiveServer], tuple[str, int | None]],
) -> None:
    token, salon = who(live_server)
    if report != "realtime":  # realtime is never cached
        _warm(client, live_server, report, salon)
    params = {} if salon is None else {"salon_id": salon}
    response = client.get(f"{PREFIX}/{report}", params=params, headers=_bearer(token))
    assert_json_error(response, 403, "forbidden")
    assert "x-cache" not in response.headers
    assert "etag" not in response.headers


def _entry_keys(redis_url: str) -> set[bytes]:
    connection = redis_client(redis_url)
    try:
        return set(connection.scan_iter(match=f"{NAMESPACE}:*", count=500))
    finally:
        connection.close()


@pytest.mark.parametrize("role", ["owner", "ops"])
@pytest.mark.parametrize(
    "body",
    [None, {}, {"salon_id": "own"}, {"report": "dashboard", "salon_id": "own"}],
    ids=["no-body", "everything", "own-salon", "own-salon-one-report"],
)
def test_only_an_admin_may_clear_the_cache(
    live_server: LiveServer, client: httpx.Client, role: str, body: dict[str, Any] | None
) -> None:
    salon = live_server.data["lisbon"]
    _warm(client, live_server, "dashboard", salon)
    before = _entry_keys(live_server.settings.redis_url)
    assert before
    token = live_server.token("owner", [salon]) if role == "owner" else live_server.token("ops")
    if body is not None:
        body = {name: salon if value == "own" else value for name, value in body.items()}
    response = client.post(f"{PREFIX}/cache/clear", json=body, headers=_bearer(token))
    assert_json_error(response, 403, "forbidden")
    assert _entry_keys(live_server.settings.redis_url) >= before  # nothing was deleted


@pytest.mark.parametrize(("role", "status"), [("owner", 403), ("ops", 200), ("admin", 200)])
def test_performance_stats_are_for_admins_and_ops(
    live_server: LiveServer, client: httpx.Client, role: Role, status: int
) -> None:
    token = live_server.token(role, [live_server.data["lisbon"]] if role == "owner" else None)
    response = client.get(f"{PREFIX}/performance/stats", headers=_bearer(token))
    if status == 403:
        assert_json_error(response, 403, "forbidden")
    else:
        assert response.status_code == status, response.text
        assert "error" not in response.json()
