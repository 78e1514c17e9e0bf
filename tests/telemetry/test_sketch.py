"""LatencySketch: the relative-error guarantee against exact quantiles, merging, serialisation."""

from __future__ import annotations

import json
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from telemetry.sketch import LatencySketch

ACCURACIES = (0.001, 0.01, 0.05)

positive = st.floats(min_value=1e-300, max_value=1e300, allow_nan=False, allow_infinity=False)
latencies = st.floats(min_value=0.001, max_value=3_600_000.0)  # 1 µs .. 1 h, in ms
quantile = st.floats(min_value=0.0, max_value=1.0)


def exact_quantile(values: list[float], q: float) -> float:
    """The value the sketch estimates: rank floor(q * (n - 1)) of the sorted values."""
    ordered = sorted(values)
    return ordered[math.floor(q * (len(ordered) - 1))]


def sketch_of(values: list[float], accuracy: float = 0.01) -> LatencySketch:
    sketch = LatencySketch(accuracy)
    for value in values:
        sketch.add(value)
    return sketch


def assert_within_bound(estimate: float | None, exact: float, accuracy: float) -> None:
    assert estimate is not None
    assert abs(estimate - exact) <= accuracy * exact, (estimate, exact)


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(st.one_of(positive, st.just(0.0)), min_size=1, max_size=200),
    qs=st.lists(quantile, min_size=1, max_size=5),
    accuracy=st.sampled_from(ACCURACIES),
)
def test_every_quantile_is_within_the_relative_accuracy(
    values: list[float], qs: list[float], accuracy: float
) -> None:
    sketch = sketch_of(values, accuracy)
    for q in qs:
        assert_within_bound(sketch.quantile(q), exact_quantile(values, q), accuracy)
    for q, estimate in zip(qs, sketch.quantiles(qs), strict=True):
        assert estimate == sketch.quantile(q)


@settings(max_examples=100, deadline=None)
@given(
    parts=st.lists(st.lists(latencies, max_size=60), min_size=1, max_size=5),
    q=quantile,
)
def test_merged_sketch_equals_the_sketch_of_all_values(parts: list[list[float]], q: float) -> None:
    merged = LatencySketch()
    for part in parts:
        merged.merge(sketch_of(part))
    everything = [value for part in parts for value in part]
    whole = sketch_of(everything)
    assert merged.count == whole.count == len(everything)
    assert merged.min == whole.min
    assert merged.max == whole.max
    assert merged.quantile(q) == whole.quantile(q)
    assert merged.sum == pytest.approx(math.fsum(everything))
    if everything:
        assert_within_bound(merged.quantile(q), exact_quantile(everything, q), 0.01)


@settings(deadline=None)
@given(values=st.lists(st.one_of(latencies, st.just(0.0)), max_size=100))
def test_json_round_trip_is_lossless(values: list[float]) -> None:
    sketch = sketch_of(values)
    restored = LatencySketch.from_dict(json.loads(json.dumps(sketch.to_dict())))
    assert restored == sketch
    assert restored.quantiles([0.0, 0.5, 0.95, 0.99, 1.0]) == sketch.quantiles(
        [0.0, 0.5, 0.95, 0.99, 1.0]
    )


def test_a_realistic_distribution_stays_within_one_percent() -> None:
    generator = random.Random(4)
    values = [generator.lognormvariate(3.0, 1.2) for _ in range(50_000)]
    sketch = sketch_of(values)
    for q in (0.5, 0.9, 0.95, 0.99, 0.999):
        assert_within_bound(sketch.quantile(q), exact_quantile(values, q), 0.01)
    assert sketch.sum == pytest.approx(math.fsum(values))
    assert sketch.mean == pytest.approx(math.fsum(values) / len(values))


def test_extremes_and_counts_are_exact() -> None:
    sketch = sketch_of([5.0, 0.25, 1234.5, 17.0])
    assert sketch.quantile(0.0) == 0.25
    assert sketch.quantile(1.0) == 1234.5
    assert (sketch.count, sketch.min, sketch.max, sketch.sum) == (4, 0.25, 1234.5, 1256.75)


def test_identical_values_are_answered_exactly() -> None:
    # min == max, so the clamp returns the value itself: the alert boundaries rely on this.
    sketch = sketch_of([500.0] * 50)
    assert sketch.quantiles([0.5, 0.95, 0.99]) == [500.0, 500.0, 500.0]


def test_zeros_are_exact() -> None:
    sketch = sketch_of([0.0, 0.0, 0.0, 10.0])
    assert sketch.quantile(0.5) == 0.0
    assert sketch.quantile(1.0) == 10.0
    assert sketch.bucket_count == 2


def test_size_is_bounded_by_the_value_range_not_the_count() -> None:
    generator = random.Random(7)
    sketch = sketch_of([10 ** generator.uniform(-3, math.log10(3_600_000)) for _ in range(100_000)])
    gamma = 1.01 / 0.99
    assert sketch.bucket_count <= math.ceil(math.log(3_600_000 / 0.001) / math.log(gamma)) + 1
    assert sketch.bucket_count < 1_200


def test_empty_sketch() -> None:
    sketch = LatencySketch()
    assert sketch.quantile(0.5) is None
    assert (sketch.count, sketch.min, sketch.max, sketch.mean) == (0, None, None, None)
    assert LatencySketch.from_dict(sketch.to_dict()) == sketch


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, -math.inf])
def test_rejects_values_outside_the_domain(bad: float) -> None:
    sketch = LatencySketch()
    with pytest.raises(ValueError, match="finite values"):
        sketch.add(bad)
    assert sketch.count == 0


@pytest.mark.parametrize("q", [-0.01, 1.01])
def test_rejects_quantiles_outside_0_1(q: float) -> None:
    with pytest.raises(ValueError, match="quantile"):
        sketch_of([1.0]).quantile(q)


def test_refuses_to_merge_different_accuracies() -> None:
    with pytest.raises(ValueError, match="different accuracy"):
        LatencySketch(0.01).merge(sketch_of([1.0], 0.02))


@pytest.mark.parametrize(
    "change",
    [
        {"count": 99},
        {"counts": [0]},
        {"key_deltas": [3, 0], "counts": [1, 1], "count": 2},
        {"key_deltas": []},
        {"zero": -1},
        {"min": None},
    ],
)
def test_from_dict_rejects_inconsistent_data(change: dict[str, object]) -> None:
    data = {**sketch_of([12.0]).to_dict(), **change}
    with pytest.raises(ValueError):  # noqa: PT011 - each change breaks a different check
        LatencySketch.from_dict(data)


def test_from_dict_rejects_missing_fields() -> None:
    with pytest.raises(ValueError, match="not a serialised LatencySketch"):
        LatencySketch.from_dict({"relative_accuracy": 0.01})
