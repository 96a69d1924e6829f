"""Finding, describing and reaching Proxmox guests: lookups by VMID and name, create
parameters, addresses, and the node's shell for container passwords and NAT.

``GuestLookup`` is a mixin of ProxmoxDriver; it uses ``_request`` (PVEApi) and the
driver's settings.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from providers import hostshell
from providers.base import (
    CancelToken,
    GuestSpec,
    NotFoundError,
    PermanentError,
    ProviderError,
    UnsupportedError,
)

logger = logging.getLogger(__name__)


KIND_BY_TYPE = {"vm": "qemu", "container": "lxc"}


class GuestLookup:
    def _kind(self, instance_type: str) -> str:
        try:
            return KIND_BY_TYPE[instance_type]
        except KeyError:
            raise UnsupportedError(f"proxmox: unknown instance type {instance_type!r}", op="create") from None

    def _path(self, ref: dict[str, Any]) -> str:
        return f"nodes/{ref.get('node') or self.node}/{ref['type']}/{ref['vmid']}"

    @staticmethod
    def _name_of(kind: str, conf: dict) -> str | None:
        return conf.get("name") if kind == "qemu" else conf.get("hostname", conf.get("name"))

    def _ref(self, kind: str, vmid: int, name: str) -> dict[str, Any]:
        return {"node": self.node, "type": kind, "vmid": int(vmid), "name": name}

    def _config(self, kind: str, vmid: Any, op: str) -> dict | None:
        try:
            return self._request("get", f"nodes/{self.node}/{kind}/{vmid}/config", op) or {}
        except NotFoundError:
            return None

    def _find(self, kind: str, name: str, vmid: Any, op: str) -> tuple[int, dict] | None:
        """Our guest: under the reserved VMID if its name matches, else by name on the node."""
        if vmid:
            conf = self._config(kind, vmid, op)
            if conf is not None and self._name_of(kind, conf) == name:
                return int(vmid), conf
        for entry in self._request("get", f"nodes/{self.node}/{kind}", op) or []:
            if entry.get("name") == name:
                conf = self._config(kind, entry["vmid"], op)
                if conf is not None and self._name_of(kind, conf) == name:
                    return int(entry["vmid"]), conf
        return None

    def _status(self, ref: dict[str, Any], op: str, cancel: CancelToken | None = None) -> dict | None:
        """status/current of our guest, or None when it (or at least ours under that VMID) is gone."""
        try:
            st = self._request("get", f"{self._path(ref)}/status/current", op, cancel=cancel)
        except NotFoundError:
            return None
        if ref.get("name") and st.get("name") and st["name"] != ref["name"]:
            logger.warning(
                "proxmox %s: vmid %s now holds %s, not %s", self.config.name, ref["vmid"], st["name"], ref["name"]
            )
            return None
        return st

    def _resolve(self, ref: dict[str, Any], op: str) -> dict[str, Any] | None:
        """A ref with node, type and vmid; a name-only ref (create stopped early) is looked up."""
        if not ref:
            return None
        if ref.get("vmid") and ref.get("type"):
            return ref
        if not ref.get("name"):
            return None
        for kind in [ref["type"]] if ref.get("type") else ["lxc", "qemu"]:
            found = self._find(kind, ref["name"], ref.get("vmid"), op)
            if found:
                return {**ref, **self._ref(kind, found[0], ref["name"])}
        return None

    def _need(self, ref: dict[str, Any], op: str) -> dict[str, Any]:
        resolved = self._resolve(ref, op)
        if resolved is None:
            raise NotFoundError(f"{op}: guest {ref.get('name')} does not exist", op=op)
        return resolved

    def _need_status(self, ref: dict[str, Any], op: str, cancel: CancelToken) -> dict:
        st = self._status(ref, op, cancel)
        if st is None:
            raise NotFoundError(f"{op}: guest {ref.get('name')} (vmid {ref.get('vmid')}) does not exist", op=op)
        return st

    def _image(self, kind: str, image: str) -> str:
        entry = self.images.get(image)
        if isinstance(entry, dict):
            entry = entry.get(kind)
        if isinstance(entry, str) and entry:
            return entry
        if entry is None and ":" in image:
            return image  # already a PVE volume id / template reference
        raise PermanentError(f"create: image {image!r} has no {kind} template on this provider", op="create")

    def reserve(self, spec: GuestSpec) -> dict[str, Any]:
        """The ref a create will use: our existing guest's, or a fresh VMID from /cluster/nextid.

        The create operation may persist it before calling create, so a retry after
        a crash reuses the VMID instead of allocating a second one.
        """
        kind = self._kind(spec.instance_type)
        found = self._find(kind, spec.name, spec.ref.get("vmid"), "reserve")
        if found:
            return self._ref(kind, found[0], spec.name)
        return self._ref(kind, self._usable_vmid(spec.ref.get("vmid"), "reserve"), spec.name)

    def _usable_vmid(self, vmid: Any, op: str) -> int:
        if vmid:
            try:
                return int(self._request("get", "cluster/nextid", op, vmid=int(vmid)))
            except PermanentError as exc:
                logger.info(
                    "proxmox %s: reserved vmid %s is taken (%s); allocating another", self.config.name, vmid, exc
                )
        return int(self._request("get", "cluster/nextid", op))

    def _create_params(self, kind: str, spec: GuestSpec, vmid: int, net0: str | None) -> dict[str, Any]:
        disk_gib = max(1, math.ceil(spec.disk_mb / 1024))
        rate = f",rate={spec.bandwidth_mbps / 8:g}" if spec.bandwidth_mbps else ""
        labels = "".join(f"\n{k}={v}" for k, v in sorted(spec.labels.items()))
        common = {
            "vmid": vmid,
            "cores": spec.cpu,
            "memory": spec.memory_mb,
            "tags": self.tag,
            "description": f"managed by cloudhost: {spec.name}{labels}",
        }
        conn = self.config.connection
        if kind == "lxc":
            return {
                **common,
                "hostname": spec.name,
                "ostemplate": self._image(kind, spec.image),
                "swap": 0,
                "rootfs": f"{self.storage}:{disk_gib}",
                "net0": net0 or f"name=eth0,bridge={self.bridge},ip={conn.get('lxc_ip', 'dhcp')}{rate}",
                "unprivileged": 1,
                "features": "nesting=1",
            }
        return {
            **common,
            "name": spec.name,
            "scsihw": "virtio-scsi-single",
            "ide2": f"{self.storage}:cloudinit",
            "boot": "order=scsi0",
            "net0": net0 or f"virtio,bridge={self.bridge}{rate}",
            "agent": 1,
            "ostype": "l26",
            "serial0": "socket",
            "ciuser": "root",
            "ipconfig0": conn.get("ipconfig0", "ip=dhcp"),
        }

    def _addresses(self, ref: dict[str, Any], op: str) -> list[str]:
        """Global addresses: live ones from the guest (lxc interfaces / qemu agent), else the static config."""
        found: list[str] = []
        try:
            if ref["type"] == "lxc":
                for iface in self._request("get", f"{self._path(ref)}/interfaces", op) or []:
                    if iface.get("name") == "lo":
                        continue
                    for key in ("inet", "inet6"):
                        if iface.get(key):
                            found.append(str(iface[key]).split("/")[0])
            else:
                result = self._request("get", f"{self._path(ref)}/agent/network-get-interfaces", op) or {}
                for iface in result.get("result", []):
                    if iface.get("name") == "lo":
                        continue
                    for addr in iface.get("ip-addresses", []):
                        found.append(str(addr.get("ip-address", "")))
        except ProviderError as exc:
            logger.debug("proxmox %s: live addresses of vmid %s unavailable: %s", self.config.name, ref["vmid"], exc)
        found = [a for a in found if a and not a.startswith(("127.", "fe80", "::1"))]
        if found:
            return found
        conf = self._config(ref["type"], ref["vmid"], op) or {}
        static = conf.get("ipconfig0", "") if ref["type"] == "qemu" else conf.get("net0", "")
        match = re.search(r"(?:^|,)ip=([0-9.]+)/", str(static))
        return [match.group(1)] if match else []

    def host_channel(self) -> hostshell.HostShell | None:
        """The node's shell (connection.ssh), for host-side work such as traffic counters."""
        return self._get_shell()

    def _get_shell(self) -> hostshell.HostShell | None:
        if not self._shell_built:
            self._shell = hostshell.from_config(self.config.connection, self.config.secrets)
            self._shell_built = True
            if self._shell is not None and hasattr(self._shell, "close"):
                self._closers.append(self._shell.close)
        return self._shell

    def close(self) -> None:
        """Release the node's SSH connection and temporary files (also done when the driver is collected)."""
        hostshell.close_all(self._closers)

    def _nat(self, cancel: CancelToken | None = None) -> hostshell.IptablesNat:
        shell = self._get_shell()
        if shell is None:
            raise UnsupportedError("port mappings on Proxmox need connection.ssh (iptables on the node)", op="nat")
        nat = self.config.connection.get("nat", {}) or {}
        return hostshell.IptablesNat(
            shell,
            forward_accept=bool(nat.get("forward_accept", True)),
            save_command=nat.get("save_command"),
            cancel=cancel,
        )
