"""The driver contract: one method per operation, a cancel token, a progress
callback and typed errors. Drivers do I/O only: no ORM imports in providers/.

Every method is idempotent ("ensure"): asking for the state the guest is already
in is success, so a step repeated after a crash or a retry converges.
"""

from __future__ import annotations

import importlib
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

# --------------------------------------------------------------------------- errors


class ProviderError(Exception):
    """Base of every driver error. ``retryable`` tells the task layer whether to try again."""

    retryable = False
    ambiguous = False

    def __init__(self, message: str, *, op: str = "", remote_status: int | None = None, remote_message: str = ""):
        super().__init__(message)
        self.message = message
        self.op = op
        self.remote_status = remote_status
        self.remote_message = remote_message


class RetryableError(ProviderError):
    """Transient: connection reset, timeouts, 502/503/504, a lock held on the host."""

    retryable = True


class UnreachableError(RetryableError):
    """The provider could not be reached at all: connection refused, no route, name
    not resolved, connect timeout. Nothing was sent, so nothing happened on the host.

    Retried like any transient error; when a task still fails with it, the task
    layer holds the provider's queue until the provider answers again
    (tasks.engine.health), instead of failing every queued task in turn.
    """


class PermanentError(ProviderError):
    """Will fail again the same way: bad request, auth, unsupported, not enough space."""


class AuthError(PermanentError):
    pass


class NotFoundError(PermanentError):
    """The guest (or other object) does not exist. Success for delete."""


class ConflictError(PermanentError):
    """Exists with a different definition; a port already bound."""


class HostPortBusy(ConflictError):
    """The host refused to bind a host port the guest's mapping needs: something outside
    the panel holds it (a program listening on it, or one of the host's outgoing
    connections using it as its local port).

    ``ports`` are the numbers the daemon's message names; they may include numbers
    that are not ports (addresses, times), so callers keep only the ones they asked for.
    """

    def __init__(self, message: str, *, ports: tuple[int, ...] = (), **kw: Any):
        super().__init__(message, **kw)
        self.ports = tuple(ports)


# What Docker, Podman, LXD and Incus say when a host port cannot be bound.
BUSY_PORT_MESSAGES = ("address already in use", "port is already allocated")


def host_port_busy(text: str, message: str, **kw: Any) -> HostPortBusy | None:
    """A HostPortBusy for a daemon's ``message`` that says a host port is taken, else None."""
    if not any(needle in message.lower() for needle in BUSY_PORT_MESSAGES):
        return None
    ports = sorted({int(n) for n in re.findall(r":(\d{1,5})(?!\d)", message) if 0 < int(n) < 65536})
    return HostPortBusy(text, ports=tuple(ports), **kw)


class UnsupportedError(PermanentError):
    pass


class AmbiguousOutcome(ProviderError):
    """A mutation may or may not have happened (transport error after sending it).

    The task layer reconciles with ``get_state`` before deciding.
    """

    ambiguous = True
    retryable = True


class OperationCancelled(Exception):
    """Raised at a safe point when the cancel token is set. ``reason`` says why."""

    def __init__(self, reason: str = "cancelled"):
        super().__init__(reason)
        self.reason = reason


# ----------------------------------------------------------------- cancel token

CANCEL_USER = "cancelled"
CANCEL_TIMEOUT = "timeout"
CANCEL_LEASE_LOST = "lease_lost"
CANCEL_SHUTDOWN = "shutdown"


class LeaseClock:
    """The local deadline of a worker's lease (a ``time.monotonic()`` value), shared by
    every cancel token of one task: each successful renewal moves it on.

    The database's lease runs out at (renewal sent) + lease or later; the worker's
    local deadline is set no later than that, so a worker that can no longer prove
    its lease (a hung database call, a dead heartbeat) stops at its next safe point
    before anyone else may act on the task.
    """

    def __init__(self, deadline: float | None = None):
        self.deadline = deadline

    def extend(self, deadline: float) -> None:
        if self.deadline is None or deadline > self.deadline:
            self.deadline = deadline

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and (now if now is not None else time.monotonic()) >= self.deadline


