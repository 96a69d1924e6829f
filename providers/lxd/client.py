"""Thin client for the LXD / Incus REST API (``/1.0``), shared by both drivers.

Why not pylxd: its ``wait=True`` long-polls ``/wait`` without a timeout (so a
cancel or a deadline cannot be honoured), it treats a non-final ``/wait`` body
as a failure, and its websocket path does not pin the server certificate. We
need about a dozen endpoints; owning them gives bounded waits, cooperative
cancellation and one error classification for both daemons.

The session ignores the machine's proxy and CA environment variables
(``trust_env = False``): ``REQUESTS_CA_BUNDLE`` would otherwise override the
pinning. ``connection["trust_env"] = true`` opts back in.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import requests
from requests_unixsocket import UnixAdapter

from providers.base import (
    AmbiguousOutcome,
    AuthError,
    CancelToken,
    NotFoundError,
    OperationCancelled,
    PermanentError,
    ProviderError,
)
from providers.lxd.errors import WAIT_EXPIRED, classify_http, classify_op_failure, matches
from providers.lxd.transport import Flavour, TLSAdapter, TLSSettings, build_tls, parse_endpoint, transport_error
from providers.lxd.websocket import WebSocket

logger = logging.getLogger(__name__)

# Operation status codes (shared/api/status_code.go in both daemons).
OP_SUCCESS, OP_FAILURE, OP_CANCELLED = 200, 400, 401
OP_FINAL = (OP_SUCCESS, OP_FAILURE, OP_CANCELLED)

ProgressFn = Callable[[int | None, str], None]


@dataclass
class APIResponse:
    http_status: int
    type: str  # sync | async | error
    metadata: Any = None
    operation: str | None = None  # /1.0/operations/<id> for async responses
    etag: str | None = None

    @property
    def operation_id(self) -> str | None:
        return self.operation.rstrip("/").rsplit("/", 1)[-1] if self.operation else None


def parse_progress(metadata: Any) -> tuple[int | None, str]:
    """Percent and a message from an operation's metadata, if it carries progress.

    Daemons report either a structured ``progress`` map (``stage``, ``percent``,
    ``speed``) or ``<stage>_progress`` strings such as
    ``download_progress: "rootfs: 42% (3.1MB/s)"``.
    """
    if not isinstance(metadata, dict):
        return None, ""
    prog = metadata.get("progress")
    if isinstance(prog, dict) and str(prog.get("percent", "")).strip():
        try:
            pct = int(float(prog["percent"]))
        except (TypeError, ValueError):
            pct = None
        stage = _stage(str(prog.get("stage") or "working"))
        speed = f" ({_rate(prog['speed'])})" if prog.get("speed") else ""
        return pct, f"{stage}: {pct}%{speed}" if pct is not None else stage
    for key, value in metadata.items():
        if key.endswith("_progress") and isinstance(value, str):
            m = re.search(r"(\d+(?:\.\d+)?)%", value)
            detail = value.split(":", 1)[-1].strip() if ":" in value else value
            return (int(float(m.group(1))) if m else None), f"{_stage(key[: -len('_progress')])}: {detail}"
    return None, ""


def _rate(speed: Any) -> str:
    """The structured progress gives the speed as raw bytes per second ("1170000000"): "1.2GB/s"."""
    try:
        value = float(speed)
    except (TypeError, ValueError):
        return str(speed)  # already formatted
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f}{unit}/s" if unit == "B" else f"{value:.1f}{unit}/s"
        value /= 1000
    return f"{value:.1f}GB/s"  # pragma: no cover - the loop returns


def _stage(raw: str) -> str:
    if "download" in raw:
        return "downloading image"
    if "unpack" in raw:
        return "unpacking image"
    return raw.replace("_", " ")


class LXDClient:
    """One per driver. The requests session and TLS context are built on first use."""

    def __init__(self, flavour: Flavour, connection: dict[str, Any], secrets: dict[str, Any], *, name: str = ""):
        self.flavour = flavour
        self.name = name or flavour.name
        self.connection = connection
        self._secrets = secrets
        self.project = str(connection.get("project") or "default")
        self.connect_timeout = float(connection.get("connect_timeout", 5))
        self.request_timeout = float(connection.get("request_timeout", 30))
        # /wait?timeout= takes whole seconds; a slice bounds how late a cancel is seen.
        self.wait_slice = max(1, int(connection.get("wait_slice", 1)))
        self.endpoint = parse_endpoint(flavour, connection.get("endpoint"))
        self._session: requests.Session | None = None
        self._tls: TLSSettings | None = None
        self._lock = threading.Lock()

    # --------------------------------------------------------------- transport

    @property
    def endpoint_label(self) -> str:
        return f"unix://{self.endpoint.unix_path}" if self.endpoint.unix_path else self.endpoint.base_url

    @property
    def session(self) -> requests.Session:
        with self._lock:
            if self._session is None:
                s = requests.Session()
                s.trust_env = bool(self.connection.get("trust_env", False))
                s.headers["User-Agent"] = "cloudhost-task-system"
                if self.endpoint.unix_path:
                    s.mount("http+unix://", UnixAdapter())
                else:
                    self._tls = build_tls(self.flavour, self.connection, self._secrets)
                    s.mount("https://", TLSAdapter(self._tls))
                self._session = s
            return self._session

    def close(self) -> None:
        if self._session is not None:
            self._session.close()

    def _timeout(self, read: float | None, cancel: CancelToken | None) -> tuple[float, float]:
        read = self.request_timeout if read is None else read
        if cancel is not None and cancel.remaining() is not None:
            # Past the deadline a stuck call must not hold the worker for the full timeout.
            read = max(1.0, min(read, cancel.remaining() + 1.0))
        return (self.connect_timeout, read)

    # --------------------------------------------------------------- requests

    def request(
        self,
        method: str,
        path: str,
        *,
        op: str,
        params: dict[str, Any] | None = None,
        json_body: Any = None,
        headers: dict[str, str] | None = None,
        mutation: bool | None = None,
        create: bool = False,
        project: bool = True,
        read_timeout: float | None = None,
        cancel: CancelToken | None = None,
    ) -> APIResponse:
        """One call; the envelope is parsed and every failure raised as a typed error."""
        mutation = method != "GET" if mutation is None else mutation
        query = dict(params or {})
        if project and self.project != "default":
            query.setdefault("project", self.project)
        session = self.session
        verify = self._tls.verify if self._tls else True
        try:
            resp = session.request(
                method,
                self.endpoint.base_url + path,
                params=query or None,
                json=json_body,
                headers=headers,
                timeout=self._timeout(read_timeout, cancel),
                verify=verify,
                allow_redirects=False,
            )
        except requests.exceptions.RequestException as exc:
            if cancel is not None and cancel.cancelled:
                # The read was cut short by the deadline (or a cancel): the task layer
                # reconciles the guest, whatever this call did.
                raise OperationCancelled(cancel.reason) from None
            raise transport_error(exc, op=op, mutation=mutation, where=self.endpoint_label) from None
        return self._parse(resp, op=op, create=create)

    def _parse(self, resp: requests.Response, *, op: str, create: bool = False) -> APIResponse:
        try:
            body = resp.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or "type" not in body:
            if resp.status_code >= 400:
                raise classify_http(resp.status_code, resp.text[:200].strip(), op=op, create=create)
            raise PermanentError(f"{op}: unexpected non-API response (HTTP {resp.status_code})", op=op)
        if body.get("type") == "error" or resp.status_code >= 400:
            status = int(body.get("error_code") or resp.status_code)
            raise classify_http(status, str(body.get("error") or ""), op=op, create=create)
        return APIResponse(
            http_status=resp.status_code,
            type=str(body.get("type")),
            metadata=body.get("metadata"),
            operation=body.get("operation") or None,
            etag=resp.headers.get("ETag"),
        )

    # ------------------------------------------------------------ operations

    def wait(
        self,
        started: APIResponse,
        *,
        op: str,
        cancel: CancelToken,
        progress: ProgressFn | None = None,
    ) -> dict[str, Any]:
        """Wait for a background operation in short slices; return the final operation.

        Handles both ``/wait`` shapes: the operation rendered (Incus >= 6.12: a
        still-running operation on timeout, ``status_code`` 400 + ``err`` on
        failure) and the older error envelope under HTTP 200 (LXD >= 5.3, Incus
        < 6.12) for both a timed-out wait and a failed operation; the latter is
        told apart by reading the operation. On cancel: DELETE the operation when
        it says ``may_cancel``, then raise OperationCancelled.
        """
        if started.type != "async" or not started.operation_id:
            return started.metadata if isinstance(started.metadata, dict) else {}
        op_id = started.operation_id
        last: dict[str, Any] = started.metadata if isinstance(started.metadata, dict) else {}
        transient = 0
        while True:
            if self._final(last):
                return self._finish(last, op=op, cancel=cancel, progress=progress)
            if cancel.cancelled:
                self._cancel_remote(op_id, last, op=op)
                raise OperationCancelled(cancel.reason)
            remaining = cancel.remaining()
            slice_s = self.wait_slice if remaining is None else max(1, min(self.wait_slice, math.ceil(remaining)))
            try:
                resp = self.request(
                    "GET",
                    f"/1.0/operations/{op_id}/wait",
                    op=op,
                    params={"timeout": slice_s},
                    project=False,
                    read_timeout=slice_s + 10,
                )
            except NotFoundError:
                # Finished operations are dropped after a few seconds; we cannot know how it ended.
                raise AmbiguousOutcome(f"{op}: operation {op_id} vanished before its result was read", op=op) from None
            except AuthError:
                raise
            except ProviderError as exc:
                if exc.remote_status is None:  # transport: the operation runs on regardless
                    transient = self._transient(transient, exc, cancel, op_id, last, op)
                    continue
                # An error envelope: the older shape, for a timed-out wait *or* a
                # failed operation (or an intermediary's 5xx). The operation says which.
                try:
                    current = self.get_operation(op_id, op=op)
                except AuthError:
                    raise
                except ProviderError as exc2:
                    transient = self._transient(transient, exc2, cancel, op_id, last, op)
                    continue
                if current is None:
                    if matches(exc.remote_message, WAIT_EXPIRED):
                        raise AmbiguousOutcome(f"{op}: operation {op_id} vanished", op=op) from None
                    raise classify_op_failure(exc.remote_message, op=op) from None
                last = current
                self._report(last, progress)
                continue
            transient = 0
            if isinstance(resp.metadata, dict):
                last = resp.metadata
            self._report(last, progress)

    @staticmethod
    def _final(operation: dict[str, Any]) -> bool:
        return operation.get("status_code") in OP_FINAL

    def _finish(
        self, operation: dict[str, Any], *, op: str, cancel: CancelToken, progress: ProgressFn | None
    ) -> dict[str, Any]:
        code = operation.get("status_code")
        if code == OP_SUCCESS:
            self._report(operation, progress)
            return operation
        if code == OP_CANCELLED:
            if cancel.cancelled:
                raise OperationCancelled(cancel.reason)
            raise PermanentError(f"{op}: the operation was cancelled on the server", op=op, remote_status=401)
        raise classify_op_failure(str(operation.get("err") or "unknown error"), op=op)

    def _transient(
        self, count: int, exc: ProviderError, cancel: CancelToken, op_id: str, last: dict[str, Any], op: str
    ) -> int:
        count += 1
        if count > 3:
            raise AmbiguousOutcome(f"{op}: lost track of operation {op_id}: {exc.message}", op=op) from None
        self._pause(0.2 * count, cancel, op_id, last, op)
        return count

    def _pause(self, seconds: float, cancel: CancelToken, op_id: str, last: dict[str, Any], op: str) -> None:
        try:
            cancel.sleep(seconds)
        except OperationCancelled:
            self._cancel_remote(op_id, last, op=op)
            raise

    @staticmethod
    def _report(operation: dict[str, Any], progress: ProgressFn | None) -> None:
        if progress is None:
            return
        pct, message = parse_progress(operation.get("metadata"))
        if message:
            progress(pct, message)

    def get_operation(self, op_id: str, *, op: str) -> dict[str, Any] | None:
        try:
            resp = self.request("GET", f"/1.0/operations/{op_id}", op=op, project=False)
        except NotFoundError:
            return None
        return resp.metadata if isinstance(resp.metadata, dict) else None

    def _cancel_remote(self, op_id: str, last: dict[str, Any], *, op: str) -> None:
        """Best effort: the daemon refuses (400) operations that cannot be cancelled."""
        if not last.get("may_cancel"):
            logger.info("%s %s: operation %s is not cancellable; stopping at a safe point", self.name, op, op_id)
            return
        try:
            self.request("DELETE", f"/1.0/operations/{op_id}", op=op, project=False, read_timeout=5)
            logger.info("%s %s: cancelled operation %s on the server", self.name, op, op_id)
        except ProviderError as exc:
            logger.warning("%s %s: cancelling operation %s failed: %s", self.name, op, op_id, exc)

    def cancel_operation(self, op_id: str, *, op: str) -> None:
        self._cancel_remote(op_id, {"may_cancel": True}, op=op)

    # -------------------------------------------------------------- websocket

    def open_websocket(self, op_id: str, secret: str) -> WebSocket:
        resource = f"/1.0/operations/{quote(op_id)}/websocket?secret={quote(secret)}"
        if self.endpoint.unix_path:
            return WebSocket.connect(resource=resource, unix_path=self.endpoint.unix_path, timeout=self.request_timeout)
        _ = self.session  # builds the TLS context
        assert self._tls is not None
        return WebSocket.connect(
            resource=resource,
            host=self.endpoint.host,
            port=self.endpoint.port,
            ssl_context=self._tls.context,
            pinned_sha256=self._tls.pinned_sha256,
            timeout=self.request_timeout,
        )
