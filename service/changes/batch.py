"""A batch of decoded changes, netted as they arrive (see ``Batch``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from service.changes import derived

# The booking columns the derived tables are computed from (``derived.py``).
DELTA_COLUMNS = (
    "salon_id",
    "client_id",
    "professional_id",
    "service_id",
    "scheduled_at",
    "status",
    "price_cents",
)

# The booking columns the first-booking tables depend on.
FIRST_COLUMNS = ("salon_id", "client_id", "professional_id", "scheduled_at")

CREATE_BATCH = f"""
    CREATE TEMP TABLE IF NOT EXISTS {derived.FIRSTS_BATCH} (
        salon_id bigint NOT NULL,
        client_id bigint NOT NULL,
        professional_id bigint NOT NULL,
        scheduled_at timestamptz NOT NULL,
        n smallint NOT NULL  -- +1 added, -1 removed
    ) ON COMMIT DELETE ROWS;
    CREATE TEMP TABLE IF NOT EXISTS {derived.BATCH} (
        salon_id bigint NOT NULL,
        client_id bigint NOT NULL,
        professional_id bigint NOT NULL,
        service_id bigint NOT NULL,
        scheduled_at timestamptz NOT NULL,
        status text NOT NULL,
        price_cents integer NOT NULL,
        n integer NOT NULL
    ) ON COMMIT DELETE ROWS
"""


@dataclass(slots=True)
class Batch:
    """Changes gathered up to a transaction boundary, then what folding them did.

    Booking row versions are netted as they arrive. ``delta`` maps a version's relevant columns
    (``DELTA_COLUMNS``) to +1 per new version and -1 per old one, summed over the batch: the
    counters and visit days are sums over those versions, kept as pure deltas, so a version
    added and removed in the same batch (a booking inserted and then confirmed) cancels out.

    First bookings are not pure deltas: a key whose first booking may have gone is recomputed
    from ``bookings`` as it is at fold time, which can already include later transactions. If
    one of those later transactions removes what the recomputation saw, it must trigger another
    recomputation when its batch comes, even if the same batch also added the version back.
    So their versions (``FIRST_COLUMNS``) are netted only within each transaction, whose
    intermediate states nobody can see, and kept per batch as two sets: ``added`` and
    ``removed``.
    """

    delta: dict[tuple[Any, ...], int] = field(default_factory=dict)
    added: set[tuple[Any, ...]] = field(default_factory=set)
    removed: set[tuple[Any, ...]] = field(default_factory=set)
    versions: int = 0  # booking row versions received (+1 and -1), before netting
    end: int | None = None  # end of the last complete transaction's commit record
    transactions: int = 0  # transactions with a relevant change
    markers: int = 0  # position markers (``wait_applied``)
    booking_xids: list[str] = field(default_factory=list)  # transactions that changed bookings
    commits: list[str] = field(default_factory=list)  # commit times of ``transactions``
    touched: set[str] = field(default_factory=set)  # salon ids whose reports may change
    truncated: bool = False  # bookings truncated: the derived tables start from empty
    truncate: bool = False  # any streamed table truncated: every salon is invalidated
    started: float = 0.0  # monotonic time of the first change
    lags: list[float] = field(default_factory=list)  # commit -> applied, per transaction
    salons: str | None = None  # the NOTIFY payload sent, if any

    @property
    def empty(self) -> bool:
        return not (self.transactions or self.markers)

    def add(
        self, firsts: dict[tuple[Any, ...], int], relation: str, change: dict[str, Any]
    ) -> None:
        """Net a row change's versions into the batch (``firsts``: into its transaction's);
        note the salons it touches."""
        salon_column = "id" if relation == "salons" else "salon_id"
        for sign, key in ((1, "columns"), (-1, "identity")):
            fields = change.get(key)
            if fields is None:
                continue
            if relation != "bookings":
                for field in fields:
                    if field["name"] == salon_column and field.get("value") is not None:
                        self.touched.add(str(field["value"]))
                continue
            values = _booking_values(fields)
            self.touched.add(str(values[0]))
            delta = self.delta
            delta[values] = delta.get(values, 0) + sign
            first = (values[0], values[1], values[2], values[4])  # FIRST_COLUMNS
            firsts[first] = firsts.get(first, 0) + sign
            self.versions += 1


_layout: list[int] = []  # positions of DELTA_COLUMNS in a booking row's fields, as last seen


def _booking_values(fields: list[dict[str, Any]]) -> tuple[Any, ...]:
    """A booking version's ``DELTA_COLUMNS``. wal2json lists the fields in the table's column
    order; their positions are found once and checked on every row (a migration may change
    them), which costs less than a dict of every field per row."""
    layout = _layout
    if len(layout) != len(DELTA_COLUMNS) or any(
        index >= len(fields) or fields[index]["name"] != column
        for index, column in zip(layout, DELTA_COLUMNS, strict=True)
    ):
        names = [field["name"] for field in fields]
        layout[:] = [names.index(column) for column in DELTA_COLUMNS]
    return tuple(fields[index].get("value") for index in layout)
