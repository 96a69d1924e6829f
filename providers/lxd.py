"""LXD driver: the ``/1.0`` REST API over the unix socket or mutual TLS.

Also the implementation of the Incus driver (providers/incus.py), which only
swaps the ``Flavour``: the two daemons share the API shape, and what differs
(socket path, TLS floor, image remotes, ``/wait`` failure shape) is handled in
providers/_lxdapi.py.

Connection settings (Provider.connection):

    endpoint          unix:///var/snap/lxd/common/lxd/unix.socket (default: the first
                      existing default socket) or https://host:8443
    server_fingerprint | server_cert | server_ca    trust for https (see _lxdapi)
    project           default "default"
    storage_pool      pool of the root disk, default "default"
    profiles          list, default ["default"]
    network           managed network for eth0 (optional; needed for bandwidth limits)
    image_server      default image server for unprefixed images (optional)
    image_remotes     {"name": "https://..."} extra "remote:alias" prefixes
    nat_listen_address  host address for VM port mappings (proxy devices in NAT mode)
    restart_timeout   graceful restart seconds before forcing, default 30
    request_timeout, connect_timeout, wait_slice, trust_env

Secrets (Provider secrets): client_cert, client_key (PEM) for https.

Guest refs are ``{"name", "project", "type"}``; every method re-reads the guest,
so a step repeated after a crash converges. Progress percentages cover the one
call they are reported from (0-100).
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

from providers._lxdapi import LXD, APIResponse, Flavour, LXDClient
from providers._lxdws import WebSocket
from providers.base import (
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

_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9-]{0,62}$")
_LABEL_RE = re.compile(r"[^a-z0-9._-]")
_PORT_DEVICE_PREFIX = "pm-"
_STATUS = {
    "running": InstanceStatus.RUNNING,
    "stopped": InstanceStatus.STOPPED,
    "error": InstanceStatus.ERROR,
    "starting": InstanceStatus.STARTING,
    "stopping": InstanceStatus.STOPPING,
}
# Keys of InstancePut: what a PUT must carry back (minus the device it drops).
_PUT_KEYS = ("architecture", "config", "devices", "ephemeral", "profiles", "description", "stateful")


class LXDDriver:
    flavour: Flavour = LXD

    def __init__(self, config: ProviderConfig):
        self.config = config
        conn = config.connection
        self.api = LXDClient(self.flavour, conn, config.secrets, name=config.name)
        self.storage_pool = str(conn.get("storage_pool") or "default")
        self.profiles = list(conn.get("profiles") or ["default"])
        self.network = conn.get("network") or None
        self.restart_timeout = int(conn.get("restart_timeout", 30))
        self._extensions: frozenset[str] | None = None

    # ------------------------------------------------------------------ server

    def server_info(self) -> ServerInfo:
        md = self.api.request("GET", "/1.0", op="server info", project=False).metadata or {}
        if md.get("auth") != "trusted":
            raise AuthError(
                f"{self.flavour.product} at {self.api.endpoint_label} does not trust this client certificate "
                "(add it with a trust token)",
                op="server info",
            )
        env = md.get("environment") or {}
        self._extensions = frozenset(md.get("api_extensions") or ())
        details = {
            "server": env.get("server", ""),
            "server_name": env.get("server_name", ""),
            "api_version": md.get("api_version", ""),
            "api_extensions": len(self._extensions),
            "kernel": env.get("kernel_version", ""),
            "storage": env.get("storage", ""),
            "endpoint": self.api.endpoint_label,
            "project": self.api.project,
        }
        if env.get("server") and env["server"] != self.flavour.name:
            details["note"] = f"configured as {self.flavour.name} but the server says {env['server']}"
        return ServerInfo(version=str(env.get("server_version") or md.get("api_version") or "unknown"), details=details)

    def _has_extension(self, name: str) -> bool:
        if self._extensions is None:
            self.server_info()
        return name in (self._extensions or ())

    def capabilities(self) -> Capabilities:
        return Capabilities(
            instance_types=("container", "vm"),
            live_port_mapping=True,
            password_methods=("exec-stdin",),
            native_rebuild=self._has_extension("instances_rebuild"),
            remote_cancel=True,
        )

    # ---------------------------------------------------------------- helpers

    def _name(self, ref: dict[str, Any]) -> str:
        name = str((ref or {}).get("name") or "")
        if not _NAME_RE.match(name):
            raise PermanentError(f"invalid instance name in ref: {name!r}")
        return name

    def _ref(self, name: str, api_type: str) -> dict[str, Any]:
        return {"name": name, "project": self.api.project, "type": api_type or "container"}

    def _get(self, name: str, *, op: str) -> APIResponse | None:
        try:
            return self.api.request("GET", f"/1.0/instances/{name}", op=op)
        except NotFoundError:
            return None

    def _require(self, name: str, *, op: str) -> APIResponse:
        found = self._get(name, op=op)
        if found is None:
            raise NotFoundError(f"{op}: instance {name} not found on {self.config.name}", op=op, remote_status=404)
        return found

    @staticmethod
    def _status(instance: dict[str, Any]) -> str:
        return str(instance.get("status") or "").lower()

    def _scaled(self, progress: ProgressCallback, lo: int, hi: int):
        def report(pct: int | None, message: str) -> None:
            progress(lo if pct is None else lo + (hi - lo) * max(0, min(100, pct)) // 100, message)

        return report

    def _state(
        self,
        name: str,
        body: dict[str, Any],
        *,
        target: str | None,
        op: str,
        cancel: CancelToken,
    ) -> None:
        """PUT the state and wait. "Already running/stopped" is success once the state confirms it.

        ``target`` None (restart): a failure is a failure, whatever state the guest is in.
        """
        cancel.raise_if_cancelled()
        try:
            started = self.api.request("PUT", f"/1.0/instances/{name}/state", op=op, json_body=body, cancel=cancel)
            self.api.wait(started, op=op, cancel=cancel)
        except (AuthError, NotFoundError, RetryableError):
            raise
        except PermanentError as exc:
            if target is None:
                raise
            current = self._get(name, op=op)
            if current is not None and self._status(current.metadata) == target:
                logger.info("%s %s %s: already %s (%s)", self.config.name, op, name, target, exc.remote_message)
                return
            raise

    def _force_stop(self, name: str, *, op: str, cancel: CancelToken) -> None:
        self._state(name, {"action": "stop", "force": True}, target="stopped", op=op, cancel=cancel)

    def _image_source(self, image: str) -> dict[str, Any]:
        conn = self.config.connection
        remotes = dict(self.flavour.image_remotes)
        remotes.update(conn.get("image_remotes") or {})
        source: dict[str, Any] = {"type": "image"}
        prefix, sep, alias = image.partition(":")
        if sep and prefix in remotes:
            source.update(alias=alias, server=remotes[prefix], protocol="simplestreams", mode="pull")
        elif image.startswith("fingerprint/"):
            source["fingerprint"] = image.split("/", 1)[1]
        elif conn.get("image_server"):
            protocol = conn.get("image_protocol") or "simplestreams"
            source.update(alias=image, server=conn["image_server"], protocol=protocol, mode="pull")
        else:
            source["alias"] = image
        return source

    def _create_body(self, spec: GuestSpec, extra_devices: dict[str, Any] | None = None) -> dict[str, Any]:
        api_type = "virtual-machine" if spec.instance_type == "vm" else "container"
        config = {"limits.cpu": str(spec.cpu), "limits.memory": f"{spec.memory_mb}MiB"}
        for key, value in spec.labels.items():
            clean = _LABEL_RE.sub("-", str(key).lower())
            if clean:
                config[f"user.{clean}"] = str(value)
        devices: dict[str, Any] = {
            "root": {"type": "disk", "path": "/", "pool": self.storage_pool, "size": f"{spec.disk_mb}MiB"}
        }
        if self.network:
            nic: dict[str, Any] = {"type": "nic", "network": self.network, "name": "eth0"}
            if spec.bandwidth_mbps:
                nic["limits.ingress"] = nic["limits.egress"] = f"{spec.bandwidth_mbps}Mbit"
            devices["eth0"] = nic
        devices.update(extra_devices or {})
        return {
            "name": spec.name,
            "type": api_type,
            "source": self._image_source(spec.image),
            "config": config,
            "devices": devices,
            "profiles": self.profiles,
        }

    # ------------------------------------------------------------- operations

    def create(self, spec: GuestSpec, cancel: CancelToken, progress: ProgressCallback) -> dict[str, Any]:
        return self._create(spec, cancel, progress)

    def _create(
        self,
        spec: GuestSpec,
        cancel: CancelToken,
        progress: ProgressCallback,
        extra_devices: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        op = "create"
        name = self._name({"name": spec.name})
        cancel.raise_if_cancelled()
        found = self._get(name, op=op)
        if found is not None:
            # Deterministic names: a retry after a crash or an ambiguous outcome lands here.
            logger.info("%s create %s: already exists, reusing it", self.config.name, name)
            progress(100, "instance already exists")
            return self._ref(name, found.metadata.get("type", ""))
        body = self._create_body(spec, extra_devices)
        progress(0, f"creating {name} from {spec.image}")
        try:
            started = self.api.request("POST", "/1.0/instances", op=op, json_body=body, create=True, cancel=cancel)
            self.api.wait(started, op=op, cancel=cancel, progress=self._scaled(progress, 5, 95))
        except ConflictError:
            found = self._get(name, op=op)
            if found is None:
                raise
            logger.info("%s create %s: lost a race with an earlier attempt; reusing it", self.config.name, name)
        progress(100, f"created {name}")
        return self._ref(name, body["type"])

    def start(self, ref: dict[str, Any], cancel: CancelToken, progress: ProgressCallback) -> None:
        name = self._name(ref)
        current = self._require(name, op="start")
        if self._status(current.metadata) == "running":
            progress(100, "already running")
            return
        progress(10, f"starting {name}")
        self._state(name, {"action": "start"}, target="running", op="start", cancel=cancel)
        progress(100, "running")

    def stop(
        self, ref: dict[str, Any], cancel: CancelToken, progress: ProgressCallback, graceful_timeout: int = 30
    ) -> None:
        name = self._name(ref)
        current = self._require(name, op="stop")
        if self._status(current.metadata) == "stopped":
            progress(100, "already stopped")
            return
        progress(10, f"shutting {name} down (up to {graceful_timeout}s)")
        body = {"action": "stop", "timeout": int(graceful_timeout), "force": False}
        try:
            self._state(name, body, target="stopped", op="stop", cancel=cancel)
        except (AuthError, NotFoundError, RetryableError):
            raise
        except PermanentError as exc:
            logger.info("%s stop %s: graceful shutdown failed (%s); forcing", self.config.name, name, exc.message)
            progress(60, "graceful shutdown failed; forcing")
            self._force_stop(name, op="stop", cancel=cancel)
        progress(100, "stopped")

    def restart(self, ref: dict[str, Any], cancel: CancelToken, progress: ProgressCallback) -> None:
        name = self._name(ref)
        current = self._require(name, op="restart")
        if self._status(current.metadata) != "running":
            # A stopped guest ends up running, which is what a restart promises.
            self.start(ref, cancel, progress)
            return
        progress(10, f"restarting {name}")
        body = {"action": "restart", "timeout": self.restart_timeout, "force": False}
        try:
            self._state(name, body, target=None, op="restart", cancel=cancel)
        except (AuthError, NotFoundError, RetryableError):
            raise
        except PermanentError as exc:
            if (
                "running" in exc.remote_message.lower()
                and self._status(self._require(name, op="restart").metadata) != "running"
            ):
                # Stopped in between ("The instance isn't running"): starting it keeps the promise.
                self.start(ref, cancel, progress)
                return
            logger.info("%s restart %s: graceful restart failed (%s); forcing", self.config.name, name, exc.message)
            progress(60, "graceful restart failed; forcing")
            self._state(name, {"action": "restart", "force": True}, target=None, op="restart", cancel=cancel)
        progress(100, "running")

    def delete(self, ref: dict[str, Any], cancel: CancelToken, progress: ProgressCallback) -> None:
        op = "delete"
        name = self._name(ref)
        current = self._get(name, op=op)
        if current is None:
            progress(100, "already gone")
            return
        if self._status(current.metadata) != "stopped":
            progress(10, f"stopping {name}")
            self._force_stop(name, op=op, cancel=cancel)
        cancel.raise_if_cancelled()
        progress(50, f"deleting {name}")
        try:
            started = self.api.request("DELETE", f"/1.0/instances/{name}", op=op, cancel=cancel)
            self.api.wait(started, op=op, cancel=cancel)
        except NotFoundError:
            pass
        except PermanentError as exc:
            if "running" in exc.remote_message.lower():  # started again by someone in between
                raise RetryableError(exc.message, op=op, remote_status=exc.remote_status) from None
            raise
        if self._get(name, op=op) is not None:
            raise RetryableError(f"delete: {name} is still present after its delete operation", op=op)
        progress(100, "deleted")

    def rebuild(self, ref: dict[str, Any], spec: GuestSpec, cancel: CancelToken, progress: ProgressCallback) -> dict:
        """Reinstall the root filesystem from spec.image. The guest is left stopped."""
        op = "rebuild"
        name = self._name(ref)
        current = self._require(name, op=op)
        if self._status(current.metadata) != "stopped":
            progress(5, f"stopping {name}")
            self._force_stop(name, op=op, cancel=cancel)
        cancel.raise_if_cancelled()
        if self._has_extension("instances_rebuild"):
            progress(10, f"rebuilding {name} from {spec.image}")
            started = self.api.request(
                "POST",
                f"/1.0/instances/{name}/rebuild",
                op=op,
                json_body={"source": self._image_source(spec.image)},
                cancel=cancel,
            )
            self.api.wait(started, op=op, cancel=cancel, progress=self._scaled(progress, 10, 95))
            progress(100, "rebuilt")
            return self._ref(name, current.metadata.get("type", ""))
        # No native rebuild: delete and create under the same name, carrying the
        # port mappings (proxy devices) over so the instance keeps its ports.
        keep = {
            k: v
            for k, v in (current.metadata.get("devices") or {}).items()
            if k.startswith(_PORT_DEVICE_PREFIX) and v.get("type") == "proxy"
        }
        progress(10, f"deleting {name} to reinstall it")
        self.delete(ref, cancel, self._scaled(progress, 10, 30))
        return self._create(spec, cancel, self._scaled(progress, 30, 100), extra_devices=keep)

    def set_password(self, ref: dict[str, Any], password: str, cancel: CancelToken, progress: ProgressCallback) -> None:
        """chpasswd in the guest, the password on its stdin (exec websocket): never argv or environment."""
        op = "set password"
        name = self._name(ref)
        if not password or any(c in password for c in "\n\r\x00"):
            raise PermanentError("set password: the password must be a non-empty single line", op=op)
        cancel.raise_if_cancelled()
        progress(10, "running chpasswd")
        started = self.api.request(
            "POST",
            f"/1.0/instances/{name}/exec",
            op=op,
            json_body={
                "command": ["chpasswd"],
                "environment": {},
                "wait-for-websocket": True,
                "interactive": False,
            },
            cancel=cancel,
        )
        op_id = started.operation_id or ""
        fds = ((started.metadata or {}).get("metadata") or {}).get("fds") or {}
        if not op_id or not all(k in fds for k in ("0", "1", "2")):
            raise PermanentError(f"{op}: exec did not return websocket secrets", op=op)
        streams: list[WebSocket] = []
        outputs: dict[str, bytearray] = {"1": bytearray(), "2": bytearray()}
        readers: list[threading.Thread] = []
        try:
            try:
                for fd in ("0", "1", "2"):
                    streams.append(self.api.open_websocket(op_id, fds[fd]))
            except OSError as exc:
                self.api.cancel_operation(op_id, op=op)
                raise RetryableError(f"{op}: cannot attach to the exec streams: {exc}", op=op) from None
            for fd, ws in zip(("1", "2"), streams[1:], strict=True):
                t = threading.Thread(target=_drain, args=(ws, outputs[fd]), name=f"lxd-exec-{fd}", daemon=True)
                t.start()
                readers.append(t)
            try:
                streams[0].send_binary(f"root:{password}\n".encode())
                streams[0].send_close()  # EOF on chpasswd's stdin
            except OSError as exc:
                self.api.cancel_operation(op_id, op=op)
                raise RetryableError(f"{op}: writing to the exec stdin failed: {exc}", op=op) from None
            final = self.api.wait(started, op=op, cancel=cancel)
        finally:
            for t in readers:
                t.join(timeout=2)
            for ws in streams:
                ws.close()
        rc = (final.get("metadata") or {}).get("return")
        if rc != 0:
            err = bytes(outputs["2"]).decode("utf-8", "replace").replace(password, "***").strip()[:300]
            raise PermanentError(f"{op}: chpasswd exited with {rc}: {err or 'no message'}", op=op)
        progress(100, "password set")

    def _proxy_device(self, port: PortSpec, api_type: str) -> dict[str, str]:
        def rng(a: int, b: int) -> str:
            return str(a) if a == b else f"{a}-{b}"

        host, guest = rng(port.host_port_start, port.host_port_end), rng(port.guest_port_start, port.guest_port_end)
        if api_type == "virtual-machine":
            # VMs have no shared network namespace: proxy devices must run in NAT
            # mode, which needs a concrete host address to listen on.
            listen_ip = self.config.connection.get("nat_listen_address")
            if not listen_ip:
                raise UnsupportedError(
                    "port mappings on virtual machines need connection.nat_listen_address (proxy NAT mode)"
                )
            return {
                "type": "proxy",
                "nat": "true",
                "listen": f"{port.protocol}:{listen_ip}:{host}",
                "connect": f"{port.protocol}:0.0.0.0:{guest}",
            }
        return {
            "type": "proxy",
            "listen": f"{port.protocol}:{port.listen_ip}:{host}",
            "connect": f"{port.protocol}:127.0.0.1:{guest}",
        }

    def add_port(self, ref: dict[str, Any], port: PortSpec, cancel: CancelToken, progress: ProgressCallback) -> None:
        op = "add port"
        name = self._name(ref)
        current = self._require(name, op=op)
        device = self._proxy_device(port, current.metadata.get("type", ""))
        existing = (current.metadata.get("devices") or {}).get(port.handle)
        if existing is not None:
            if all(existing.get(k) == v for k, v in device.items()):
                progress(100, "port mapping already present")
                return
            raise ConflictError(f"{op}: device {port.handle} exists on {name} with another definition", op=op)
        cancel.raise_if_cancelled()
        progress(20, f"adding {port.handle}")
        # PATCH merges devices by name: a deterministic name makes this idempotent.
        resp = self.api.request(
            "PATCH", f"/1.0/instances/{name}", op=op, json_body={"devices": {port.handle: device}}, cancel=cancel
        )
        self.api.wait(resp, op=op, cancel=cancel)
        progress(100, "port mapping added")

    def remove_port(self, ref: dict[str, Any], port: PortSpec, cancel: CancelToken, progress: ProgressCallback) -> None:
        op = "remove port"
        name = self._name(ref)
        for _attempt in range(3):
            current = self._get(name, op=op)
            if current is None or port.handle not in (current.metadata.get("devices") or {}):
                progress(100, "port mapping already absent")
                return
            cancel.raise_if_cancelled()
            md = current.metadata
            body = {k: md[k] for k in _PUT_KEYS if k in md}
            body["devices"] = {k: v for k, v in md["devices"].items() if k != port.handle}
            headers = {"If-Match": current.etag} if current.etag else None
            progress(20, f"removing {port.handle}")
            try:
                started = self.api.request(
                    "PUT", f"/1.0/instances/{name}", op=op, json_body=body, headers=headers, cancel=cancel
                )
            except RetryableError as exc:
                if exc.remote_status == 412:  # changed since we read it: read again
                    continue
                raise
            self.api.wait(started, op=op, cancel=cancel)
            progress(100, "port mapping removed")
            return
        raise RetryableError(f"{op}: {name} kept changing while its device was being removed", op=op)

    def get_state(self, ref: dict[str, Any]) -> GuestState:
        op = "get state"
        name = self._name(ref)
        current = self._get(name, op=op)
        if current is None:
            return GuestState(exists=False, status=InstanceStatus.DELETED, ref=dict(ref))
        md = current.metadata or {}
        status = _STATUS.get(self._status(md), InstanceStatus.UNKNOWN)
        addresses: list[str] = []
        if status == InstanceStatus.RUNNING:
            try:
                state = self.api.request("GET", f"/1.0/instances/{name}/state", op=op).metadata or {}
            except NotFoundError:
                return GuestState(exists=False, status=InstanceStatus.DELETED, ref=dict(ref))
            addresses = _addresses(state)
        ports = [p for p in (_port_from_device(k, v) for k, v in (md.get("devices") or {}).items()) if p]
        return GuestState(
            exists=True,
            status=status,
            addresses=addresses,
            ref=self._ref(name, md.get("type", "")),
            ports=ports,
        )


def _addresses(state: dict[str, Any]) -> list[str]:
    """Global addresses of every interface but loopback, IPv4 first."""
    found: list[tuple[int, str]] = []
    for iface, net in (state.get("network") or {}).items():
        if iface == "lo" or not isinstance(net, dict):
            continue
        for addr in net.get("addresses") or []:
            if addr.get("scope") != "global" or not addr.get("address"):
                continue
            found.append((0 if addr.get("family") == "inet" else 1, str(addr["address"])))
    return [a for _, a in sorted(found, key=lambda x: x[0])]


def _port_from_device(name: str, device: dict[str, Any]) -> PortSpec | None:
    if not name.startswith(_PORT_DEVICE_PREFIX) or device.get("type") != "proxy":
        return None
    try:
        lproto, listen = str(device["listen"]).split(":", 1)
        lip, lports = listen.rsplit(":", 1)
        cports = str(device["connect"]).rsplit(":", 1)[1]
        hs, _, he = lports.partition("-")
        gs, _, ge = cports.partition("-")
        return PortSpec(
            protocol=lproto,
            host_port_start=int(hs),
            host_port_end=int(he or hs),
            guest_port_start=int(gs),
            guest_port_end=int(ge or gs),
            listen_ip=lip.strip("[]"),
        )
    except (KeyError, ValueError):
        return None


def _drain(ws: WebSocket, sink: bytearray, limit: int = 65536) -> None:
    """Read an output stream until the daemon closes it, keeping at most ``limit`` bytes."""
    try:
        while True:
            data = ws.recv_message()
            if data is None:
                return
            if len(sink) < limit:
                sink += data[: limit - len(sink)]
    except (OSError, ProviderError, OperationCancelled):
        return
