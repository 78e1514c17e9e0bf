"""A mergeable latency sketch: a log-bucketed histogram with a relative-error guarantee.

``LatencySketch`` follows DDSketch (Masson, Rim and Lee, VLDB 2019). A positive value ``x`` is
counted in bucket ``k = ceil(log_gamma(x))``, which holds the values in
``(gamma**(k-1), gamma**k]`` with ``gamma = (1 + alpha) / (1 - alpha)``; a quantile is answered
with the bucket's representative ``2 * gamma**k / (gamma + 1)``, whose distance to any value of
the bucket is at most ``alpha`` times that value.

Guarantee (``alpha`` = ``relative_accuracy``, 0.01 by default): for a sketch of ``n`` values and
any ``q`` in [0, 1], ``quantile(q)`` returns ``v`` with ``|v - x| <= alpha * x``, where ``x`` is
the value of rank ``floor(q * (n - 1))`` (0-based) among the values sorted ascending — the
"lower" quantile. The bound holds for values from 1e-300 to 1e300 (below the smallest normal
float, exp() loses the precision it needs), however the sketch was built (``add`` in any
order, ``merge`` of any sketches, a ``to_dict``/``from_dict`` round trip); zeros are kept
apart and answered exactly. ``quantile(0)`` is the minimum and
``quantile(1)`` the maximum, exactly. ``count``, ``sum``, ``min`` and ``max`` are exact.

Size: one dict entry per non-empty bucket, at most ``ln(max / min) / ln(gamma)`` of them —
about 1 100 at 1 % for anything between 1 µs and one hour, whatever the number of values.
Merging is adding bucket counts, so it is exact, associative and commutative.

Cost: ``add`` is a logarithm and a dict update. No I/O, no locks: callers serialise access
(``telemetry.stats`` holds the lock). Emits no metric or span itself.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["DEFAULT_RELATIVE_ACCURACY", "LatencySketch"]

DEFAULT_RELATIVE_ACCURACY = 0.01

# gamma is derived from a hair less than the stated accuracy: float rounding in log() can put
# a value sitting exactly on a bucket edge into the neighbouring bucket, and this margin keeps
# even that case inside the stated bound.
_ROUNDING_MARGIN = 1e-7

_INF = math.inf
_log = math.log
_ceil = math.ceil


class LatencySketch:
    """Log-bucketed histogram of non-negative values (milliseconds, say); see the module doc."""

    __slots__ = (
        "_bins",
        "_count",
        "_gamma",
        "_log_gamma",
        "_max",
        "_min",
        "_multiplier",
        "_sum",
        "_zero",
        "relative_accuracy",
    )

    def __init__(self, relative_accuracy: float = DEFAULT_RELATIVE_ACCURACY) -> None:
        if not 0.0 < relative_accuracy < 1.0:
            raise ValueError(f"relative_accuracy must be in (0, 1), got {relative_accuracy!r}")
        self.relative_accuracy = relative_accuracy
        internal = relative_accuracy * (1.0 - _ROUNDING_MARGIN)
        self._gamma = (1.0 + internal) / (1.0 - internal)
        self._log_gamma = math.log(self._gamma)
        self._multiplier = 1.0 / self._log_gamma
        self._bins: dict[int, int] = {}
        self._zero = 0
        self._count = 0
        self._sum = 0.0
        self._min = _INF
        self._max = -_INF

    # -- recording -------------------------------------------------------------------------

    def add(self, value: float) -> None:
        """Count one value; ``ValueError`` for a negative, NaN or infinite one."""
        if 0.0 < value < _INF:
            key = _ceil(_log(value) * self._multiplier)
            bins = self._bins
            bins[key] = bins.get(key, 0) + 1
        elif value == 0.0:
            self._zero += 1
        else:
            raise ValueError(f"a sketch holds finite values >= 0, got {value!r}")
        self._count += 1
        self._sum += value
        if value > self._max:
            self._max = value
        if value < self._min:
            self._min = value

    def merge(self, other: LatencySketch) -> None:
        """Add every value of ``other`` to this sketch (exact: bucket counts add up)."""
        if other.relative_accuracy != self.relative_accuracy:
            raise ValueError(
                "cannot merge sketches of different accuracy: "
                f"{self.relative_accuracy} and {other.relative_accuracy}"
            )
        if other._count == 0:
            return
        bins = self._bins
        for key, count in other._bins.items():
            bins[key] = bins.get(key, 0) + count
        self._zero += other._zero
        self._count += other._count
        self._sum += other._sum
        if other._max > self._max:
            self._max = other._max
        if other._min < self._min:
            self._min = other._min

    def copy(self) -> LatencySketch:
        clone = LatencySketch(self.relative_accuracy)
        clone.merge(self)
        return clone

    # -- reading ---------------------------------------------------------------------------

    @property
    def count(self) -> int:
        return self._count

    @property
    def sum(self) -> float:
        return self._sum

    @property
    def min(self) -> float | None:
        return self._min if self._count else None

    @property
    def max(self) -> float | None:
        return self._max if self._count else None

    @property
    def mean(self) -> float | None:
        return self._sum / self._count if self._count else None

    @property
    def bucket_count(self) -> int:
        """Number of non-empty buckets (the sketch's size), the zero bucket included."""
        return len(self._bins) + (1 if self._zero else 0)

    def quantile(self, q: float) -> float | None:
        """Estimate of the value of rank ``floor(q * (count - 1))``; ``None`` when empty."""
        return self.quantiles((q,))[0]

    def quantiles(self, qs: Sequence[float]) -> list[float | None]:
        """``quantile`` for several ``q`` at once, sorting the buckets a single time."""
        for q in qs:
            if not 0.0 <= q <= 1.0:
                raise ValueError(f"quantile must be in [0, 1], got {q!r}")
        if self._count == 0:
            return [None for _ in qs]
        ranks = sorted(
            (math.floor(q * (self._count - 1)), position) for position, q in enumerate(qs)
        )
        answers: list[float | None] = [None] * len(qs)
        keys = iter(sorted(self._bins))
        seen = self._zero  # values of rank < seen are known (zeros, then earlier buckets)
        estimate = 0.0
        last = self._count - 1
        for rank, position in ranks:
            if rank in (0, last):  # the extremes are known exactly
                answers[position] = self._min if rank == 0 else self._max
                continue
            while rank >= seen:
                key = next(keys)
                seen += self._bins[key]
                estimate = self._representative(key)
            answers[position] = estimate
        return answers

    def _representative(self, key: int) -> float:
        try:
            estimate = 2.0 * math.exp(key * self._log_gamma) / (self._gamma + 1.0)
        except OverflowError:
            return self._max
        # The true value lies in [min, max]: clamping can only bring the estimate closer.
        return min(max(estimate, self._min), self._max)

    # -- serialisation ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Compact JSON-serialisable form; bucket keys are delta-encoded (small integers)."""
        keys = sorted(self._bins)
        deltas = [keys[0]] if keys else []
        deltas.extend(b - a for a, b in itertools.pairwise(keys))
        return {
            "relative_accuracy": self.relative_accuracy,
            "count": self._count,
            "sum": self._sum,
            "min": self.min,
            "max": self.max,
            "zero": self._zero,
            "key_deltas": deltas,
            "counts": [self._bins[key] for key in keys],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencySketch:
        """Inverse of ``to_dict``; ``ValueError`` when ``data`` is not a consistent sketch."""
        try:
            sketch = cls(float(data["relative_accuracy"]))
            deltas = _int_list(data["key_deltas"])
            counts = _int_list(data["counts"])
            zero = _non_negative_int(data["zero"])
            count = _non_negative_int(data["count"])
            total = float(data["sum"])
            low, high = data["min"], data["max"]
        except (KeyError, TypeError) as error:
            raise ValueError(f"not a serialised LatencySketch: {error!r}") from error
        if len(deltas) != len(counts) or any(c <= 0 for c in counts):
            raise ValueError("sketch buckets are inconsistent")
        if any(d <= 0 for d in deltas[1:]):
            raise ValueError("sketch bucket keys are not strictly increasing")
        if zero + sum(counts) != count:
            raise ValueError("sketch bucket counts do not add up to its count")
        key = 0
        for index, (delta, bucket_count) in enumerate(zip(deltas, counts, strict=True)):
            key = delta if index == 0 else key + delta
            sketch._bins[key] = bucket_count
        sketch._zero = zero
        sketch._count = count
        sketch._sum = total
        if count:
            if not isinstance(low, int | float) or not isinstance(high, int | float):
                raise ValueError("a non-empty sketch needs numeric min and max")
            sketch._min = float(low)
            sketch._max = float(high)
        return sketch

    # -- comparison ------------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LatencySketch):
            return NotImplemented
        return (
            self.relative_accuracy == other.relative_accuracy
            and self._bins == other._bins
            and self._zero == other._zero
            and self._count == other._count
            and self._sum == other._sum
            and self.min == other.min
            and self.max == other.max
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return (
            f"LatencySketch(relative_accuracy={self.relative_accuracy}, count={self._count}, "
            f"min={self.min}, max={self.max}, buckets={self.bucket_count})"
        )


def _non_negative_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    return value


def _int_list(values: Iterable[Any]) -> list[int]:
    result = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
        result.append(value)
    return result
