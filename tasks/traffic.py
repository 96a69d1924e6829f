"""Traffic accounting: the counters a panel syncs around power changes.

Operations call ``sync(...)`` at the points where a panel must read an
instance's traffic counters: after start and create (counting begins), before
stop, restart, reset and delete (the interface and its counters are about to go
away). Which implementation runs is chosen per provider by
``Provider.connection["traffic"]``:

- ``"none"`` (default): nothing is read.
- ``"pmacct"``: pmacct's in-memory table for the guest's interface is read on the
  provider host through the driver's host channel (``driver.host_channel()``, an
  object with ``run(argv, stdin, timeout) -> (rc, stdout, stderr)``), with
  ``pmacct -p <pipe> -s -O json``. Options in ``connection["pmacct"]``:
  ``binary`` (default ``pmacct``), ``pipe`` (default
  ``/var/run/pmacct/{guest}.pipe``; ``{guest}`` is the guest name, ``{instance}``
  the instance id), ``timeout`` seconds (default 10).

Every sample is sent as the ``traffic_synced`` signal (instance_id, task_id,
phase, sample); tasks.traffic_counters keeps the monthly counters from it, and
a billing module can subscribe too. A failed read is logged and never fails the operation:
a stop must not be refused because the accounting daemon is down.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from django.dispatch import Signal

logger = logging.getLogger(__name__)

# Phases at which operations sync counters.
AFTER_CREATE = "after_create"
AFTER_START = "after_start"
BEFORE_STOP = "before_stop"
BEFORE_RESTART = "before_restart"
BEFORE_RESET = "before_reset"
BEFORE_DELETE = "before_delete"
PERIODIC = "periodic"  # the traffic schedule's sampling of running instances (tasks.traffic_counters)
PHASES = (AFTER_CREATE, AFTER_START, BEFORE_STOP, BEFORE_RESTART, BEFORE_RESET, BEFORE_DELETE, PERIODIC)

# Sent with instance_id, task_id, phase, sample (a TrafficSample) after every read.
traffic_synced = Signal()


class TrafficError(Exception):
    """The counters could not be read (no host channel, daemon down, bad output)."""


class HostChannel(Protocol):
    """A shell on the provider host (SSH, an agent, or the simulated host)."""

    def run(self, argv: list[str], stdin: bytes | None = None, timeout: float = 30.0) -> tuple[int, str, str]:
        """Run argv (no shell); secrets go in stdin, never argv. Returns (rc, stdout, stderr)."""


@dataclass
class TrafficTarget:
    """What an implementation needs to find an instance's counters."""

    instance_id: int
    guest_name: str
    addresses: list[str] = field(default_factory=list)
    provider_ref: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrafficSample:
    """Cumulative counters of the instance's interface at ``at`` (epoch seconds)."""

    rx_bytes: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    tx_packets: int = 0
    unclassified_bytes: int = 0  # flows matching none of the instance's addresses
    at: float = field(default_factory=time.time)
    source: str = ""


class TrafficAccounting(Protocol):
    name: str

    def sync(
        self, target: TrafficTarget, *, phase: str, channel: HostChannel | None, timeout: float
    ) -> TrafficSample | None: ...


class NoTrafficAccounting:
    """The default: no counters are read."""

    name = "none"

    def __init__(self, options: dict[str, Any] | None = None):
        self.options = options or {}

    def sync(
        self, target: TrafficTarget, *, phase: str, channel: HostChannel | None, timeout: float
    ) -> TrafficSample | None:
        return None


def parse_pmacct_json(output: str, addresses: list[str]) -> TrafficSample:
    """Sum pmacct ``-s -O json`` lines into rx/tx for the instance's addresses.

    pmacct prints one JSON object per line (keys ``ip_src``, ``ip_dst``,
    ``packets``, ``bytes`` with ``aggregate: src_host, dst_host``); lines that are
    not JSON objects (headers, "For a total of" trailers) are skipped.
    """
    mine = {a.split("/", 1)[0].lower() for a in addresses if a}
    sample = TrafficSample(source="pmacct")
    rows = 0
    for line in output.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            logger.debug("pmacct: skipping an unparsable line")
            continue
        if not isinstance(row, dict):
            continue
        try:
            nbytes = int(row.get("bytes", 0) or 0)
            npackets = int(row.get("packets", 0) or 0)
        except (TypeError, ValueError):
            continue
        rows += 1
        src = str(row.get("ip_src") or row.get("src_host") or "").lower()
        dst = str(row.get("ip_dst") or row.get("dst_host") or "").lower()
        if src in mine and dst not in mine:
            sample.tx_bytes += nbytes
            sample.tx_packets += npackets
        elif dst in mine and src not in mine:
            sample.rx_bytes += nbytes
            sample.rx_packets += npackets
        else:
            sample.unclassified_bytes += nbytes
    if rows == 0 and output.strip() and "{" not in output:
        raise TrafficError("pmacct printed no JSON rows (is -O json supported?)")
    return sample


