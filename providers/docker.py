"""Docker driver: containers over the Docker Engine API (docker-py's low-level APIClient).

The Engine API is synchronous except for image pulls, which stream NDJSON
progress; we sum ``progressDetail`` per layer into the progress callback and
check the cancel token per chunk (a watcher thread shuts the socket down when
the token fires while the stream is silent). ``stop`` and ``restart`` block on
the daemon and cannot be aborted there; on cancel we stop waiting for them.

Published ports are fixed when a container is created, so a port change
recreates the container: stop, commit its filesystem to
``cloudhost-state/<name>:current`` (so the root password, installed packages
and everything else in the writable layer survive), rename it aside, create
the new one with the same settings and the new bindings, start it, and only
then remove the old one. ``/data`` is a named volume and is carried over as is.
A crash mid-swap is repaired by the next operation on the container (the one
renamed aside is the truth). Reset (rebuild) uses the same swap with the new
image and a fresh volume: a reinstall starts clean.

Connection settings and secrets: docs/providers-proxmox-docker.md.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import requests

from providers import hostshell
from providers._http import PemFiles, transport_error
from providers.base import (
    AmbiguousOutcome,
    AuthError,
    CancelToken,
    Capabilities,
    ConflictError,
    GuestSpec,
    GuestState,
    NotFoundError,
    OperationCancelled,
    PermanentError,
    PortSpec,
    ProgressCallback,
    ProviderConfig,
    ProviderError,
    RetryableError,
    ServerInfo,
    UnsupportedError,
)
from tasks.states import InstanceStatus

logger = logging.getLogger(__name__)

DEFAULT_API_VERSION = "1.44"
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
}


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
        if status == 404:
            return NotFoundError(text, **kw)
        if status == 409:
            if "in progress" in low:  # "removal of container x is already in progress"
                return RetryableError(text, **kw)
            return ConflictError(text, **kw)
        if "port is already allocated" in low or "address already in use" in low:
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


def _pull_error(message: str, op: str) -> ProviderError:
    low = message.lower()
    kw = {"op": op, "remote_message": message}
    if "toomanyrequests" in low or "rate limit" in low:
        return RetryableError(f"{op}: registry rate limit: {message}", **kw)
    if "unauthorized" in low or "authentication required" in low:
        return AuthError(f"{op}: registry refused the pull: {message}", **kw)
    if any(s in low for s in ("not found", "manifest unknown", "repository does not exist", "pull access denied")):
        return PermanentError(f"{op}: image not found: {message}", **kw)
    return RetryableError(f"{op}: pull failed: {message}", **kw)


def _raw_socket(obj: Any) -> socket.socket | None:
    for attr in ("_sock", None):
        candidate = getattr(obj, attr, None) if attr else obj
        if isinstance(candidate, socket.socket):
            return candidate
    return None


# ------------------------------------------------------------------ ports


def _bindings_with(bindings: dict, port: PortSpec) -> dict:
    out = _bindings_without(bindings, port)
    for i in range(port.host_port_end - port.host_port_start + 1):
        key = f"{port.guest_port_start + i}/{port.protocol}"
        out.setdefault(key, []).append(
            {"HostIp": port.listen_ip or "0.0.0.0", "HostPort": str(port.host_port_start + i)}
        )
    return out


def _bindings_without(bindings: dict, port: PortSpec) -> dict:
    """Drop every binding of ``port``'s host ports for its protocol (host ports are unique per provider)."""
    hosts = {str(p) for p in range(port.host_port_start, port.host_port_end + 1)}
    out: dict[str, list] = {}
    for key, entries in (bindings or {}).items():
        keep = [
            dict(e) for e in entries or [] if not (key.endswith(f"/{port.protocol}") and e.get("HostPort") in hosts)
        ]
        if keep:
            out[key] = keep
    return out


def _normal(bindings: dict | None) -> dict:
    return {
        k: sorted((e.get("HostIp") or "", e.get("HostPort") or "") for e in v) for k, v in (bindings or {}).items() if v
    }


