"""N+1 detection: the statements of one request counted by fingerprint.

``RequestQueryTracker`` counts one request's statements (no lock: one per request);
``statement_fingerprint`` gives statements that differ only by inlined values one name, with no
value in it. The telemetry middleware reports a fingerprint run five times or more in one
request to the stats aggregator (``record_n_plus_one``) as an N+1 pattern.
"""

from __future__ import annotations

import re


class RequestQueryTracker:
    """Counts the statements of one request to spot N+1 patterns; one per request, no lock."""

    __slots__ = ("_counts", "_max_statements", "total")

    def __init__(self, max_statements: int = 1000) -> None:
        self._counts: dict[str, int] = {}
        self._max_statements = max_statements
        self.total = 0

    def add(self, statement_fingerprint: str) -> None:
        counts = self._counts
        self.total += 1
        count = counts.get(statement_fingerprint)
        if count is not None:
            counts[statement_fingerprint] = count + 1
        elif len(counts) < self._max_statements:
            counts[statement_fingerprint] = 1

    def detections(self, threshold: int = 5) -> dict[str, int]:
        """Fingerprints executed at least ``threshold`` times, with their counts."""
        return {
            fingerprint: count for fingerprint, count in self._counts.items() if count >= threshold
        }


_COMMENT = re.compile(r"/\*.*?\*/|--[^\n]*", re.DOTALL)
_STRING = re.compile(r"'(?:[^']|'')*'")
_NUMBER = re.compile(r"(?<![\w$.])-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?\b")
_IN_LIST = re.compile(r"\(\s*\?(?:\s*,\s*\?)+\s*\)")
_SPACE = re.compile(r"\s+")


def statement_fingerprint(sql: str, max_length: int = 500) -> str:
    """SQL text with comments dropped, literals replaced by ``?`` and whitespace collapsed.

    Statements that differ only by inlined values share a fingerprint, and no value reaches
    telemetry. Bound parameters (``%(name)s``, ``$1``, ``:name``) are kept as they are.
    """
    text = _COMMENT.sub(" ", sql)
    text = _STRING.sub("?", text)
    text = _NUMBER.sub("?", text)
    text = _IN_LIST.sub("(?)", text)
    return _SPACE.sub(" ", text).strip()[:max_length]
