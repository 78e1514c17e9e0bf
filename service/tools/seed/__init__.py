"""Deterministic, realistic demo data for the reporting service, written with COPY.

``seed_database`` generates salons in several IANA time zones (some observing DST), their
services (with categories and prices in cents) and professionals (a few inactive, a few who
joined late), salon owners, a couple of admins, clients, bookings over ``days`` days ending
about a week after today, and audit events for a sample of bookings.

The shape is chosen so that the reports mean something:

- bookings fall mostly within each salon's opening hours in its *local* time, with
  weekday/weekend differences, seasonality and a growth trend;
- clients come back with a skewed distribution: each client has a Pareto-distributed visit
  rate, so a few regulars make many bookings and many clients book once; some clients also
  book at a second salon;
- statuses follow time: past bookings are mostly completed (~10 % cancelled, ~3 % no-show),
  future ones pending or confirmed; ``completed_at``, ``cancelled_at``, ``created_at`` and
  ``updated_at`` agree with the status and with each other, and no timestamp lies in the future
  except ``scheduled_at``.

Determinism: the same ``seed``, the same starting database and the same UTC date give
byte-identical rows (ids, text and timestamps). Timestamps are relative to midnight UTC of the
current date (``today``, overridable) so that the demo period always ends near the present; two
runs on different days therefore differ. Every generated timestamp except ``scheduled_at`` is
at or before that midnight.

The steps, one module each: ``catalog`` (vocabulary and proportions), ``entities`` (what a plan
is made of), ``plan`` (the plan, drawn from the seed), ``bookings`` (the bookings' rows),
``audit`` (the audit trail) and ``load`` (``seed_database``: COPY into one transaction).
"""

from service.tools.seed.catalog import DST_TIMEZONES, TIMEZONES
from service.tools.seed.entities import local_day_starts
from service.tools.seed.load import seed_database

__all__ = ["DST_TIMEZONES", "TIMEZONES", "local_day_starts", "seed_database"]