def ports_from_bindings(bindings: dict | None) -> list[PortSpec]:
    """PortSpecs from PortBindings, contiguous single ports merged back into ranges."""
    singles = []
    for key, entries in (bindings or {}).items():
        guest, _, proto = key.partition("/")
        for entry in entries or []:
            if entry.get("HostPort"):
                singles.append((proto or "tcp", entry.get("HostIp") or "0.0.0.0", int(entry["HostPort"]), int(guest)))
    singles.sort()
    specs: list[PortSpec] = []
    for proto, ip, host, guest in singles:
        last = specs[-1] if specs else None
        if (
            last
            and (last.protocol, last.listen_ip) == (proto, ip)
            and last.host_port_end + 1 == host
            and last.guest_port_end + 1 == guest
        ):
            last.host_port_end, last.guest_port_end = host, guest
        else:
            specs.append(PortSpec(proto, host, host, guest, guest, listen_ip=ip))
    return specs


# ------------------------------------------------------------------ driver


class DockerDriver:
    def __init__(self, config: ProviderConfig):
        self.config = config
        conn = config.connection
        self.timeout = float(conn.get("timeout", 60))
        self.data_path = conn.get("data_path", "/data")
        self.port_change = conn.get("port_change", "commit")
        if self.port_change not in ("commit", "volume"):
            raise PermanentError("docker: connection.port_change must be 'commit' or 'volume'", op="config")
        self.swap_stop_timeout = int(conn.get("swap_stop_timeout", 10))
        self.images: dict[str, str] = conn.get("images", {}) or {}
        self.poll_interval = float(conn.get("poll_interval", 0.2))
        self._pem = PemFiles("cloudhost-docker-")
        self.api = self._connect(conn, config.secrets)
        self._closers: list = [self._pem.cleanup]
        weakref.finalize(self, hostshell.close_all, self._closers)

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
        try:
            # An explicit version: "auto" would make a request in the constructor.
            api = docker.APIClient(
                base_url=base_url,
                version=str(conn.get("api_version", DEFAULT_API_VERSION)),
                timeout=self.timeout,
                tls=tls,
            )
        except docker.errors.DockerException as exc:
            raise PermanentError(f"docker: {exc}", op="config") from exc
        # The worker machine's HTTPS_PROXY / REQUESTS_CA_BUNDLE must not apply.
        api.trust_env = False
        return api

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
                    raise _pull_error(chunk.get("error") or chunk["errorDetail"].get("message", ""), op)
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
                    sock = _raw_socket(response.raw._fp.fp.raw)
                    if sock is not None:
                        sock.shutdown(socket.SHUT_RDWR)
                except Exception:  # already closed: nothing to wake
                    pass
                return

    # -- container settings

    def _volume_name(self, name: str, generation: int) -> str:
        return f"{name}-data" if generation == 0 else f"{name}-data-{generation}"

    def _container_config(self, spec: GuestSpec, image: str, bindings: dict, generation: int) -> dict[str, Any]:
        conn = self.config.connection
        labels = {f"cloudhost.label.{k}": str(v) for k, v in spec.labels.items()}
        labels.update({LABEL_NAME: spec.name, LABEL_IMAGE: spec.image, LABEL_GENERATION: str(generation)})
        host = {
            "NanoCpus": int(spec.cpu) * 1_000_000_000,
            "Memory": int(spec.memory_mb) * 1024 * 1024,
            "MemorySwap": int(spec.memory_mb) * 1024 * 1024,  # no swap beyond the memory limit
            "PortBindings": bindings,
            "Mounts": [
                {"Type": "volume", "Source": self._volume_name(spec.name, generation), "Target": self.data_path}
            ],
            "RestartPolicy": {"Name": "unless-stopped"},
            "Init": bool(conn.get("init", True)),
        }
        if conn.get("storage_opt_size"):
            host["StorageOpt"] = {"size": f"{int(spec.disk_mb)}M"}
        if conn.get("network"):
            host["NetworkMode"] = conn["network"]
        config: dict[str, Any] = {
            "Image": image,
            "Hostname": spec.name,
            "Labels": labels,
            # A distro image's shell stays up with a TTY, like `docker run -dit`.
            "Tty": True,
            "OpenStdin": True,
            "ExposedPorts": {key: {} for key in bindings},
            "HostConfig": host,
        }
        if conn.get("command"):
            config["Cmd"] = list(conn["command"])
        return config

    @staticmethod
    def _config_from(old: dict, image: str, bindings: dict) -> dict[str, Any]:
        """The old container's settings, with another image and port bindings."""
        c, h = old.get("Config", {}), old.get("HostConfig", {})
        keys = (
            "Hostname",
            "Env",
            "Cmd",
            "Entrypoint",
            "Labels",
            "Tty",
            "OpenStdin",
            "WorkingDir",
            "User",
            "StopSignal",
        )
        config = {k: c[k] for k in keys if c.get(k) is not None}
        config["Image"] = image
        config["ExposedPorts"] = {key: {} for key in bindings}
        host_keys = ("NanoCpus", "Memory", "MemorySwap", "Mounts", "RestartPolicy", "StorageOpt", "NetworkMode", "Init")
        config["HostConfig"] = {k: h[k] for k in host_keys if h.get(k) is not None}
        config["HostConfig"]["PortBindings"] = bindings
        return config

    # -- the swap (port change, rebuild)

    def _swap_name(self, name: str, was_running: bool) -> str:
        return f"{name}-swap-{'running' if was_running else 'stopped'}"

    def _recover_swap(self, name: str, op: str) -> None:
        """Undo a swap a crash left halfway: the container renamed aside is the truth."""
        for was_running in (True, False):
            aside = self._ours(self._inspect(self._swap_name(name, was_running), op), name)
            if aside is None:
                continue
            logger.warning("docker %s: repairing an unfinished swap of %s", self.config.name, name)
            current = self._inspect(name, op)
            if current is not None:
                self._call(None, op, self.api.remove_container, current["Id"], force=True, mutation=True)
            self._call(None, op, self.api.rename, aside["Id"], name, mutation=True)
            if was_running:
                self._call(None, op, self.api.start, name, mutation=True)
            return

    def _swap(
        self,
        old: dict,
        name: str,
        new_config: dict,
        cancel: CancelToken,
        progress: ProgressCallback,
        op: str,
        *,
        commit: bool,
        start: bool | None = None,
    ) -> dict:
        was_running = bool(old.get("State", {}).get("Running"))
        start = was_running if start is None else start
        if was_running:
            progress(20, "stopping the container")
            self._stop(name, cancel, self.swap_stop_timeout, op)
        try:
            if commit:
                progress(35, "saving the container's filesystem")
                self._call(
                    cancel,
                    op,
                    self.api.commit,
                    old["Id"],
                    repository=f"{STATE_REPO}/{name}",
                    tag="current",
                    mutation=True,
                )
                new_config["Image"] = f"{STATE_REPO}/{name}:current"
            cancel.raise_if_cancelled()
            self._call(cancel, op, self.api.rename, old["Id"], self._swap_name(name, was_running), mutation=True)
            progress(55, "creating the new container")
            created = self._call(
                None, op, self.api.create_container_from_config, new_config, name, mutation=True, creating=True
            )
            if start:
                progress(70, "starting the new container")
                self._call(None, op, self.api.start, created["Id"], mutation=True)
        except BaseException as exc:
            logger.warning(
                "docker %s: swap of %s failed (%s); restoring the old container", self.config.name, name, exc
            )
            try:
                self._recover_swap(name, op)  # renamed aside: back under its name, started if it ran
                if was_running and not (self._inspect(name, op) or {}).get("State", {}).get("Running"):
                    self._call(None, op, self.api.start, old["Id"], mutation=True)
            except ProviderError as undo:
                logger.error("docker %s: could not restore %s: %s", self.config.name, name, undo)
            raise
        progress(85, "removing the old container")
        self._call(None, op, self.api.remove_container, old["Id"], force=True, mutation=True)
        return created

    def _stop(self, name: str, cancel: CancelToken, timeout: int, op: str) -> None:
        remaining = cancel.remaining()
        t = int(max(0, min(timeout, remaining - 1))) if remaining is not None else int(timeout)
        try:
            self._call(cancel, op, self.api.stop, name, timeout=t, mutation=True, abandon=True)
        except AmbiguousOutcome:
            pass  # read back below
        state = (self._inspect(name, op) or {}).get("State", {})
        if state.get("Running"):
            try:
                self._call(cancel, op, self.api.kill, name, mutation=True)
            except ConflictError:
                pass  # stopped meanwhile

    def host_channel(self) -> hostshell.HostShell | None:
        """The Docker host's shell (connection.ssh, optional), for host-side work such as traffic counters."""
        if not hasattr(self, "_shell"):
            self._shell = hostshell.from_config(self.config.connection, self.config.secrets)
            if self._shell is not None and hasattr(self._shell, "close"):
                self._closers.append(self._shell.close)
        return self._shell

    def close(self) -> None:
        """Release connections and temporary files (also done when the driver is collected)."""
        hostshell.close_all(self._closers)
        self.api.close()

    # -- Driver protocol

    def server_info(self) -> ServerInfo:
        version = self._call(None, "server_info", self.api.version)
        return ServerInfo(
            version=str(version.get("Version", "")),
            details={
                "api_version": version.get("ApiVersion"),
                "min_api_version": version.get("MinAPIVersion"),
                "client_api_version": self.api.api_version,
                "os": version.get("Os"),
                "arch": version.get("Arch"),
                "kernel": version.get("KernelVersion"),
            },
        )

    def capabilities(self) -> Capabilities:
        return Capabilities(
            instance_types=("container",),
            live_port_mapping=False,
            password_methods=("exec",),
            native_rebuild=False,
            remote_cancel=False,
        )

    def create(self, spec: GuestSpec, cancel: CancelToken, progress: ProgressCallback) -> dict[str, Any]:
        op = "create"
        if spec.instance_type != "container":
            raise UnsupportedError("docker runs containers only", op=op)
        name = spec.name
        progress(2, "looking for an existing container")
        self._recover_swap(name, op)
        existing = self._inspect(name, op)
        if existing is not None:
            if self._ours(existing, name) is None:
                raise ConflictError(f"create: a container named {name} exists and is not ours", op=op)
            progress(90, "container exists")
            return self._ref(existing, name)
        image = self._image_ref(spec.image)
        self._ensure_image(image, cancel, progress, 5, 75)
        cancel.raise_if_cancelled()
        progress(80, "creating the container")
        config = self._container_config(spec, image, {}, generation=0)
        try:
            created = self._call(
                cancel, op, self.api.create_container_from_config, config, name, mutation=True, creating=True
            )
        except ConflictError:
            existing = self._ours(self._inspect(name, op), name)
            if existing is None:
                raise
            created = existing  # a concurrent attempt made it
        except NotFoundError as exc:
            raise PermanentError(f"create: image {image} is missing: {exc.remote_message}", op=op) from exc
        progress(90, "container created")
        return {"id": created.get("Id", ""), "name": name}

    def start(self, ref: dict[str, Any], cancel: CancelToken, progress: ProgressCallback) -> None:
        op = "start"
        container = self._need(ref, op)
        if container["State"].get("Running"):
            progress(100, "already running")
            return
        self._call(cancel, op, self.api.start, container["Id"], mutation=True, abandon=True)
        state = (self._inspect(container["Id"], op) or {}).get("State", {})
        if not state.get("Running"):
            raise PermanentError(
                f"start: the container exited at once (exit code {state.get('ExitCode')}) {state.get('Error', '')}".strip(),
                op=op,
            )
        progress(100, "running")

    def stop(
        self, ref: dict[str, Any], cancel: CancelToken, progress: ProgressCallback, graceful_timeout: int = 30
    ) -> None:
        op = "stop"
        container = self._need(ref, op)
        if not container["State"].get("Running"):
            progress(100, "already stopped")
            return
        progress(10, f"stopping (up to {graceful_timeout} s, then killed)")
        self._stop(container["Id"], cancel, graceful_timeout, op)
        progress(100, "stopped")

    def restart(self, ref: dict[str, Any], cancel: CancelToken, progress: ProgressCallback) -> None:
        op = "restart"
        container = self._need(ref, op)
        if not container["State"].get("Running"):
            self.start(ref, cancel, progress)
            return
        remaining = cancel.remaining()
        t = int(max(0, min(30, remaining - 1))) if remaining is not None else 30
        self._call(cancel, op, self.api.restart, container["Id"], timeout=t, mutation=True, abandon=True)
        progress(100, "restarted")

    def delete(self, ref: dict[str, Any], cancel: CancelToken, progress: ProgressCallback) -> None:
        op = "delete"
        name = self._name(ref)
        self._recover_swap(name, op)
        container = self._inspect(name, op)
        if container is not None and self._ours(container, name) is None:
            progress(100, "already gone (the name now belongs to another container)")
            return
        volumes = []
        if container is not None:
            volumes = [
                m.get("Name") or m.get("Source") for m in container.get("Mounts", []) if m.get("Type") == "volume"
            ]
            try:
                self._call(
                    cancel,
                    op,
                    self.api.remove_container,
                    container["Id"],
                    force=True,
                    v=True,
                    mutation=True,
                    abandon=True,
                )
            except NotFoundError:
                pass
        if self._inspect(name, op) is not None:
            raise PermanentError(f"delete: container {name} still exists", op=op)
        for volume in volumes or [self._volume_name(name, 0)]:
            try:
                self._call(cancel, op, self.api.remove_volume, volume, mutation=True)
            except NotFoundError:
                pass
            except ConflictError as exc:
                raise RetryableError(f"delete: volume {volume} still in use: {exc.remote_message}", op=op) from exc
        try:
            self._call(cancel, op, self.api.remove_image, f"{STATE_REPO}/{name}:current", mutation=True)
        except (NotFoundError, ConflictError):
            pass
        progress(100, "deleted")

    def rebuild(self, ref: dict[str, Any], spec: GuestSpec, cancel: CancelToken, progress: ProgressCallback) -> dict:
        op = "rebuild"
        name = self._name(ref)
        spec.name = name
        old = self._need(ref, op)
        image = self._image_ref(spec.image)
        self._ensure_image(image, cancel, lambda p, m: progress(p, m), 2, 15)
        generation = int((old["Config"].get("Labels") or {}).get(LABEL_GENERATION, 0)) + 1
        bindings = old.get("HostConfig", {}).get("PortBindings") or {}
        new_config = self._container_config(spec, image, bindings, generation)
        old_volumes = [m.get("Name") or m.get("Source") for m in old.get("Mounts", []) if m.get("Type") == "volume"]
        created = self._swap(old, name, new_config, cancel, progress, op, commit=False)
        for volume in old_volumes:
            try:
                self._call(None, op, self.api.remove_volume, volume, mutation=True)
            except ProviderError as exc:
                logger.warning("docker %s: old volume %s of %s kept: %s", self.config.name, volume, name, exc)
        try:
            self._call(None, op, self.api.remove_image, f"{STATE_REPO}/{name}:current", mutation=True)
        except ProviderError:
            pass
        progress(100, "rebuilt")
        return {"id": created.get("Id", ""), "name": name}

    def set_password(self, ref: dict[str, Any], password: str, cancel: CancelToken, progress: ProgressCallback) -> None:
        op = "set_password"
        if not password or "\n" in password:
            raise PermanentError("set_password: the password must be one non-empty line", op=op)
        container = self._need(ref, op)
        if not container["State"].get("Running"):
            raise ConflictError("set_password: the container must be running", op=op)
        progress(20, "running chpasswd in the container")
        exec_id = self._call(
            cancel,
            op,
            self.api.exec_create,
            container["Id"],
            ["sh", "-c", CHPASSWD_SCRIPT],
            stdin=True,
            stdout=True,
            stderr=True,
            user="root",
            mutation=True,
        )["Id"]
        sock = self._call(cancel, op, self.api.exec_start, exec_id, socket=True, mutation=True)
        raw = _raw_socket(sock)
        if raw is None:
            raise PermanentError("set_password: the exec stream is not a socket", op=op)
        output = {1: bytearray(), 2: bytearray()}
        try:
            raw.settimeout(0.2)
            raw.sendall(f"root:{password}\n".encode())
            self._read_frames(raw, output, cancel, op)
        except OSError as exc:
            raise RetryableError(f"set_password: exec stream broken: {exc}", op=op) from exc
        finally:
            try:
                sock.close()
            finally:
                raw.close()
        info = self._call(cancel, op, self.api.exec_inspect, exec_id)
        deadline = time.monotonic() + 10
        while info.get("Running") and time.monotonic() < deadline:
            cancel.sleep(self.poll_interval)
            info = self._call(cancel, op, self.api.exec_inspect, exec_id)
        if info.get("Running") or info.get("ExitCode") != 0:
            err = output[2].decode(errors="replace").strip()[:500]
            raise PermanentError(f"set_password: chpasswd failed (exit {info.get('ExitCode')}): {err}", op=op)
        progress(100, "password set")

    def _read_frames(self, raw: socket.socket, output: dict[int, bytearray], cancel: CancelToken, op: str) -> None:
        """Read the multiplexed exec stream until the daemon closes it (bounded)."""
        buf = bytearray()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            cancel.raise_if_cancelled()
            try:
                data = raw.recv(65536)
            except TimeoutError:
                continue
            if not data:
                break
            buf += data
            while len(buf) >= 8:
                stream, length = struct.unpack(">BxxxL", bytes(buf[:8]))
                if len(buf) < 8 + length:
                    break
                output.setdefault(stream, bytearray()).extend(buf[8 : 8 + length])
                del buf[: 8 + length]
        else:
            raise RetryableError("set_password: chpasswd did not finish within 30 s", op=op)

    def add_port(self, ref: dict[str, Any], port: PortSpec, cancel: CancelToken, progress: ProgressCallback) -> None:
        op = "add_port"
        container = self._need(ref, op)
        bindings = container.get("HostConfig", {}).get("PortBindings") or {}
        self._change_ports(container, _bindings_with(bindings, port), cancel, progress, op)
        progress(100, f"{port.handle} published")

    def remove_port(self, ref: dict[str, Any], port: PortSpec, cancel: CancelToken, progress: ProgressCallback) -> None:
        op = "remove_port"
        container = self._need(ref, op)
        bindings = container.get("HostConfig", {}).get("PortBindings") or {}
        self._change_ports(container, _bindings_without(bindings, port), cancel, progress, op)
        progress(100, f"{port.handle} removed")

    def _change_ports(
        self, container: dict, bindings: dict, cancel: CancelToken, progress: ProgressCallback, op: str
    ) -> None:
        if _normal(bindings) == _normal(container.get("HostConfig", {}).get("PortBindings")):
            return  # already so
        name = container["Name"].lstrip("/")
        started = container.get("State", {}).get("StartedAt", NEVER_STARTED)
        commit = self.port_change == "commit" and not started.startswith("0001-")
        new_config = self._config_from(container, container["Config"]["Image"], bindings)
        try:
            self._swap(container, name, new_config, cancel, progress, op, commit=commit)
        except ConflictError as exc:
            raise ConflictError(f"{op}: {exc.remote_message or exc}", op=op, remote_message=exc.remote_message) from exc

    def get_state(self, ref: dict[str, Any]) -> GuestState:
        op = "get_state"
        name = self._name(ref)
        container = self._ours(self._inspect(name, op), name)
        if container is None:
            for was_running in (True, False):  # mid-swap: the one aside is the guest
                container = self._ours(self._inspect(self._swap_name(name, was_running), op), name)
                if container is not None:
                    break
        if container is None:
            return GuestState(exists=False, status=InstanceStatus.UNKNOWN, ref=ref)
        state = container.get("State", {})
        status = STATUS.get(state.get("Status", ""), InstanceStatus.UNKNOWN)
        addresses = []
        for net in (container.get("NetworkSettings", {}).get("Networks") or {}).values():
            for key in ("IPAddress", "GlobalIPv6Address"):
                if net.get(key):
                    addresses.append(net[key])
        ports = ports_from_bindings(container.get("HostConfig", {}).get("PortBindings"))
        return GuestState(exists=True, status=status, addresses=addresses, ref=self._ref(container, name), ports=ports)