class PmacctAccounting:
    """pmacct's memory plugin, one pipe per guest interface, read through the host channel."""

    name = "pmacct"

    def __init__(self, options: dict[str, Any] | None = None):
        options = options or {}
        self.binary = str(options.get("binary", "pmacct"))
        self.pipe = str(options.get("pipe", "/var/run/pmacct/{guest}.pipe"))
        self.timeout = float(options.get("timeout", 10.0))

    def command(self, target: TrafficTarget) -> list[str]:
        pipe = self.pipe.format(guest=target.guest_name, instance=target.instance_id)
        return [self.binary, "-p", pipe, "-s", "-O", "json"]

    def sync(
        self, target: TrafficTarget, *, phase: str, channel: HostChannel | None, timeout: float
    ) -> TrafficSample | None:
        if channel is None:
            raise TrafficError("this provider's driver offers no host channel to run pmacct")
        rc, out, err = channel.run(self.command(target), None, min(self.timeout, timeout))
        if rc != 0:
            raise TrafficError(f"pmacct exited {rc}: {err.strip()[:200]}")
        return parse_pmacct_json(out, target.addresses)


BACKENDS: dict[str, Callable[[dict[str, Any]], TrafficAccounting]] = {
    "none": NoTrafficAccounting,
    "pmacct": PmacctAccounting,
}


def register_backend(name: str, factory: Callable[[dict[str, Any]], TrafficAccounting]) -> None:
    """Add an implementation selectable with connection["traffic"] = name."""
    BACKENDS[name] = factory


def get_accounting(connection: dict[str, Any] | None) -> TrafficAccounting:
    connection = connection or {}
    name = connection.get("traffic") or "none"
    factory = BACKENDS.get(name)
    if factory is None:
        logger.warning("unknown traffic accounting %r in the provider settings; using none", name)
        return NoTrafficAccounting()
    return factory(dict(connection.get(name) or {}) if isinstance(connection.get(name), dict) else {})


def enabled(connection: dict[str, Any] | None) -> bool:
    return bool((connection or {}).get("traffic")) and (connection or {}).get("traffic") != "none"


def channel_for(driver: Any) -> HostChannel | None:
    """The driver's host channel, when it has one (optional part of the driver contract)."""
    make = getattr(driver, "host_channel", None)
    if make is None:
        return None
    try:
        return make()
    except Exception:
        logger.warning("driver %s: no host channel available", type(driver).__name__, exc_info=True)
        return None


def sync(
    *,
    connection: dict[str, Any] | None,
    driver: Any,
    target: TrafficTarget,
    phase: str,
    task_id: int | None = None,
    timeout: float = 10.0,
) -> TrafficSample | None:
    """Read the counters for ``phase``; never raises (a failed read is logged)."""
    accounting = get_accounting(connection)
    try:
        sample = accounting.sync(target, phase=phase, channel=channel_for(driver), timeout=timeout)
    except Exception as exc:
        logger.warning(
            "task %s: traffic counters of instance %s not read at %s (%s): %s",
            task_id,
            target.instance_id,
            phase,
            accounting.name,
            exc,
        )
        return None
    if sample is not None:
        logger.info(
            "task %s: traffic of instance %s at %s: rx %s B, tx %s B",
            task_id,
            target.instance_id,
            phase,
            sample.rx_bytes,
            sample.tx_bytes,
        )
        traffic_synced.send(
            sender=type(accounting), instance_id=target.instance_id, task_id=task_id, phase=phase, sample=sample
        )
    return sample
