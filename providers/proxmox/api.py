"""PVE API access for the Proxmox driver: token auth over HTTPS (proxmoxer), error
classification from the reason phrase, UPID task waits that honour the cancel token.

``PVEApi`` is a mixin of ProxmoxDriver; it uses the driver's ``config``, ``node``,
``request_timeout``, ``poll_interval`` and ``_pem``, and sets ``_api``.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import requests

from providers._http import PinnedAdapter, parse_fingerprint, transport_error
from providers.base import (
    AmbiguousOutcome,
    AuthError,
    CancelToken,
    ConflictError,
    NotFoundError,
    OperationCancelled,
    PermanentError,
    ProgressCallback,
    ProviderError,
    RetryableError,
    UnsupportedError,
)

logger = logging.getLogger(__name__)


# "can't lock file '/var/lock/qemu-server/lock-100.conf' - got timeout", "VM is locked (backup)",
# "CT 100 is locked (create)": transient, another task holds the guest.
LOCK_RE = re.compile(r"can't lock file|is locked|got timeout", re.IGNORECASE)
# The guest itself is missing (not a storage or a volume named in the message).
GONE_RE = re.compile(r"Configuration file '[^']*' does not exist|\b(VM|CT) \d+ (does not exist|not found)")
PERCENT_RE = re.compile(r"(\d{1,3}(?:\.\d+)?)\s*%")


class _RedactSecrets(logging.Filter):
    """proxmoxer logs request bodies at INFO ("PUT <url> {'cipassword': ...}"): if an
    operator turns that logger up, passwords must still not reach the log."""

    PATTERN = re.compile(r"""('(?:ci)?password'\s*:\s*)(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "password" in record.msg:
            record.msg = self.PATTERN.sub(r"\1'***'", record.msg)
        return True


logging.getLogger("proxmoxer.core").addFilter(_RedactSecrets())

# ------------------------------------------------------------------ errors


def classify(status: int, message: str, op: str, *, mutation: bool = False, creating: bool = False) -> ProviderError:
    """Map a PVE HTTP error (the message is the reason phrase) to a typed error."""
    text = f"{op}: {status} {message}".strip()
    kw = {"op": op, "remote_status": status, "remote_message": message}
    if status == 401 or status == 403:
        return AuthError(text, **kw)
    if LOCK_RE.search(message):
        return RetryableError(text, **kw)
    if status in (595, 596):  # pveproxy could not reach the daemon: nothing ran
        return RetryableError(text, **kw)
    if status in (502, 503, 504, 597, 598):
        return AmbiguousOutcome(text, **kw) if mutation else RetryableError(text, **kw)
    if status == 404 or GONE_RE.search(message):
        return NotFoundError(text, **kw)
    if "already exists" in message:
        return ConflictError(text, **kw)
    if status == 501:
        return UnsupportedError(text, **kw)
    # "unable to create VM 100 - <reason>" is PVE refusing (and cleaning up): definite.
    # Any other 5xx on a create may have created the guest: the caller reconciles.
    if status >= 500 and creating and "unable to create" not in message:
        return AmbiguousOutcome(text, **kw)
    return PermanentError(text, **kw)


class PVEApi:
    # -- connection

    def _connect(self, conn: dict, secrets: dict):
        from proxmoxer import ProxmoxAPI

        token = secrets.get("token")
        if token:
            # "USER@REALM!TOKENID=SECRET", as PVE shows it once at creation.
            try:
                who, value = token.split("=", 1)
                user, name = who.split("!", 1)
            except ValueError:
                raise PermanentError("proxmox: secrets.token must look like user@realm!tokenid=secret") from None
        else:
            user, name, value = conn.get("user"), conn.get("token_name"), secrets.get("token_value")
        if not (user and name and value):
            raise AuthError("proxmox: an API token is required (secrets.token, or user/token_name + token_value)")
        verify = conn.get("verify", True)
        fingerprint = parse_fingerprint(verify)
        if fingerprint:
            verify_ssl: bool | str = False  # the pinned adapter checks the certificate instead
        elif isinstance(verify, str):
            verify_ssl = self._pem.path(verify)
        else:
            verify_ssl = bool(verify)
        api = ProxmoxAPI(
            conn["host"],
            port=int(conn.get("port", 8006)),
            user=user,
            token_name=name,
            token_value=value,
            verify_ssl=verify_ssl,
            timeout=self.request_timeout,
            proxies=conn.get("proxies") or None,
        )
        session = api._store["session"]
        # REQUESTS_CA_BUNDLE / HTTPS_PROXY of the worker machine must not redirect
        # or re-trust a provider connection: only what the operator configured counts.
        session.trust_env = False
        if fingerprint:
            session.mount("https://", PinnedAdapter(fingerprint))
        return api

    def _request(
        self,
        method: str,
        path: str,
        op: str,
        *,
        mutation: bool = False,
        creating: bool = False,
        cancel: CancelToken | None = None,
        **params: Any,
    ) -> Any:
        from proxmoxer.core import ResourceException

        timeout = self.request_timeout
        if cancel is not None and cancel.remaining() is not None:
            timeout = max(1.0, min(timeout, cancel.remaining()))
        self._api._store["session"].auth.timeout = timeout
        call = getattr(self._api(path), method)
        try:
            return call(**params)
        except ResourceException as exc:
            message = str(exc.content or exc.status_message or "")
            if exc.errors:
                message = f"{message} {exc.errors}"
            raise classify(exc.status_code, message, op, mutation=mutation, creating=creating) from exc
        except requests.RequestException as exc:
            raise transport_error(exc, op, mutation) from exc

    # -- tasks

    def _wait(
        self, upid: Any, cancel: CancelToken, progress: ProgressCallback, op: str, lo: int, hi: int, msg: str
    ) -> None:
        """Poll a UPID until it stops; raise on failure; stop it remotely on cancel."""
        if not isinstance(upid, str) or not upid.startswith("UPID:"):
            return  # some calls finish synchronously and return null
        node = upid.split(":")[1] or self.node
        failures, log_start, last_pct = 0, 0, -1
        while True:
            try:
                st = self._request("get", f"nodes/{node}/tasks/{upid}/status", op, cancel=cancel)
                failures = 0
            except RetryableError:
                failures += 1
                if failures > 5:
                    raise
                st = {"status": "running"}
            if st.get("status") == "stopped":
                exit_status = str(st.get("exitstatus", ""))
                if exit_status == "OK" or exit_status.startswith("WARNINGS"):
                    progress(hi, msg)
                    return
                error = classify(500, exit_status, op)
                if not isinstance(error, RetryableError):
                    error = PermanentError(f"{op}: task failed: {exit_status}", op=op, remote_message=exit_status)
                raise error
            log_start, pct = self._task_log_percent(node, upid, log_start, op)
            if pct is not None and int(pct) != last_pct:
                last_pct = int(pct)
                progress(lo + int((hi - lo) * pct / 100), msg)
            try:
                cancel.sleep(self.poll_interval)
            except OperationCancelled:
                self._stop_task(node, upid, op)
                raise

    def _task_log_percent(self, node: str, upid: str, start: int, op: str) -> tuple[int, float | None]:
        """New task log lines since ``start``; the last "x%" in them (clone/import progress)."""
        try:
            lines = self._request("get", f"nodes/{node}/tasks/{upid}/log", op, start=start, limit=500) or []
        except ProviderError:
            return start, None
        pct = None
        for line in lines:
            match = PERCENT_RE.search(str(line.get("t", "")))
            if match:
                pct = min(100.0, float(match.group(1)))
        if lines:
            start = max(int(line.get("n", 0)) for line in lines)
        return start, pct

    def _stop_task(self, node: str, upid: str, op: str) -> None:
        try:
            self._request("delete", f"nodes/{node}/tasks/{upid}", op, mutation=True)
            logger.info("proxmox %s: stopped remote task %s", self.config.name, upid)
        except ProviderError as exc:
            logger.warning("proxmox %s: could not stop remote task %s: %s", self.config.name, upid, exc)

    def _active_task(self, vmid: int, op: str) -> str | None:
        tasks = self._request("get", f"nodes/{self.node}/tasks", op, vmid=vmid, source="active") or []
        for task in tasks:
            if task.get("upid") and task.get("status") in (None, "", "running"):
                return task["upid"]
        return None
