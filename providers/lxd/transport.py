"""How the LXD / Incus client reaches the daemon: endpoint, TLS trust, transport errors.

- ``unix:///path/to/unix.socket`` (or a bare path): HTTP over the daemon's socket
  (requests-unixsocket2's adapter); access is the socket's file permissions.
- ``https://host:8443``: mutual TLS. The client certificate and key come from the
  provider's secrets (``client_cert`` / ``client_key``, PEM). The server is trusted
  by pinning (``server_fingerprint``, SHA-256 hex, or ``server_cert``, PEM) or, for
  a CA-signed daemon, ``server_ca`` (PEM, or ``"system"``) with hostname checks.

Everything that differs between the two daemons is in ``Flavour``.
"""

from __future__ import annotations

import hashlib
import os
import re
import ssl
import tempfile
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import requests
from requests.adapters import HTTPAdapter

from providers.base import AmbiguousOutcome, AuthError, PermanentError, ProviderError, RetryableError, UnreachableError


@dataclass(frozen=True)
class Flavour:
    """What differs between the two daemons. The API shape itself is shared."""

    name: str
    product: str
    socket_paths: tuple[str, ...]
    min_tls: ssl.TLSVersion
    image_remotes: tuple[tuple[str, str], ...]


LXD = Flavour(
    name="lxd",
    product="LXD",
    socket_paths=("/var/snap/lxd/common/lxd/unix.socket", "/var/lib/lxd/unix.socket"),
    min_tls=ssl.TLSVersion.TLSv1_2,
    image_remotes=(
        ("images", "https://images.lxd.canonical.com"),
        ("ubuntu", "https://cloud-images.ubuntu.com/releases"),
        ("ubuntu-daily", "https://cloud-images.ubuntu.com/daily"),
    ),
)

INCUS = Flavour(
    name="incus",
    product="Incus",
    socket_paths=("/var/lib/incus/unix.socket",),
    # Incus refuses anything older than TLS 1.3 on its HTTPS listener.
    min_tls=ssl.TLSVersion.TLSv1_3,
    image_remotes=(("images", "https://images.linuxcontainers.org"),),
)


@dataclass
class Endpoint:
    unix_path: str | None = None
    host: str = ""
    port: int = 8443
    base_url: str = ""


@dataclass
class TLSSettings:
    context: ssl.SSLContext
    pinned_sha256: str | None  # None: CA verification with hostname checks
    verify: bool = False  # the per-request ``verify`` for requests


class TLSAdapter(HTTPAdapter):
    """Hands urllib3 our SSL context (client cert loaded) and the pinned fingerprint."""

    def __init__(self, tls: TLSSettings):
        self._tls = tls
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        kwargs["ssl_context"] = self._tls.context
        if self._tls.pinned_sha256:
            kwargs["assert_fingerprint"] = self._tls.pinned_sha256
        super().init_poolmanager(*args, **kwargs)


def fingerprint(value: str) -> str:
    fp = value.replace(":", "").strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", fp):
        raise PermanentError("server_fingerprint must be a SHA-256 hex digest (64 hex digits, colons allowed)")
    return fp


def parse_endpoint(flavour: Flavour, raw: Any) -> Endpoint:
    """unix:///path (or a bare path; default: the flavour's socket) or https://host[:port]."""
    if not raw:
        path = next((p for p in flavour.socket_paths if os.path.exists(p)), flavour.socket_paths[0])
        raw = f"unix://{path}"
    raw = str(raw)
    if raw.startswith("/"):
        raw = f"unix://{raw}"
    if raw.startswith("unix://"):
        path = raw[len("unix://") :]
        return Endpoint(unix_path=path, base_url=f"http+unix://{quote(path, safe='')}")
    parts = urlsplit(raw)
    if parts.scheme != "https" or not parts.hostname:
        raise PermanentError(
            f"{flavour.product} endpoint must be unix:///path/to/unix.socket or https://host:port, got {raw!r}"
        )
    port = parts.port or 8443
    host = parts.hostname
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return Endpoint(host=host, port=port, base_url=f"https://{netloc}")


