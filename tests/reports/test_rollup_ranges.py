"""``rollup_ranges``: the months added, the days added and the days subtracted cover exactly
the period's days, once each, and a ragged end is read the cheaper way.

The platform-wide per-service and per-professional totals sum the monthly rollup rows of
``month_from .. month_to``, add the daily rows of the head and the tail and subtract those of
the two cuts; that is exact only if every day of the period counts +1 and every other day 0.
"""

from __future__ import annotations

from collections import Counter
from datetime import date, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from service.reports.params import Period
from service.reports.queries import rollup_ranges


def _days(start: date, end: date) -> list[date]:
    return [start + timedelta(days=offset) for offset in range((end - start).days)]


def _coverage(period: Period) -> tuple[Counter[date], int]:
    """Each day's net count, and how many daily rows are read (added or subtracted)."""
    ranges = rollup_ranges(period)
    net: Counter[date] = Counter()
    month = ranges["month_from"]
    assert month.day == 1
    assert ranges["month_to"].day == 1
    assert month <= ranges["month_to"]
    while month < ranges["month_to"]:
        following = (month.replace(day=28) + timedelta(days=4)).replace(day=1)
        net.update(_days(month, following))
        month = following
    daily = 0
    for name, sign in (("head", 1), ("tail", 1), ("cut_head", -1), ("cut_tail", -1)):
        start, end = ranges[f"{name}_from"], ranges[f"{name}_to"]
        assert start <= end, name
        for day in _days(start, end):
            net[day] += sign
            daily += 1
    return +net + Counter(), daily  # drop zero counts


def _expected(period: Period) -> Counter[date]:
    return Counter(_days(period.start, period.end + timedelta(days=1)))


@settings(max_examples=400, deadline=None)
@given(
    start=st.dates(date(2024, 1, 1), date(2027, 12, 31)),
    length=st.one_of(st.integers(1, 70), st.integers(71, 800)),
)
def test_the_ranges_cover_the_period_exactly_once(start: date, length: int) -> None:
    period = Period(start, start + timedelta(days=length - 1))
    net, _ = _coverage(period)
    assert net == _expected(period)
    assert all(count == 1 for count in net.values())


def test_every_period_of_two_years_is_covered_exactly() -> None:
    first = date(2025, 11, 1)
    for offset in range(0, 120):
        start = first + timedelta(days=offset)
        for length in (*range(1, 66), 90, 180, 364, 365, 366, 400):
            period = Period(start, start + timedelta(days=length - 1))
            net, _ = _coverage(period)
            assert net == _expected(period), period


def test_a_ragged_end_is_read_the_cheaper_way() -> None:
    # The benchmark's year: December 3rd to December 2nd. Its head is the 29 days of December
    # 2025 read as the month minus 2 days, its tail the 2 days of December 2026.
    year = Period(date(2025, 12, 3), date(2026, 12, 2))
    assert rollup_ranges(year) == {
        "month_from": date(2025, 12, 1),
        "month_to": date(2026, 12, 1),
        "head_from": date(2025, 12, 3),
        "head_to": date(2025, 12, 3),
        "tail_from": date(2026, 12, 1),
        "tail_to": date(2026, 12, 3),
        "cut_head_from": date(2025, 12, 1),
        "cut_head_to": date(2025, 12, 3),
        "cut_tail_from": date(2026, 12, 3),
        "cut_tail_to": date(2026, 12, 3),
    }
    assert _coverage(year)[1] == 4
    # 15th to 28th of a 31-day month: 14 days, or the month minus 17 days: the days.
    assert _coverage(Period(date(2026, 1, 15), date(2026, 1, 28)))[1] == 14
    # 2nd to 30th: the month minus the 1st and the 31st.
    inside = rollup_ranges(Period(date(2026, 1, 2), date(2026, 1, 30)))
    assert (inside["month_from"], inside["month_to"]) == (date(2026, 1, 1), date(2026, 2, 1))
    assert _coverage(Period(date(2026, 1, 2), date(2026, 1, 30)))[1] == 2
    # Never more daily rows than a month's worth on each end.
    for offset in range(400):
        start = date(2025, 11, 1) + timedelta(days=offset)
        assert _coverage(Period(start, start + timedelta(days=364)))[1] <= 32
