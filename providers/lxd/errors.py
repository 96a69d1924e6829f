"""How LXD / Incus answers map to the driver's typed errors.

Messages are matched whatever HTTP status carries them: the daemons return
"Instance is busy" with 400 or 500 depending on the code path.
"""

from __future__ import annotations

import re

from providers.base import (
    AmbiguousOutcome,
    AuthError,
    ConflictError,
    HostPortBusy,
    NotFoundError,
    PermanentError,
    ProviderError,
    RetryableError,
    host_port_busy,
)
from providers.lxd.devices import PORT_DEVICE_PREFIX

OP_FAILURE = 400

# Messages that mean "try again later" whatever HTTP status carries them.
RETRYABLE_MESSAGES = (
    "instance is busy",
    "busy running",
    "operation lock",
    "failed to acquire",
    "database is locked",
    "database is busy",
    "agent isn't currently running",
    "agent is not currently running",
    "temporarily unavailable",
    "try again",
)
CONFLICT_MESSAGES = ("already exists", "already in use")

# A wait slice that ended without the operation ending, in the older
# "error body under HTTP 200" shape (LXD >= 5.3, Incus < 6.12).
WAIT_EXPIRED = ("deadline exceeded", "timed out", "timeout")


# The proxy device's listener process died before it handed its socket over. Its own
# error ("bind: address already in use") is then lost: Incus reports this instead, depending
# on timing. A port mapping's listener that fails to come up is a port the host would not
# give, so it is treated as busy; the port is the one the device's name carries.
PROXY_LISTENER_FAILED = ("failed to receive fd from listener process",)
PORT_DEVICE = re.compile(rf'device "{re.escape(PORT_DEVICE_PREFIX)}(?:tcp|udp)-(\d{{1,5}})(?:-(\d{{1,5}}))?"')


def busy_port(text: str, message: str, **kw) -> HostPortBusy | None:
    """A HostPortBusy if ``message`` says a host port could not be bound, else None."""
    busy = host_port_busy(text, message, **kw)
    if busy is not None or not matches(message, PROXY_LISTENER_FAILED):
        return busy
    device = PORT_DEVICE.search(message)
    if device is None:
        return None
    start = int(device.group(1))
    end = int(device.group(2) or start)
    return HostPortBusy(text, ports=tuple(range(start, end + 1)), **kw)


def matches(message: str, needles: tuple[str, ...]) -> bool:
    low = message.lower()
    return any(n in low for n in needles)


def classify_http(status: int, message: str, *, op: str, create: bool = False) -> ProviderError:
    """Map an error envelope (or bare HTTP status) to a typed driver error."""
    text = f"{op}: {message or f'HTTP {status}'}"
    kw = {"op": op, "remote_status": status, "remote_message": message}
    if matches(message, RETRYABLE_MESSAGES):
        return RetryableError(text, **kw)
    busy = busy_port(text, message, **kw)
    if busy is not None:
        return busy
    if status in (401, 403):
        return AuthError(text, **kw)
    if status == 404:
        return NotFoundError(text, **kw)
    if status == 409 or matches(message, CONFLICT_MESSAGES):
        return ConflictError(text, **kw)
    if status == 412:  # ETag changed under us: re-read and try again
        return RetryableError(text, **kw)
    if status >= 500 and create:
        # The daemon may have committed the instance before failing: reconcile first.
        return AmbiguousOutcome(text, **kw)
    if status in (502, 503, 504):
        return RetryableError(text, **kw)
    return PermanentError(text, **kw)


def classify_op_failure(message: str, *, op: str) -> ProviderError:
    """An operation that ended with status_code 400 and ``err``."""
    text = f"{op} failed: {message}"
    kw = {"op": op, "remote_status": OP_FAILURE, "remote_message": message}
    if matches(message, RETRYABLE_MESSAGES):
        return RetryableError(text, **kw)
    busy = busy_port(text, message, **kw)
    if busy is not None:
        return busy
    if matches(message, CONFLICT_MESSAGES):
        return ConflictError(text, **kw)
    return PermanentError(text, **kw)
