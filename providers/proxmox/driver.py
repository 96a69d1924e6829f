"""The Proxmox VE driver's operations (the Driver protocol of providers.base).

The model (UPID tasks, VMID + name identity, host shell) is in the package docstring.
"""

from __future__ import annotations

import logging
import math
import re
import weakref
from dataclasses import replace
from typing import Any

from providers import hostshell
from providers._http import PemFiles
from providers.base import (
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
    ProviderError,
    RetryableError,
    ServerInfo,
    UnsupportedError,
)
from providers.proxmox.api import PVEApi
from providers.proxmox.guests import GuestLookup
from tasks.engine.states import InstanceStatus

logger = logging.getLogger(__name__)


NOT_RUNNING_RE = re.compile(r"not running", re.IGNORECASE)


class ProxmoxDriver(PVEApi, GuestLookup):
    def __init__(self, config: ProviderConfig, *, shell: hostshell.HostShell | None = None):
        self.config = config
        conn = config.connection
        for key in ("host", "node"):
            if not conn.get(key):
                raise PermanentError(f"proxmox: connection.{key} is required", op="config")
        self.node = conn["node"]
        self.storage = conn.get("storage", "local-lvm")
        self.bridge = conn.get("bridge", "vmbr0")
        self.tag = conn.get("tag", "cloudhost")
        self.poll_interval = float(conn.get("poll_interval", 1.0))
        self.request_timeout = float(conn.get("timeout", 30))
        self.images: dict[str, Any] = conn.get("images", {}) or {}
        self._shell = shell
        self._shell_built = shell is not None
        self._pem = PemFiles("cloudhost-pve-")
        self._api = self._connect(conn, config.secrets)
        # What to release when the driver goes (it lives for one task): the node's SSH
        # connection and the private PEM files. finalize must not hold self.
        self._closers: list = [self._pem.cleanup]
        weakref.finalize(self, hostshell.close_all, self._closers)

    # -- Driver protocol

    def server_info(self) -> ServerInfo:
        version = self._request("get", "version", "server_info") or {}
        nodes = [n.get("node") for n in self._request("get", "nodes", "server_info") or []]
        if self.node not in nodes:
            raise PermanentError(f"proxmox: node {self.node!r} not found (nodes: {', '.join(map(str, nodes))})")
        return ServerInfo(
            version=str(version.get("version", "")),
            details={
                "release": version.get("release"),
                "repoid": version.get("repoid"),
                "node": self.node,
                "nodes": nodes,
            },
        )

    def capabilities(self) -> Capabilities:
        has_shell = bool(self._shell or self.config.connection.get("ssh"))
        return Capabilities(
            instance_types=("container", "vm"),
            live_port_mapping=has_shell,
            password_methods=("cloud-init", "guest-agent") + (("ssh",) if has_shell else ()),
            native_rebuild=False,
            remote_cancel=True,
        )

    def create(self, spec: GuestSpec, cancel: CancelToken, progress: ProgressCallback) -> dict[str, Any]:
        return self._create(spec, cancel, progress)

    def _create(
        self, spec: GuestSpec, cancel: CancelToken, progress: ProgressCallback, net0: str | None = None
    ) -> dict[str, Any]:
        op = "create"
        kind = self._kind(spec.instance_type)
        progress(2, "looking for an existing guest")
        found = self._find(kind, spec.name, spec.ref.get("vmid"), op)
        if found:
            vmid, conf = found
            if conf.get("lock") in ("create", "clone"):
                upid = self._active_task(vmid, op)
                if not upid:
                    raise PermanentError(
                        f"create: guest {spec.name} (vmid {vmid}) is half-created (lock {conf['lock']}) and no task "
                        "is finishing it; remove it on the node",
                        op=op,
                    )
                self._wait(upid, cancel, progress, op, 10, 80, f"finishing the creation of {kind} {vmid}")
            progress(90, f"{kind} {vmid} exists")
            return self._ref(kind, vmid, spec.name)
        vmid = self._usable_vmid(spec.ref.get("vmid"), op)
        cancel.raise_if_cancelled()
        params = self._create_params(kind, spec, vmid, net0)
        image = params.pop("ostemplate", None) if kind == "lxc" else self._image(kind, spec.image)
        progress(5, f"creating {kind} {vmid}")
        if kind == "lxc":
            upid = self._post_create(f"nodes/{self.node}/lxc", op, ostemplate=image, **params)
            self._wait(upid, cancel, progress, op, 5, 85, f"{kind} {vmid} created")
        elif image.startswith("template:"):
            template = image.removeprefix("template:")
            upid = self._post_create(
                f"nodes/{self.node}/qemu/{template}/clone",
                op,
                newid=vmid,
                name=spec.name,
                full=1,
                storage=self.storage,
            )
            self._wait(upid, cancel, progress, op, 5, 70, f"vm {vmid} cloned")
            conf = {k: v for k, v in params.items() if k not in ("vmid", "name", "scsihw", "ide2", "boot")}
            self._request("put", f"nodes/{self.node}/qemu/{vmid}/config", op, mutation=True, **conf)
            self._resize(vmid, spec, cancel, progress, op)
        else:
            params["scsi0"] = f"{self.storage}:0,import-from={image}"
            upid = self._post_create(f"nodes/{self.node}/qemu", op, **params)
            self._wait(upid, cancel, progress, op, 5, 75, f"vm {vmid} created")
            self._resize(vmid, spec, cancel, progress, op)
        progress(90, f"{kind} {vmid} created")
        return self._ref(kind, vmid, spec.name)

    def _post_create(self, path: str, op: str, **params: Any) -> Any:
        vmid = params.get("vmid", params.get("newid"))
        try:
            return self._request("post", path, op, mutation=True, creating=True, **params)
        except ConflictError as exc:
            # Someone took the VMID between nextid and our POST: the next attempt reserves another.
            raise RetryableError(f"create: vmid {vmid} was taken meanwhile ({exc.remote_message})", op=op) from exc

    def _resize(self, vmid: int, spec: GuestSpec, cancel: CancelToken, progress: ProgressCallback, op: str) -> None:
        size = f"{max(1, math.ceil(spec.disk_mb / 1024))}G"
        try:
            upid = self._request(
                "put", f"nodes/{self.node}/qemu/{vmid}/resize", op, mutation=True, disk="scsi0", size=size
            )
        except PermanentError as exc:
            if "shrink" in exc.remote_message.lower():
                logger.warning("proxmox %s: image of vm %s is larger than %s; kept as is", self.config.name, vmid, size)
                return
            raise
        self._wait(upid, cancel, progress, op, 80, 88, f"disk of vm {vmid} resized to {size}")

    def start(self, ref: dict[str, Any], cancel: CancelToken, progress: ProgressCallback) -> None:
        op = "start"
        ref = self._need(ref, op)
        if self._need_status(ref, op, cancel).get("status") == "running":
            progress(100, "already running")
            return
        upid = self._request("post", f"{self._path(ref)}/status/start", op, mutation=True)
        try:
            self._wait(upid, cancel, progress, op, 10, 100, "running")
        except PermanentError:
            if (self._status(ref, op) or {}).get("status") == "running":
                return
            raise

    def stop(
        self, ref: dict[str, Any], cancel: CancelToken, progress: ProgressCallback, graceful_timeout: int = 30
    ) -> None:
        op = "stop"
        ref = self._need(ref, op)
        if self._need_status(ref, op, cancel).get("status") == "stopped":
            progress(100, "already stopped")
            return
        # One task: ACPI/init shutdown, then a hard stop after the timeout (forceStop).
        upid = self._request(
            "post",
            f"{self._path(ref)}/status/shutdown",
            op,
            mutation=True,
            timeout=int(graceful_timeout),
            forceStop=1,
        )
        try:
            self._wait(upid, cancel, progress, op, 10, 90, "shut down")
        except PermanentError:
            if (self._status(ref, op) or {}).get("status") == "stopped":
                return
            raise
        if (self._status(ref, op) or {}).get("status") == "running":
            self._hard_stop(ref, cancel, progress, op)

    def _hard_stop(self, ref: dict[str, Any], cancel: CancelToken, progress: ProgressCallback, op: str) -> None:
        upid = self._request("post", f"{self._path(ref)}/status/stop", op, mutation=True)
        self._wait(upid, cancel, progress, op, 20, 40, "stopped")

    def restart(self, ref: dict[str, Any], cancel: CancelToken, progress: ProgressCallback) -> None:
        op = "restart"
        ref = self._need(ref, op)
        if self._need_status(ref, op, cancel).get("status") != "running":
            self.start(ref, cancel, progress)
            return
        upid = self._request("post", f"{self._path(ref)}/status/reboot", op, mutation=True)
        self._wait(upid, cancel, progress, op, 10, 100, "restarted")

    def delete(self, ref: dict[str, Any], cancel: CancelToken, progress: ProgressCallback) -> None:
        op = "delete"
        resolved = self._resolve(ref, op)
        if resolved is None:
            progress(100, "already gone")
            return
        ref = resolved
        st = self._status(ref, op, cancel)
        if st is None:
            progress(100, "already gone")
            return
        addresses = self._addresses(ref, op) if st.get("status") == "running" and self._get_shell() else []
        if st.get("status") == "running":
            self._hard_stop(ref, cancel, progress, op)
        params = {"purge": 1, "destroy-unreferenced-disks": 1} if ref["type"] == "qemu" else {"purge": 1, "force": 1}
        try:
            upid = self._request("delete", self._path(ref), op, mutation=True, **params)
            self._wait(upid, cancel, progress, op, 50, 95, "destroyed")
        except NotFoundError:
            pass
        if self._status(ref, op) is not None:
            raise PermanentError(f"delete: guest {ref.get('name')} (vmid {ref['vmid']}) still exists", op=op)
        if addresses:
            try:
                removed = self._nat().remove_for_addresses(addresses)
                if removed:
                    logger.info("proxmox %s: removed %d NAT rules of vmid %s", self.config.name, removed, ref["vmid"])
            except ProviderError as exc:
                logger.warning("proxmox %s: NAT rules of vmid %s not removed: %s", self.config.name, ref["vmid"], exc)
        progress(100, "deleted")

    def rebuild(self, ref: dict[str, Any], spec: GuestSpec, cancel: CancelToken, progress: ProgressCallback) -> dict:
        """Destroy and recreate under the same VMID and MAC address (so DHCP hands out the same IP)."""
        op = "rebuild"
        resolved = self._resolve(ref, op)
        st = self._status(resolved, op, cancel) if resolved else None
        ref = resolved or {**ref, "type": self._kind(spec.instance_type)}
        self._image(ref["type"], spec.image)  # an unknown image must fail before anything is destroyed
        net0 = None
        start_after = True
        if st is not None:
            start_after = st.get("status") == "running"
            net0 = (self._config(ref["type"], ref["vmid"], op) or {}).get("net0")
            if st.get("status") == "running":
                self._hard_stop(ref, cancel, progress, op)
            progress(25, "destroying the old guest")
            params = {"purge": 1} if ref["type"] == "qemu" else {"purge": 1, "force": 1}
            upid = self._request("delete", self._path(ref), op, mutation=True, **params)
            self._wait(upid, cancel, progress, op, 25, 40, "old guest destroyed")
        cancel.raise_if_cancelled()
        spec = replace(spec, name=ref.get("name") or spec.name, ref={**spec.ref, "vmid": ref.get("vmid")})
        new_ref = self._create(spec, cancel, lambda p, m: progress(40 + p * 45 // 100, m), net0=net0)
        if start_after:
            self.start(new_ref, cancel, lambda p, m: progress(85 + p * 15 // 100, m))
        progress(100, "rebuilt")
        return new_ref

    def set_password(self, ref: dict[str, Any], password: str, cancel: CancelToken, progress: ProgressCallback) -> None:
        op = "set_password"
        if "\n" in password or not password:
            raise PermanentError("set_password: the password must be one non-empty line", op=op)
        ref = self._need(ref, op)
        st = self._need_status(ref, op, cancel)
        if ref["type"] == "lxc":
            if st.get("status") != "running":
                raise ConflictError("set_password: the container must be running", op=op)
            shell = self._get_shell()
            if shell is None:
                raise UnsupportedError("set_password: containers need connection.ssh (pct exec on the node)", op=op)
            progress(30, "setting the password with pct exec")
            cancel.raise_if_cancelled()
            remaining = cancel.remaining()
            rc, out, err = shell.run(
                ["pct", "exec", str(ref["vmid"]), "--", "chpasswd"],
                stdin=f"root:{password}\n",
                timeout=60 if remaining is None else max(1.0, min(60, remaining)),
            )
            if rc != 0:
                message = (err or out).strip()[:500]
                if NOT_RUNNING_RE.search(message):
                    raise ConflictError(f"set_password: {message}", op=op, remote_message=message)
                raise PermanentError(
                    f"set_password: chpasswd failed (rc {rc}): {message}", op=op, remote_message=message
                )
            progress(100, "password set")
            return
        # VM: cloud-init keeps it across reinstalls of the config drive; the agent applies it now.
        path = self._path(ref)
        progress(20, "storing the password in cloud-init")
        self._request("put", f"{path}/config", op, mutation=True, cipassword=password)
        try:
            self._request("put", f"{path}/cloudinit", op, mutation=True)
        except UnsupportedError:
            pass  # PVE < 8 regenerates the drive at the next start
        if st.get("status") != "running":
            progress(100, "password set (applies at the next start)")
            return
        progress(50, "applying the password through the guest agent")
        try:
            self._request(
                "post", f"{path}/agent/set-user-password", op, mutation=True, username="root", password=password
            )
            progress(100, "password set")
            return
        except (PermanentError, RetryableError) as exc:
            if not self.config.connection.get("password_reboot", True):
                raise
            logger.info(
                "proxmox %s: guest agent of vmid %s unavailable (%s); rebooting", self.config.name, ref["vmid"], exc.op
            )
        upid = self._request("post", f"{path}/status/reboot", op, mutation=True)
        self._wait(upid, cancel, progress, op, 60, 100, "rebooted with the new password")

    def add_port(self, ref: dict[str, Any], port: PortSpec, cancel: CancelToken, progress: ProgressCallback) -> None:
        op = "add_port"
        nat = self._nat(cancel)
        ref = self._need(ref, op)
        self._need_status(ref, op, cancel)
        ipv4 = [a for a in self._addresses(ref, op) if ":" not in a]
        if not ipv4:
            raise RetryableError(f"add_port: guest {ref.get('name')} has no IPv4 address yet", op=op)
        cancel.raise_if_cancelled()
        nat.ensure(port, ipv4[0])
        progress(100, f"{port.handle} -> {ipv4[0]}")

    def remove_port(self, ref: dict[str, Any], port: PortSpec, cancel: CancelToken, progress: ProgressCallback) -> None:
        self._nat(cancel).remove(port.handle)
        progress(100, f"{port.handle} removed")

    def get_state(self, ref: dict[str, Any]) -> GuestState:
        resolved = self._resolve(ref, "get_state")
        if resolved is None:
            return GuestState(exists=False, status=InstanceStatus.UNKNOWN, ref=ref or {})
        ref = resolved
        st = self._status(ref, "get_state")
        if st is None:
            return GuestState(exists=False, status=InstanceStatus.UNKNOWN, ref=ref)
        status = {"running": InstanceStatus.RUNNING, "stopped": InstanceStatus.STOPPED}.get(
            st.get("status"), InstanceStatus.UNKNOWN
        )
        if st.get("lock") in ("create", "clone"):
            status = InstanceStatus.CREATING
        addresses = self._addresses(ref, "get_state") if status == InstanceStatus.RUNNING else []
        return GuestState(exists=True, status=status, addresses=addresses, ref=ref)
