"""Engine API access for the Docker driver: the docker-py client (unix socket or
TCP+TLS, explicit API version, no environment), error classification, calls bounded
by the cancel token, and image pulls with progress.

``EngineApi`` is a mixin of DockerDriver; it uses the driver's ``config``,
``timeout`` and ``_pem``, and sets ``api``.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
from collections.abc import Callable
from typing import Any

import requests

from providers._http import transport_error
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
    host_port_busy,
)
from tasks.engine.states import InstanceStatus

logger = logging.getLogger(__name__)

# The newest Engine API version the driver speaks; "auto" (the default) settles on
# min(this, the daemon's ApiVersion) at the first call: Debian's Docker 20.10 and
# Podman 4 stop at 1.41 and refuse anything newer with a 400.
MAX_API_VERSION = "1.44"
MIN_API_VERSION = "1.24"
DEFAULT_API_VERSION = "auto"
STATE_REPO = "cloudhost-state"
LABEL_NAME = "cloudhost.name"
LABEL_IMAGE = "cloudhost.image"
LABEL_GENERATION = "cloudhost.generation"
NEVER_STARTED = "0001-01-01T00:00:00Z"
# Reads one line from stdin and feeds it to chpasswd: printf is a shell builtin,
# so the password is in no process's argv, and no half-close of the hijacked
# stream is needed (TLS cannot half-close).
CHPASSWD_SCRIPT = 'IFS= read -r line && printf "%s\\n" "$line" | chpasswd'
STATUS = {
    "running": InstanceStatus.RUNNING,
    "restarting": InstanceStatus.RESTARTING,
    "created": InstanceStatus.STOPPED,
    "exited": InstanceStatus.STOPPED,
    "dead": InstanceStatus.STOPPED,
    "removing": InstanceStatus.DELETING,
    # Podman: a container whose stop is still under way keeps running until it ends
    # (get_state waits a little for it to settle first); a paused one is up, frozen
    # (Docker says State.Running for it too). Podman's "configured" is Docker's "created".
    "stopping": InstanceStatus.RUNNING,
    "paused": InstanceStatus.RUNNING,
    "configured": InstanceStatus.STOPPED,
    "stopped": InstanceStatus.STOPPED,
}
# States that end by themselves within seconds: get_state waits for them to settle.
TRANSIENT = ("stopping",)


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def negotiated_version(server: str | None) -> str:
    """The API version to speak with a daemon that offers ``server`` (its ApiVersion)."""
    if not server:
        return MIN_API_VERSION
    return min(server, MAX_API_VERSION, key=version_tuple)


# ------------------------------------------------------------------ errors


def classify(exc: BaseException, op: str, *, mutation: bool = False, creating: bool = False) -> ProviderError:
    """Map a docker-py / requests exception to a typed driver error."""
    import docker.errors
    import urllib3.exceptions as u3

    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, docker.errors.APIError):
        status = exc.status_code or 0
        message = str(exc.explanation or exc)
        text = f"{op}: {status} {message}"
        kw = {"op": op, "remote_status": status, "remote_message": message}
        low = message.lower()
        if status in (401, 403):
            return AuthError(text, **kw)
        busy = host_port_busy(text, message, **kw)
        if busy is not None:
            return busy
        if status == 404:
            return NotFoundError(text, **kw)
        if status == 409:
            if "in progress" in low:  # "removal of container x is already in progress"
                return RetryableError(text, **kw)
            return ConflictError(text, **kw)
        if status in (502, 503, 504):
            return AmbiguousOutcome(text, **kw) if mutation else RetryableError(text, **kw)
        if status >= 500 and creating:
            return AmbiguousOutcome(text, **kw)
        return PermanentError(text, **kw)
    if isinstance(exc, requests.RequestException | u3.HTTPError | OSError):
        return transport_error(exc, op, mutation, " to the Docker daemon")
    if isinstance(exc, docker.errors.DockerException):
        return PermanentError(f"{op}: {exc}", op=op)
    return PermanentError(f"{op}: {type(exc).__name__}: {exc}", op=op)


def pull_error(message: str, op: str) -> ProviderError:
    low = message.lower()
    kw = {"op": op, "remote_message": message}
    if "toomanyrequests" in low or "rate limit" in low:
        return RetryableError(f"{op}: registry rate limit: {message}", **kw)
    if "unauthorized" in low or "authentication required" in low:
        return AuthError(f"{op}: registry refused the pull: {message}", **kw)
    if any(s in low for s in ("not found", "manifest unknown", "repository does not exist", "pull access denied")):
        return PermanentError(f"{op}: image not found: {message}", **kw)
    return RetryableError(f"{op}: pull failed: {message}", **kw)


def raw_socket(obj: Any) -> socket.socket | None:
    for attr in ("_sock", None):
        candidate = getattr(obj, attr, None) if attr else obj
        if isinstance(candidate, socket.socket):
            return candidate
    return None


class EngineApi:
    def _connect(self, conn: dict, secrets: dict):
        import docker
        from docker.tls import TLSConfig

        base_url = conn.get("base_url") or "unix:///var/run/docker.sock"
        tls: Any = False
        tls_conf = conn.get("tls")
        if tls_conf:
            tls_conf = tls_conf if isinstance(tls_conf, dict) else {}
            cert = secrets.get("tls_client_cert") or tls_conf.get("client_cert")
            key = secrets.get("tls_client_key") or tls_conf.get("client_key")
            ca = tls_conf.get("ca_cert")
            try:
                tls = TLSConfig(
                    client_cert=(self._pem.path(cert), self._pem.path(key)) if cert and key else None,
                    ca_cert=self._pem.path(ca) if ca else None,
                    verify=bool(tls_conf.get("verify", True)),
                )
            except docker.errors.TLSParameterError as exc:
                raise PermanentError(f"docker: TLS settings: {exc}", op="config") from exc
        version = str(conn.get("api_version") or DEFAULT_API_VERSION)
        # docker-py's own "auto" would make a request in the constructor: the driver
        # negotiates at its first call instead (_negotiate), starting from the newest.
        self._negotiate_version = version == "auto"
        try:
            api = docker.APIClient(
                base_url=base_url,
                version=MAX_API_VERSION if self._negotiate_version else version,
                timeout=self.timeout,
                tls=tls,
            )
        except docker.errors.DockerException as exc:
            raise PermanentError(f"docker: {exc}", op="config") from exc
        # The worker machine's HTTPS_PROXY / REQUESTS_CA_BUNDLE must not apply.
        api.trust_env = False
        return api

    def _negotiate(self, cancel: CancelToken | None, op: str) -> None:
        """Settle the API version on the first call: GET /version (unversioned) and
        take min(the daemon's ApiVersion, MAX_API_VERSION)."""
        if not self._negotiate_version:
            return
        if cancel is not None:
            cancel.raise_if_cancelled()
        try:
            server = self.api.version(api_version=False).get("ApiVersion")
        except Exception as exc:
            raise classify(exc, op) from exc
        self.api._version = negotiated_version(server)
        self._negotiate_version = False
        logger.debug("docker %s: API version %s (the daemon offers %s)", self.config.name, self.api._version, server)

    # -- plumbing

    def _call(
        self,
        cancel: CancelToken | None,
        op: str,
        fn: Callable[..., Any],
        *args: Any,
        mutation: bool = False,
        creating: bool = False,
        abandon: bool = False,
        **kwargs: Any,
    ) -> Any:
        """One API call, its error classified; bounded by the deadline.

        ``abandon``: a call the daemon cannot abort (stop, restart) runs on a helper
        thread so a cancel returns at once; the call finishes on its own.
        """
        self.api.timeout = self.timeout
        if cancel is not None and cancel.remaining() is not None:
            self.api.timeout = max(1.0, min(self.timeout, cancel.remaining() + 1))
        if cancel is not None:
            cancel.raise_if_cancelled()
        self._negotiate(cancel, op)
        if not abandon or cancel is None:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                raise classify(exc, op, mutation=mutation, creating=creating) from exc
        box: dict[str, Any] = {}
        done = threading.Event()

        def target() -> None:
            try:
                box["result"] = fn(*args, **kwargs)
            except BaseException as exc:  # handed to the caller below
                box["error"] = exc
            finally:
                done.set()

        threading.Thread(target=target, daemon=True, name=f"docker-{op}").start()
        while not done.wait(0.05):
            if cancel.cancelled:
                logger.info("docker %s: %s abandoned on cancel (the daemon finishes it)", self.config.name, op)
                raise OperationCancelled(cancel.reason)
        if "error" in box:
            raise classify(box["error"], op, mutation=mutation, creating=creating) from box["error"]
        return box.get("result")

    def _inspect(self, name: str, op: str) -> dict | None:
        try:
            return self._call(None, op, self.api.inspect_container, name)
        except NotFoundError:
            return None

    def _ours(self, container: dict | None, name: str) -> dict | None:
        if container is None:
            return None
        if (container.get("Config", {}).get("Labels") or {}).get(LABEL_NAME) != name:
            logger.warning("docker %s: container %s exists but is not ours", self.config.name, name)
            return None
        return container

    def _need(self, ref: dict[str, Any], op: str) -> dict:
        name = self._name(ref)
        self._recover_swap(name, op)
        container = self._ours(self._inspect(name, op), name)
        if container is None:
            raise NotFoundError(f"{op}: container {name} does not exist", op=op)
        return container

    @staticmethod
    def _name(ref: dict[str, Any]) -> str:
        name = (ref or {}).get("name")
        if not name:
            raise PermanentError("docker: the ref has no container name", op="ref")
        return name

    @staticmethod
    def _ref(container: dict, name: str) -> dict[str, Any]:
        return {"id": container.get("Id", ""), "name": name}

    def _image_ref(self, image: str) -> str:
        return self.images.get(image) or image

    # -- image pull

    def _ensure_image(self, image: str, cancel: CancelToken, progress: ProgressCallback, lo: int, hi: int) -> None:
        op = "pull"
        if self.config.connection.get("pull", "missing") != "always":
            try:
                self._call(cancel, op, self.api.inspect_image, image)
                progress(hi, f"image {image} present")
                return
            except NotFoundError:
                pass
        from docker import auth
        from docker.utils import parse_repository_tag

        repo, tag = parse_repository_tag(image)
        headers = {}
        registry_auth = self.config.secrets.get("registry_auth")
        if registry_auth:
            headers["X-Registry-Auth"] = auth.encode_header(registry_auth).decode()
        progress(lo, f"pulling {image}")
        cancel.raise_if_cancelled()
        self._negotiate(cancel, op)
        try:
            response = self.api.post(
                self.api._url("/images/create"),
                params={"fromImage": repo, "tag": tag or "latest"},
                headers=headers,
                stream=True,
                timeout=(self.timeout, None),
            )
            self.api._raise_for_status(response)
        except Exception as exc:
            error = classify(exc, op)
            if isinstance(error, NotFoundError):
                error = PermanentError(f"pull: image {image} not found: {error.remote_message}", op=op)
            raise error from exc
        stop = threading.Event()
        watcher = threading.Thread(target=self._abort_on_cancel, args=(response, cancel, stop), daemon=True)
        watcher.start()
        layers: dict[str, tuple[int, int]] = {}
        last = -1
        try:
            for line in response.iter_lines(chunk_size=1024):
                cancel.raise_if_cancelled()
                if not line:
                    continue
                chunk = json.loads(line)
                if chunk.get("error") or chunk.get("errorDetail"):
                    raise pull_error(chunk.get("error") or chunk["errorDetail"].get("message", ""), op)
                layer, detail, status = chunk.get("id"), chunk.get("progressDetail") or {}, chunk.get("status", "")
                if layer and detail.get("total"):
                    layers[layer] = (int(detail.get("current", 0)), int(detail["total"]))
                elif layer and status in ("Pull complete", "Already exists", "Download complete"):
                    done_total = layers.get(layer, (0, 0))[1]
                    layers[layer] = (done_total, done_total) if done_total else (1, 1)
                elif layer and status == "Pulling fs layer":
                    layers.setdefault(layer, (0, 0))  # size not known yet
                known = [t for _, t in layers.values() if t]
                if known:
                    # A layer whose size is not announced yet counts as an average one.
                    guess = sum(known) // len(known)
                    total = sum(t or guess for _, t in layers.values())
                    pct = sum(min(c, t) for c, t in layers.values()) / total
                    percent = lo + int((hi - lo) * pct)
                    if percent > last:  # never backwards when a larger layer shows up
                        last = percent
                        progress(percent, f"pulling {image}: {int(pct * 100)}%")
        except OperationCancelled:
            raise
        except ProviderError:
            raise
        except (requests.RequestException, OSError, ValueError) as exc:
            if cancel.cancelled:
                raise OperationCancelled(cancel.reason) from exc
            raise RetryableError(f"pull: stream broken: {exc}", op=op) from exc
        finally:
            stop.set()
            response.close()
        if cancel.cancelled:  # the watcher closed the stream
            raise OperationCancelled(cancel.reason)
        progress(hi, f"pulled {image}")

    @staticmethod
    def _abort_on_cancel(response: requests.Response, cancel: CancelToken, stop: threading.Event) -> None:
        """Shut the stream's socket down when the token fires; closing the response alone
        does not wake a thread blocked in recv."""
        while not stop.wait(0.05):
            if cancel.cancelled:
                try:
                    sock = raw_socket(response.raw._fp.fp.raw)
                    if sock is not None:
                        sock.shutdown(socket.SHUT_RDWR)
                except Exception:  # already closed: nothing to wake
                    pass
                return