def build_tls(flavour: Flavour, conn: dict[str, Any], secrets: dict[str, Any]) -> TLSSettings:
    """The SSL context (client cert loaded) and how the server is trusted. No insecure default."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = flavour.min_tls
    pinned: str | None = None
    if conn.get("server_fingerprint"):
        pinned = fingerprint(str(conn["server_fingerprint"]))
    elif conn.get("server_cert"):
        try:
            der = ssl.PEM_cert_to_DER_cert(str(conn["server_cert"]).strip() + "\n")
        except ValueError as exc:
            raise PermanentError(f"server_cert is not a PEM certificate: {exc}") from None
        pinned = hashlib.sha256(der).hexdigest()
    if pinned:
        # Trust is the pinned fingerprint, checked by urllib3 (and by our websocket
        # client) on every connection; the daemon's cert is usually self-signed.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif conn.get("server_ca"):
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        if conn["server_ca"] == "system":
            ctx.load_default_certs()
        else:
            ctx.load_verify_locations(cadata=str(conn["server_ca"]))
    else:
        raise PermanentError(
            "an https endpoint needs server_fingerprint or server_cert (pinning) or server_ca in its connection settings"
        )
    cert, key = secrets.get("client_cert"), secrets.get("client_key")
    if not cert or not key:
        raise AuthError("an https endpoint needs the client_cert and client_key secrets (PEM)")
    load_client_cert(ctx, str(cert), str(key))
    return TLSSettings(context=ctx, pinned_sha256=pinned, verify=not pinned)


def transport_error(exc: Exception, *, op: str, mutation: bool, where: str) -> ProviderError:
    """No HTTP answer: refused trust, never connected, or lost after sending."""
    detail = root_message(exc)
    if isinstance(exc, requests.exceptions.SSLError):
        low = detail.lower()
        if any(w in low for w in ("fingerprint", "certificate", "alert", "handshake", "verify")):
            return AuthError(f"{op}: TLS with {where} refused: {detail}", op=op)
    if isinstance(exc, requests.exceptions.ConnectTimeout) or never_sent(exc):
        return UnreachableError(f"{op}: cannot connect to {where}: {detail}", op=op)
    if mutation:
        return AmbiguousOutcome(f"{op}: connection to {where} failed after the request was sent: {detail}", op=op)
    return RetryableError(f"{op}: connection to {where} failed: {detail}", op=op)


def load_client_cert(ctx: ssl.SSLContext, cert_pem: str, key_pem: str) -> None:
    """ssl can only load a cert chain from files: write both to a private temp dir, load, remove."""
    tmp = tempfile.mkdtemp(prefix="lxd-client-")
    cert_path, key_path = os.path.join(tmp, "client.crt"), os.path.join(tmp, "client.key")
    try:
        for path, data in ((cert_path, cert_pem), (key_path, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(data)
        try:
            ctx.load_cert_chain(cert_path, key_path)
        except (ssl.SSLError, OSError) as exc:
            raise AuthError(f"client_cert / client_key could not be loaded: {exc}") from None
    finally:
        for path in (cert_path, key_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        os.rmdir(tmp)


def root_message(exc: BaseException) -> str:
    seen = set()
    cur: BaseException | None = exc
    msg = str(exc)
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if str(cur):
            msg = str(cur)
        nxt = cur.__cause__ or cur.__context__
        if nxt is None and cur.args and isinstance(cur.args[0], BaseException):
            nxt = cur.args[0]
        cur = nxt
    return msg[:300]


def never_sent(exc: BaseException) -> bool:
    """True when the failure happened while connecting, so nothing reached the daemon."""
    seen = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        name = type(cur).__name__
        if name in ("NewConnectionError", "ConnectTimeoutError", "NameResolutionError"):
            return True
        if isinstance(cur, FileNotFoundError | ConnectionRefusedError):
            return True
        nxt = cur.__cause__ or cur.__context__
        if nxt is None:
            for arg in getattr(cur, "args", ()):
                if isinstance(arg, BaseException):
                    nxt = arg
                    break
            reason = getattr(cur, "reason", None)
            if nxt is None and isinstance(reason, BaseException):
                nxt = reason
        cur = nxt
    return False
