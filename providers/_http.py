"""HTTP plumbing shared by the Proxmox and Docker drivers (both sit on requests).

- ``transport_error``: a connection-level failure classified by whether the
  request can have reached the server (retryable) or may have been applied
  (ambiguous, for mutations).
- ``PemFiles``: TLS material given inline in the provider's settings or secrets,
  written 0600 into a private temporary directory, because requests and
  docker-py want paths.
- ``PinnedAdapter``: accept exactly one server certificate by its SHA-256
  fingerprint (a self-signed PVE node certificate, say).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator

import requests
from requests.adapters import HTTPAdapter

from providers.base import AmbiguousOutcome, AuthError, ProviderError, RetryableError, UnreachableError

FINGERPRINT_RE = re.compile(r"^(sha256:)?(([0-9a-fA-F]{2}:){31}[0-9a-fA-F]{2}|[0-9a-fA-F]{64})$")


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and everything it wraps (requests -> urllib3 -> socket)."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen or not isinstance(e, BaseException):
            continue
        seen.add(id(e))
        yield e
        todo.extend([e.__cause__, e.__context__, getattr(e, "reason", None)])
        todo.extend(a for a in e.args if isinstance(a, BaseException))


def transport_error(exc: BaseException, op: str, mutation: bool, what: str = "") -> ProviderError:
    """Classify a connection failure: never sent -> unreachable (retryable); maybe applied -> ambiguous.

    A TLS failure is a trust problem (wrong CA, wrong pin, no client certificate),
    which retrying does not fix.
    """
    import urllib3.exceptions as u3

    if isinstance(exc, requests.exceptions.SSLError):
        return AuthError(f"{op}: TLS verification failed: {exc}", op=op)
    never_sent = (u3.NewConnectionError, u3.ConnectTimeoutError, ConnectionRefusedError, FileNotFoundError)
    if isinstance(exc, requests.exceptions.ConnectTimeout) or any(
        isinstance(e, never_sent) for e in exception_chain(exc)
    ):
        return UnreachableError(f"{op}: cannot connect{what}: {exc}", op=op)
    if mutation:
        return AmbiguousOutcome(f"{op}: connection lost after the request was sent: {exc}", op=op)
    return RetryableError(f"{op}: connection error: {exc}", op=op)


def parse_fingerprint(value: object) -> str | None:
    """A SHA-256 certificate fingerprint (hex, colons optional, "sha256:" prefix optional), or None."""
    if isinstance(value, str) and FINGERPRINT_RE.match(value.strip()):
        return value.strip().lower().removeprefix("sha256:").replace(":", "")
    return None


class PinnedAdapter(HTTPAdapter):
    """Accepts exactly the server certificate with this SHA-256 fingerprint (use with verify=False)."""

    def __init__(self, fingerprint: str, **kwargs):
        self._fingerprint = fingerprint
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs):
        kwargs["assert_fingerprint"] = self._fingerprint
        super().init_poolmanager(*args, **kwargs)


class PemFiles:
    """Paths for PEM material: a path is used as is, inline PEM is written to a private file.

    The directory goes away with this object (the driver holds it).
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        self._dir: tempfile.TemporaryDirectory | None = None

    def path(self, value: str) -> str:
        if not value.lstrip().startswith("-----BEGIN"):
            return value
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix=self.prefix)
        path = os.path.join(self._dir.name, hashlib.sha256(value.encode()).hexdigest()[:16] + ".pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(value)
        return path

    def cleanup(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
