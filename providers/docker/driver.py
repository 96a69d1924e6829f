"""The Docker driver's operations (the Driver protocol of providers.base).

The model (pull progress, blocking calls, port changes by commit-and-swap) is in
the package docstring.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
import weakref
from typing import Any

from providers import hostshell
from providers._http import PemFiles
from providers.base import (
    CancelToken,
    Capabilities,
    ConflictError,
    GuestSpec,
    GuestState,
    HostPortBusy,
    NotFoundError,
    PermanentError,
    PortSpec,
    ProgressCallback,
    ProviderConfig,
    ProviderError,
    RetryableError,
    ServerInfo,
    UnsupportedError,
)
from providers.docker.engine import (
    CHPASSWD_SCRIPT,
    LABEL_GENERATION,
    NEVER_STARTED,
    STATE_REPO,
    STATUS,
    TRANSIENT,
    EngineApi,
    raw_socket,
)
from providers.docker.swap import ContainerSwap, bindings_with, bindings_without, normal_bindings, ports_from_bindings
from tasks.engine.states import InstanceStatus

logger = logging.getLogger(__name__)


class DockerDriver(EngineApi, ContainerSwap):
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
        self.settle_seconds = float(conn.get("settle_seconds", 5))
        self._pem = PemFiles("cloudhost-docker-")
        self.api = self._connect(conn, config.secrets)
        self._closers: list = [self._pem.cleanup]
        weakref.finalize(self, hostshell.close_all, self._closers)

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
        # Published at creation (spec.ports): no stop, commit and swap per port spec.
        config = self._container_config(spec, image, None, generation=0)
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
        raw = raw_socket(sock)
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
        self._change_ports(container, bindings_with(bindings, port), cancel, progress, op)
        progress(100, f"{port.handle} published")

    def remove_port(self, ref: dict[str, Any], port: PortSpec, cancel: CancelToken, progress: ProgressCallback) -> None:
        op = "remove_port"
        container = self._need(ref, op)
        bindings = container.get("HostConfig", {}).get("PortBindings") or {}
        self._change_ports(container, bindings_without(bindings, port), cancel, progress, op)
        progress(100, f"{port.handle} removed")

    def _change_ports(
        self, container: dict, bindings: dict, cancel: CancelToken, progress: ProgressCallback, op: str
    ) -> None:
        if normal_bindings(bindings) == normal_bindings(container.get("HostConfig", {}).get("PortBindings")):
            return  # already so
        name = container["Name"].lstrip("/")
        started = container.get("State", {}).get("StartedAt", NEVER_STARTED)
        commit = self.port_change == "commit" and not started.startswith("0001-")
        new_config = self._config_from(container, container["Config"]["Image"], bindings)
        try:
            self._swap(container, name, new_config, cancel, progress, op, commit=commit)
        except ConflictError as exc:
            text = f"{op}: {exc.remote_message or exc}"
            if isinstance(exc, HostPortBusy):  # (the task layer records the port it names)
                raise HostPortBusy(text, op=op, remote_message=exc.remote_message, ports=exc.ports) from exc
            raise ConflictError(text, op=op, remote_message=exc.remote_message) from exc

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
        settle = time.monotonic() + self.settle_seconds
        while state.get("Status") in TRANSIENT and time.monotonic() < settle:
            time.sleep(self.poll_interval)  # a stop under way (Podman): wait for it to end
            container = self._inspect(container["Id"], op) or container
            state = container.get("State", {})
        status = STATUS.get(state.get("Status", ""), InstanceStatus.UNKNOWN)
        addresses = []
        for net in (container.get("NetworkSettings", {}).get("Networks") or {}).values():
            for key in ("IPAddress", "GlobalIPv6Address"):
                if net.get(key):
                    addresses.append(net[key])
        ports = ports_from_bindings(container.get("HostConfig", {}).get("PortBindings"))
        return GuestState(exists=True, status=status, addresses=addresses, ref=self._ref(container, name), ports=ports)
