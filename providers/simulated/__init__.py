"""The simulated provider: the embedded default, so the whole system runs with no host.

Guests live in a small SQLite file per provider (stdlib sqlite3, WAL, busy
timeout), so they survive restarts and every worker process of every queue sees
the same guests. Delays are realistic (create ~25 s, start/stop ~3 s) times a
speed factor, and are spent in slices of the cancel token so a cancel or the
deadline stops an operation within a fraction of a second.

Operators (and tests) inject failures per provider through the provider's
non-secret ``connection`` JSON; docs/operations.md lists the knobs. Every call
of a mutating method is recorded in the ``executions`` table (op, guest, time,
pid, whether it changed anything), so tests can prove that nothing ran twice:
``SimulatedStore.for_provider(provider_id).executions()``.

No ORM here (providers/ does I/O only); Django settings are read, when Django is
configured, only for the default speed and state directory.
"""

from __future__ import annotations

from providers.simulated.driver import DELAYS, SimulatedDriver, SimulatedHostChannel
from providers.simulated.options import SimulatedOptions, default_speed, default_state_dir, validate_connection
from providers.simulated.store import SimulatedStore, addresses_for

__all__ = [
    "DELAYS",
    "SimulatedDriver",
    "SimulatedHostChannel",
    "SimulatedOptions",
    "SimulatedStore",
    "addresses_for",
    "default_speed",
    "default_state_dir",
    "validate_connection",
]
