"""``salon-reports simulate``: light, bounded traffic against the service on this machine.

So that the performance page, the traces and the cache invalidation have something to show:

- report requests at ``rps``, open loop (one starts every ``1/rps`` seconds whether or not the
  earlier ones have answered, at most ``MAX_IN_FLIGHT`` at once), in a Zipf mix — a few salons,
  date windows and reports get most of the traffic, as with real clients — plus a few
  platform-wide ones, with an admin token signed with this configuration's secret;
- booking writes straight into PostgreSQL at ``writes_per_min`` (new bookings, and pending or
  confirmed ones confirmed or cancelled) in the salons the traffic favours: the change stream
  folds them whoever wrote them, so these invalidate the cached reports of their salon.

It runs ``duration`` seconds (Ctrl-C ends it early), then returns a summary: requests, status
codes, the hit ratio seen in ``X-Cache``, client-side latency and the writes. It only talks to a
loopback address and to the database of the configuration it is given.

``traffic`` sends the requests, ``writes`` the bookings, ``run`` runs both and sums up.
"""

from service.tools.simulate.run import SimulationResult, run_simulation, simulate
from service.tools.simulate.traffic import (
    DRAIN_SECONDS,
    REPORTS,
    SimulationError,
    ZipfChoice,
    check_loopback,
)

__all__ = [
    "DRAIN_SECONDS",
    "REPORTS",
    "SimulationError",
    "SimulationResult",
    "ZipfChoice",
    "check_loopback",
    "run_simulation",
    "simulate",
]
