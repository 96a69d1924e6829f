"""The database's clock: what leases, recovery, timeouts and re-dispatch are measured by.

Machines' clocks differ (a worker machine a few seconds ahead or behind its
peers), and a lease written by one machine is judged by another. Every such
time comes from here: the database server's UTC time. On MySQL/MariaDB this
process measures its clock's offset from the server's (one ``SELECT
UTC_TIMESTAMP(6)``, the local time taken as the midpoint of the round trip)
every DB_CLOCK_REFRESH_SECONDS and applies it, so the hot paths pay no query;
the error is at most half a round trip plus the drift between two measurements
(or TOLERANCE, below which the local clock is used as it is), and a clock
stepped on this machine is caught at the next measurement. SQLite lives on
one machine: its clock is the local one.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections
from django.utils import timezone

# An offset smaller than this is taken as zero: a machine kept in time (NTP) writes its
# own clock, so the times written by the processes of one machine never disagree by a
# measurement's jitter (a few milliseconds on a busy machine, enough to disorder the
# admission times of one provider's tasks). Far below the margins leases keep.
TOLERANCE = timedelta(seconds=0.1)

_lock = threading.Lock()
_state: dict = {"offset": timedelta(0), "at": None}


def now() -> datetime:
    """The database server's current time (aware, UTC)."""
    conn = connections[DEFAULT_DB_ALIAS]
    if conn.vendor != "mysql":
        return timezone.now()
    at = _state["at"]
    if at is None or time.monotonic() - at >= settings.DB_CLOCK_REFRESH_SECONDS:
        calibrate()
    return timezone.now() + _state["offset"]


def calibrate() -> timedelta:
    """Measure this machine's offset from the database server's clock (MySQL/MariaDB)."""
    conn = connections[DEFAULT_DB_ALIAS]
    conn.ensure_connection()  # (a connect inside the measured round trip would skew it)
    before = timezone.now()
    with conn.cursor() as cursor:
        cursor.execute("SELECT UTC_TIMESTAMP(6)")
        server = cursor.fetchone()[0]
    after = timezone.now()
    if server.tzinfo is None:
        server = server.replace(tzinfo=UTC)
    offset = server - (before + (after - before) / 2)
    if abs(offset) < TOLERANCE:
        offset = timedelta(0)
    with _lock:
        _state["offset"], _state["at"] = offset, time.monotonic()
    return offset


def offset() -> timedelta:
    """The last measured offset (database minus local); zero on SQLite or before the first measure."""
    return _state["offset"]


def reset() -> None:
    """Forget the measured offset (tests that move this machine's clock)."""
    with _lock:
        _state["offset"], _state["at"] = timedelta(0), None