class CancelToken:
    """Thread-safe cancel flag shared by the worker's heartbeat and the operation.

    The operation calls ``raise_if_cancelled()`` at safe points and uses
    ``sleep()`` (which wakes at once on cancel) instead of ``time.sleep``.

    ``deadline``: the task's timeout (cancels with CANCEL_TIMEOUT). ``lease``: the
    worker's lease (cancels with CANCEL_LEASE_LOST once its local deadline passes
    without a renewal); a cleanup token shares its task's lease, so an undo stops
    with the lease too. Both are checked at every safe point, and ``sleep`` wakes
    at whichever comes first.
    """

    def __init__(self, deadline: float | None = None, lease: LeaseClock | None = None):
        self._event = threading.Event()
        self.reason = ""
        self.deadline = deadline  # time.monotonic() value, or None
        self.lease = lease

    def cancel(self, reason: str = CANCEL_USER) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    @property
    def cancelled(self) -> bool:
        if not self._event.is_set():
            now = time.monotonic()
            if self.lease is not None and self.lease.expired(now):
                self.cancel(CANCEL_LEASE_LOST)
            elif self.deadline is not None and now >= self.deadline:
                self.cancel(CANCEL_TIMEOUT)
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self.cancelled:
            raise OperationCancelled(self.reason)

    def _wake_at(self) -> float | None:
        ends = [t for t in (self.deadline, self.lease.deadline if self.lease else None) if t is not None]
        return min(ends) if ends else None

    def sleep(self, seconds: float) -> None:
        """Sleep up to ``seconds``; return early (and raise) when cancelled."""
        end = time.monotonic() + max(0.0, seconds)
        while True:
            self.raise_if_cancelled()
            now = time.monotonic()
            if now >= end:
                return
            limit = end - now
            wake = self._wake_at()  # a renewal may move the lease's deadline on meanwhile
            if wake is not None:
                limit = min(limit, max(0.001, wake - now))
            self._event.wait(limit)

    def remaining(self) -> float | None:
        """Seconds to the task's deadline (drivers bound their calls by it), None without one."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())


ProgressCallback = Callable[[int, str], None]


def no_progress(percent: int, message: str) -> None:
    return None


# ------------------------------------------------------------------ value types


@dataclass
class GuestSpec:
    """What to create. ``name`` is deterministic (vps-<uuid>), so a retry finds it."""

    name: str
    instance_type: str  # container | vm
    image: str
    cpu: int
    memory_mb: int
    disk_mb: int
    bandwidth_mbps: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    ref: dict[str, Any] = field(default_factory=dict)  # pre-reserved native handle (e.g. Proxmox vmid)
    # The guest's port mappings when known at create. A driver whose ports are fixed at
    # creation (Docker) publishes them then; the add_port calls that follow find them
    # in place. Others ignore it.
    ports: list[PortSpec] = field(default_factory=list)


@dataclass
class PortSpec:
    """A host -> guest mapping. ``handle`` names it on the provider (deterministic)."""

    protocol: str  # tcp | udp (callers split "both" into two specs)
    host_port_start: int
    host_port_end: int
    guest_port_start: int
    guest_port_end: int
    listen_ip: str = "0.0.0.0"

    @property
    def handle(self) -> str:
        if self.host_port_start == self.host_port_end:
            return f"pm-{self.protocol}-{self.host_port_start}"
        return f"pm-{self.protocol}-{self.host_port_start}-{self.host_port_end}"


@dataclass
class GuestState:
    """What the provider says about a guest. ``status`` uses tasks.engine.states.InstanceStatus values."""

    exists: bool
    status: str = "unknown"  # running | stopped | unknown (and creating/deleting while busy)
    addresses: list[str] = field(default_factory=list)
    ref: dict[str, Any] = field(default_factory=dict)
    ports: list[PortSpec] = field(default_factory=list)


@dataclass
class Capabilities:
    instance_types: tuple[str, ...] = ("container",)
    live_port_mapping: bool = True
    password_methods: tuple[str, ...] = ()
    native_rebuild: bool = False
    remote_cancel: bool = False


@dataclass
class ServerInfo:
    version: str
    details: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------- contract


class Driver(Protocol):
    """One per provider, built from its connection settings and decrypted secrets.

    ``guest`` arguments are the GuestSpec (create/reset) or the ref dict returned
    by create (everything else; name included), so drivers stay stateless.
    """

    def server_info(self) -> ServerInfo: ...

    def capabilities(self) -> Capabilities: ...

    def create(self, spec: GuestSpec, cancel: CancelToken, progress: ProgressCallback) -> dict[str, Any]:
        """Ensure the guest exists (created, not necessarily started); return its ref."""

    def start(self, ref: dict[str, Any], cancel: CancelToken, progress: ProgressCallback) -> None: ...

    def stop(
        self, ref: dict[str, Any], cancel: CancelToken, progress: ProgressCallback, graceful_timeout: int = 30
    ) -> None:
        """Graceful shutdown for up to graceful_timeout seconds, then force."""

    def restart(self, ref: dict[str, Any], cancel: CancelToken, progress: ProgressCallback) -> None: ...

    def delete(self, ref: dict[str, Any], cancel: CancelToken, progress: ProgressCallback) -> None:
        """Ensure the guest is gone (stopping it first). Not found is success."""

    def rebuild(self, ref: dict[str, Any], spec: GuestSpec, cancel: CancelToken, progress: ProgressCallback) -> dict:
        """Reinstall from spec.image keeping the guest's identity; return its (maybe new) ref."""

    def set_password(self, ref: dict[str, Any], password: str, cancel: CancelToken, progress: ProgressCallback) -> None:
        """Set the root password. The password never goes into argv or logs."""

    def add_port(
        self, ref: dict[str, Any], port: PortSpec, cancel: CancelToken, progress: ProgressCallback
    ) -> None: ...

    def remove_port(
        self, ref: dict[str, Any], port: PortSpec, cancel: CancelToken, progress: ProgressCallback
    ) -> None: ...

    def get_state(self, ref: dict[str, Any]) -> GuestState:
        """Read the guest; exists=False when it is not there."""


@dataclass
class ProviderConfig:
    """What a driver is built from: the Provider row's settings, secrets decrypted."""

    provider_id: int
    name: str
    provider_type: str
    connection: dict[str, Any]
    secrets: dict[str, Any]


# provider_type -> (module, class): imported on first use, or up front by import_drivers.
DRIVERS = {
    "simulated": ("providers.simulated", "SimulatedDriver"),
    "lxd": ("providers.lxd", "LXDDriver"),
    "incus": ("providers.incus", "IncusDriver"),
    "proxmox": ("providers.proxmox", "ProxmoxDriver"),
    "docker": ("providers.docker", "DockerDriver"),
}


def build_driver(config: ProviderConfig) -> Driver:
    """Instantiate the driver for ``config.provider_type``."""
    try:
        module, name = DRIVERS[config.provider_type]
    except KeyError:
        raise UnsupportedError(f"unknown provider type {config.provider_type!r}") from None
    return getattr(importlib.import_module(module), name)(config)


def import_drivers() -> None:
    """Import every driver now: a process that forks workers (django-q2) does it once for all."""
    for module, _ in DRIVERS.values():
        importlib.import_module(module)
