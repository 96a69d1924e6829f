"""The LXD driver (and, with the INCUS flavour, the Incus driver): see providers/lxd/__init__.py."""

from __future__ import annotations

import logging
import re
from typing import Any

from providers.base import (
    AuthError,
    CancelToken,
    Capabilities,
    ConflictError,
    GuestSpec,
    GuestState,
    NotFoundError,
    PermanentError,
    PortSpec,
    ProgressCallback,
    ProviderConfig,
    RetryableError,
    ServerInfo,
)
from providers.lxd.client import APIResponse, LXDClient
from providers.lxd.devices import PORT_DEVICE_PREFIX, global_addresses, port_from_device, proxy_device
from providers.lxd.exec import exec_with_stdin
from providers.lxd.transport import LXD, Flavour
from tasks.engine.states import InstanceStatus

logger = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9-]{0,62}$")
_LABEL_RE = re.compile(r"[^a-z0-9._-]")
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
            if k.startswith(PORT_DEVICE_PREFIX) and v.get("type") == "proxy"
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
        result = exec_with_stdin(self.api, name, ["chpasswd"], f"root:{password}\n".encode(), op=op, cancel=cancel)
        if result.exit_code != 0:
            err = result.stderr.decode("utf-8", "replace").replace(password, "***").strip()[:300]
            raise PermanentError(f"{op}: chpasswd exited with {result.exit_code}: {err or 'no message'}", op=op)
        progress(100, "password set")

    def add_port(self, ref: dict[str, Any], port: PortSpec, cancel: CancelToken, progress: ProgressCallback) -> None:
        op = "add port"
        name = self._name(ref)
        current = self._require(name, op=op)
        device = proxy_device(port, current.metadata.get("type", ""), self.config.connection.get("nat_listen_address"))
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
            addresses = global_addresses(state)
        ports = [p for p in (port_from_device(k, v) for k, v in (md.get("devices") or {}).items()) if p]
        return GuestState(
            exists=True,
            status=status,
            addresses=addresses,
            ref=self._ref(name, md.get("type", "")),
            ports=ports,
        )
