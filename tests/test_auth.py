"""Token verification and its memory of verified tokens."""

from __future__ import annotations

import time

import pytest

from service.auth import InvalidToken, TokenVerifier, issue_token

SECRET = "s" * 40


def test_a_verified_token_is_remembered_but_its_expiry_still_checked() -> None:
    verifier = TokenVerifier(SECRET)
    token = issue_token(SECRET, role="owner", salon_ids=[3], ttl_seconds=1)
    principal = verifier.verify(token)
    assert principal.role == "owner"
    assert principal.salon_ids == frozenset({3})
    assert verifier.verify(token) is principal  # from memory
    time.sleep(max(0.0, principal.expires_at - time.time()) + 0.05)
    with pytest.raises(InvalidToken):
        verifier.verify(token)


def test_a_changed_token_is_verified_afresh() -> None:
    verifier = TokenVerifier(SECRET)
    token = issue_token(SECRET, role="admin")
    verifier.verify(token)
    header, payload, signature = token.split(".")
    with pytest.raises(InvalidToken):
        verifier.verify(f"{header}.{payload}.{signature[:-2]}AA")
    with pytest.raises(InvalidToken):
        TokenVerifier("another-secret-of-enough-length-000").verify(token)


def test_memory_is_bounded() -> None:
    verifier = TokenVerifier(SECRET, max_entries=3)
    for subject in range(10):
        verifier.verify(issue_token(SECRET, role="ops", subject=f"user-{subject}"))
    assert len(verifier._verified) <= 3
