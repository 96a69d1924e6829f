"""Proxmox VE driver: qemu VMs and LXC containers over the PVE API (proxmoxer, API token).

Long work on PVE is a worker task named by a UPID. Every mutation returns one;
we poll ``/nodes/<node>/tasks/<upid>/status`` in slices of ``poll_interval``
seconds, so a cancel or a deadline is noticed within one slice. On cancel we
stop the remote task (``DELETE /nodes/<node>/tasks/<upid>``) and raise
OperationCancelled. A task succeeded when it stopped with exitstatus ``OK`` or
``WARNINGS: n`` (PVE::UPID::status_is_error).

Guests are found again by VMID *and* name: the VMID is reserved before the
create call (``reserve`` or inside ``create``) and travels in the ref, the name
(vps-<uuid>) proves the guest under that VMID is ours. Root passwords of VMs go
through cloud-init (and the guest agent when it runs); containers and NAT port
mappings have no API and go through the node's shell (providers.hostshell).

Connection settings (Provider.connection) and secrets: docs/providers-proxmox-docker.md.
"""

from __future__ import annotations

import logging
import math
import re
import weakref
from dataclasses import replace
from typing import Any

import requests

from providers import hostshell
from providers._http import PemFiles, PinnedAdapter, parse_fingerprint, transport_error
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

KIND_BY_TYPE = {"vm": "qemu", "container": "lxc"}
# "can't lock file '/var/lock/qemu-server/lock-100.conf' - got timeout", "VM is locked (backup)",
# "CT 100 is locked (create)": transient, another task holds the guest.
LOCK_RE = re.compile(r"can't lock file|is locked|got timeout", re.IGNORECASE)
# The guest itself is missing (not a storage or a volume named in the message).
GONE_RE = re.compile(r"Configuration file '[^']*' does not exist|\b(VM|CT) \d+ (does not exist|not found)")
NOT_RUNNING_RE = re.compile(r"not running", re.IGNORECASE)
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


# ------------------------------------------------------------------ driver


class ProxmoxDriver:
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
        weakref.finalize(self, self._pem.cleanup)

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

    # -- guests

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

    # -- addresses, host channel

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
        return self._shell

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
