"""An in-process Proxmox VE API: a stateful werkzeug app served over TLS on 127.0.0.1.

Faithful where the driver depends on it: token header, form parameters, errors
carried in the HTTP reason phrase, UPID tasks (with the trailing colon) polled
through /tasks/<upid>/status, "received interrupt" when a task is stopped,
config locks, 501 for unknown paths. Knobs: fail the next N calls, task
duration, tasks that hang until stopped, tasks that end with an error,
requests that hang.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response


class QuietHandler(WSGIRequestHandler):
    def setup(self) -> None:
        super().setup()
        if self.connection.family in (socket.AF_INET, socket.AF_INET6):
            # Headers and body leave in separate writes: without this, Nagle and the
            # client's delayed ACK add milliseconds to every call.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log(self, type: str, message: str, *args: Any) -> None:
        pass


class ServerThread:
    """A werkzeug server on its own daemon thread (TCP, TLS or unix://)."""

    def __init__(self, app, host: str, port: int = 0, ssl_context: ssl.SSLContext | None = None):
        self.server = make_server(host, port, app, threaded=True, ssl_context=ssl_context, request_handler=QuietHandler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server.socket.getsockname()[1]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class PVEError(Exception):
    def __init__(self, status: int, message: str, errors: dict | None = None):
        self.status, self.message, self.errors = status, message, errors


@dataclass
class Guest:
    vmid: int
    kind: str  # qemu | lxc
    config: dict[str, Any]
    status: str = "stopped"
    template: bool = False
    ignore_acpi: bool = False
    disk_gib: int = 2
    agent_password: str | None = None

    @property
    def name(self) -> str:
        return self.config.get("name") or self.config.get("hostname", "")

    @property
    def ip(self) -> str:
        return f"10.10.{self.vmid // 250}.{self.vmid % 250 + 2}"


@dataclass
class Task:
    upid: str
    kind: str  # qmcreate, vzstart ...
    vmid: int | None
    started: float
    duration: float
    hang: bool = False
    fail_with: str = ""
    on_ok: Any = None
    on_end_bad: Any = None
    status: str = "running"
    exitstatus: str = ""
    log: list[str] = field(default_factory=list)


@dataclass
class Fault:
    count: int
    status: int
    message: str
    method: str | None = None
    path: str | None = None  # regex searched in the path after /api2/json/


class FakePVE:
    def __init__(self, node: str = "pve1", token: str = "root@pam!panel=0b5d9f0e-secret"):
        self.node = node
        self.token = token
        self.user = token.split("=", 1)[0]
        self.lock = threading.RLock()
        self.guests: dict[int, Guest] = {}
        self.tasks: dict[str, Task] = {}
        self.faults: list[Fault] = []
        self.calls: list[tuple[str, str, dict]] = []
        self.volumes = {"local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst", "local:import/debian-12-generic.qcow2"}
        self.storages = {"local", "local-lvm"}
        self.task_duration = 0.0
        self.hang_tasks: set[str] = set()  # task kinds (qmcreate, vzstop ...) that run until stopped
        self.fail_tasks: dict[str, str] = {}  # task kind -> exitstatus
        self.agent_running = True
        self.hang_paths: list[str] = []  # regexes on "METHOD path": those requests block until release()
        self._released = threading.Event()
        self._pid = 0x1000

    # -- knobs

    def fail_next(self, count: int, status: int, message: str, method: str | None = None, path: str | None = None):
        with self.lock:
            self.faults.append(Fault(count, status, message, method, path))

    def release(self) -> None:
        self._released.set()

    def add_template(self, vmid: int = 9000, name: str = "debian-12-tmpl") -> Guest:
        guest = Guest(vmid, "qemu", {"name": name, "template": 1, "cores": 1, "memory": 512}, template=True)
        self.guests[vmid] = guest
        return guest

    def calls_to(self, method: str, pattern: str) -> list[dict]:
        return [params for m, path, params in self.calls if m == method and re.search(pattern, path)]

    # -- tasks

    def _new_task(self, kind: str, vmid: int | None, on_ok=None, on_end_bad=None, duration: float | None = None) -> str:
        self._pid += 1
        now = int(time.time())
        upid = f"UPID:{self.node}:{self._pid:08X}:{self._pid * 7:08X}:{now:08X}:{kind}:{vmid or ''}:{self.user}:"
        task = Task(
            upid,
            kind,
            vmid,
            time.monotonic(),
            self.task_duration if duration is None else duration,
            hang=kind in self.hang_tasks,
            fail_with=self.fail_tasks.get(kind, ""),
            on_ok=on_ok,
            on_end_bad=on_end_bad,
        )
        task.log.append(f"starting {kind} {vmid}")
        self.tasks[upid] = task
        self._tick(task)
        return upid

    def _tick(self, task: Task) -> None:
        if task.status != "running" or task.hang:
            if task.status == "running" and task.hang and len(task.log) < 3:
                task.log.append("transferred 1.0 GiB of 4.0 GiB (25.00%)")
            return
        if time.monotonic() - task.started < task.duration:
            return
        task.status = "stopped"
        if task.fail_with:
            task.exitstatus = task.fail_with
            task.log.append(f"TASK ERROR: {task.fail_with}")
            if task.on_end_bad:
                task.on_end_bad()
        else:
            task.log.append("transferred 4.0 GiB of 4.0 GiB (100.00%)")
            task.exitstatus = "OK"
            task.log.append("TASK OK")
            if task.on_ok:
                task.on_ok()

    def _tick_all(self) -> None:
        for task in list(self.tasks.values()):
            self._tick(task)

    # -- WSGI

    def __call__(self, environ, start_response):
        request = Request(environ)
        response = self._dispatch(request)
        return response(environ, start_response)

    def _dispatch(self, request: Request) -> Response:
        prefix = "/api2/json/"
        path = request.path[len(prefix) :] if request.path.startswith(prefix) else request.path
        params = dict(request.args.items()) if request.method in ("GET", "DELETE") else dict(request.form.items())
        if request.headers.get("Authorization") != f"PVEAPIToken={self.token}":
            return self._error(PVEError(401, "authentication failure"))
        with self.lock:
            self.calls.append((request.method, path, params))
            hang = any(re.search(p, f"{request.method} {path}") for p in self.hang_paths)
        if hang:
            self._released.wait(10)
        with self.lock:
            for fault in self.faults:
                if fault.count > 0 and (fault.method in (None, request.method)):
                    if fault.path is None or re.search(fault.path, path):
                        fault.count -= 1
                        return self._error(PVEError(fault.status, fault.message))
            self._tick_all()
            try:
                data = self._route(request.method, path, params)
            except PVEError as exc:
                return self._error(exc)
        return Response(json.dumps({"data": data}), content_type="application/json;charset=UTF-8")

    def _error(self, exc: PVEError) -> Response:
        body: dict[str, Any] = {"data": None, "message": exc.message}
        if exc.errors:
            body["errors"] = exc.errors
        return Response(json.dumps(body), status=f"{exc.status} {exc.message}", content_type="application/json")

    def _guest(self, kind: str, vmid: str) -> Guest:
        guest = self.guests.get(int(vmid))
        if guest is None or guest.kind != kind:
            folder = "qemu-server" if kind == "qemu" else "lxc"
            raise PVEError(500, f"Configuration file 'nodes/{self.node}/{folder}/{vmid}.conf' does not exist")
        return guest

    def _check_lock(self, guest: Guest) -> None:
        lock = guest.config.get("lock")
        if lock:
            raise PVEError(
                500, f"VM is locked ({lock})" if guest.kind == "qemu" else f"CT {guest.vmid} is locked ({lock})"
            )

    def _route(self, method: str, path: str, p: dict) -> Any:
        node = self.node
        if (method, path) == ("GET", "version"):
            return {"version": "8.2.4", "release": "8.2", "repoid": "faa83925c9641325"}
        if (method, path) == ("GET", "nodes"):
            return [{"node": node, "status": "online"}]
        if (method, path) == ("GET", "cluster/nextid"):
            if "vmid" in p:
                vmid = int(p["vmid"])
                if vmid in self.guests:
                    raise PVEError(400, f"VM {vmid} already exists", {"vmid": f"VM {vmid} already exists"})
                return str(vmid)
            vmid = 100
            while vmid in self.guests:
                vmid += 1
            return str(vmid)
        m = re.fullmatch(rf"nodes/{node}/tasks", path)
        if m and method == "GET":
            return [
                {"upid": t.upid, "type": t.kind, "id": str(t.vmid or ""), "status": None}
                for t in self.tasks.values()
                if t.status == "running" and (not p.get("vmid") or str(t.vmid) == str(p["vmid"]))
            ]
        m = re.fullmatch(rf"nodes/{node}/tasks/(UPID:[^/]+:)(/status|/log)?", path)
        if m:
            task = self.tasks.get(m.group(1))
            if task is None:
                raise PVEError(500, "no such task")
            if method == "DELETE" and not m.group(2):
                if task.status == "running":
                    task.status, task.exitstatus = "stopped", "received interrupt"
                    task.log.append("received interrupt")
                    if task.on_end_bad:
                        task.on_end_bad()
                return None
            if method == "GET" and m.group(2) == "/status":
                out = {"upid": task.upid, "type": task.kind, "status": task.status, "node": node, "user": self.user}
                if task.status == "stopped":
                    out["exitstatus"] = task.exitstatus
                return out
            if method == "GET" and m.group(2) == "/log":
                start = int(p.get("start", 0))
                return [{"n": i + 1, "t": t} for i, t in enumerate(task.log) if i + 1 > start]
        m = re.fullmatch(rf"nodes/{node}/(qemu|lxc)", path)
        if m:
            kind = m.group(1)
            if method == "GET":
                return [
                    {"vmid": g.vmid, "name": g.name, "status": g.status, "tags": g.config.get("tags", "")}
                    for g in self.guests.values()
                    if g.kind == kind
                ]
            if method == "POST":
                return self._create(kind, p)
        m = re.fullmatch(rf"nodes/{node}/qemu/(\d+)/clone", path)
        if m and method == "POST":
            return self._clone(int(m.group(1)), p)
        m = re.fullmatch(rf"nodes/{node}/(qemu|lxc)/(\d+)(/.*)?", path)
        if m:
            return self._guest_route(method, m.group(1), m.group(2), m.group(3) or "", p)
        raise PVEError(501, f"Method '{method} /{path}' not implemented")

    def _create(self, kind: str, p: dict) -> str:
        if "vmid" not in p:
            raise PVEError(
                400, "Parameter verification failed.", {"vmid": "property is missing and it is not optional"}
            )
        vmid = int(p["vmid"])
        if vmid in self.guests:
            raise PVEError(500, f"unable to create VM {vmid} - VM {vmid} already exists on node '{self.node}'")
        if kind == "lxc":
            if p.get("ostemplate") not in self.volumes:
                raise PVEError(500, f"unable to create CT {vmid} - volume '{p.get('ostemplate')}' does not exist")
            storage = p.get("rootfs", "").split(":")[0]
        else:
            source = re.search(r"import-from=([^,]+)", p.get("scsi0", ""))
            if source and source.group(1) not in self.volumes:
                raise PVEError(500, f"unable to create VM {vmid} - volume '{source.group(1)}' does not exist")
            storage = p.get("scsi0", "").split(":")[0]
        if storage not in self.storages:
            raise PVEError(500, f"unable to create VM {vmid} - storage '{storage}' does not exist")
        config = {k: v for k, v in p.items() if k not in ("vmid", "ostemplate", "password", "cipassword")}
        config["lock"] = "create"
        guest = Guest(vmid, kind, config)
        self.guests[vmid] = guest

        def done():
            guest.config.pop("lock", None)

        def undo():  # PVE destroys a guest whose create failed or was interrupted
            self.guests.pop(vmid, None)

        return self._new_task("qmcreate" if kind == "qemu" else "vzcreate", vmid, done, undo)

    def _clone(self, source: int, p: dict) -> str:
        template = self._guest("qemu", str(source))
        vmid = int(p["newid"])
        if vmid in self.guests:
            raise PVEError(500, f"unable to create VM {vmid} - VM {vmid} already exists on node '{self.node}'")
        config = {k: v for k, v in template.config.items() if k != "template"}
        config.update({"name": p.get("name", f"Copy-of-VM-{template.name}"), "lock": "clone"})
        guest = Guest(vmid, "qemu", config, disk_gib=template.disk_gib)
        self.guests[vmid] = guest
        return self._new_task(
            "qmclone", vmid, lambda: guest.config.pop("lock", None), lambda: self.guests.pop(vmid, None)
        )

    def _guest_route(self, method: str, kind: str, vmid: str, rest: str, p: dict) -> Any:
        guest = self._guest(kind, vmid)
        word = "VM" if kind == "qemu" else "CT"
        prefix = "qm" if kind == "qemu" else "vz"
        if rest == "" and method == "DELETE":
            self._check_lock(guest)
            if guest.status == "running" and not (kind == "lxc" and p.get("force") == "1"):
                raise PVEError(500, f"{word} {vmid} is running - destroy failed")
            return self._new_task(f"{prefix}destroy", guest.vmid, lambda: self.guests.pop(guest.vmid, None))
        if rest == "/config":
            if method == "GET":
                out = dict(guest.config)
                out["digest"] = "0" * 40
                if "cipassword" in out:
                    out["cipassword"] = "**********"
                return out
            if method == "PUT":
                self._check_lock(guest)
                for key, value in p.items():
                    if key != "digest":
                        guest.config[key] = value
                return None
        if rest == "/status/current" and method == "GET":
            out = {"vmid": guest.vmid, "name": guest.name, "status": guest.status}
            if guest.config.get("lock"):
                out["lock"] = guest.config["lock"]
            if kind == "qemu":
                out["qmpstatus"] = guest.status
            return out
        m = re.fullmatch(r"/status/(start|stop|shutdown|reboot)", rest)
        if m and method == "POST":
            self._check_lock(guest)
            action = m.group(1)
            task_kind = f"{prefix}{action}"
            if action == "start":
                if guest.status == "running":
                    return self._already(task_kind, guest)
                return self._new_task(task_kind, guest.vmid, lambda: setattr(guest, "status", "running"))
            if action in ("stop", "shutdown"):
                if guest.status != "running":
                    return self._failing_task(task_kind, guest, f"{word} {vmid} not running")
                if action == "shutdown" and guest.ignore_acpi and p.get("forceStop") != "1":
                    return self._failing_task(task_kind, guest, f"{word} quit/powerdown failed - got timeout")
                return self._new_task(task_kind, guest.vmid, lambda: setattr(guest, "status", "stopped"))
            if guest.status != "running":
                return self._failing_task(task_kind, guest, f"{word} {vmid} not running")
            return self._new_task(task_kind, guest.vmid, lambda: setattr(guest, "status", "running"))
        if rest == "/resize" and method == "PUT" and kind == "qemu":
            size = int(p.get("size", "0G").rstrip("G").lstrip("+"))
            if size < guest.disk_gib:
                raise PVEError(500, "shrinking disks is not supported")
            return self._new_task("resize", guest.vmid, lambda: setattr(guest, "disk_gib", size))
        if rest == "/cloudinit" and method == "PUT" and kind == "qemu":
            return None
        if rest.startswith("/agent/") and kind == "qemu":
            if guest.status != "running":
                raise PVEError(500, f"VM {vmid} is not running")
            if not self.agent_running:
                raise PVEError(500, "QEMU guest agent is not running")
            if rest == "/agent/set-user-password" and method == "POST":
                guest.agent_password = p.get("password")
                return {"result": {}}
            if rest == "/agent/network-get-interfaces" and method == "GET":
                return {
                    "result": [
                        {
                            "name": "lo",
                            "ip-addresses": [{"ip-address": "127.0.0.1", "ip-address-type": "ipv4", "prefix": 8}],
                        },
                        {
                            "name": "eth0",
                            "hardware-address": "bc:24:11:00:00:01",
                            "ip-addresses": [
                                {"ip-address": guest.ip, "ip-address-type": "ipv4", "prefix": 24},
                                {"ip-address": "fe80::be24:11ff:fe00:1", "ip-address-type": "ipv6", "prefix": 64},
                            ],
                        },
                    ]
                }
        if rest == "/interfaces" and method == "GET" and kind == "lxc":
            if guest.status != "running":
                raise PVEError(500, f"CT {vmid} not running")
            return [
                {"name": "lo", "hwaddr": "00:00:00:00:00:00", "inet": "127.0.0.1/8"},
                {"name": "eth0", "hwaddr": "bc:24:11:00:00:02", "inet": f"{guest.ip}/24"},
            ]
        raise PVEError(501, f"Method '{method} /nodes/{self.node}/{kind}/{vmid}{rest}' not implemented")

    def _failing_task(self, kind: str, guest: Guest, message: str) -> str:
        upid = self._new_task(kind, guest.vmid, duration=10**9)
        task = self.tasks[upid]
        task.status, task.exitstatus = "stopped", message
        return upid

    def _already(self, kind: str, guest: Guest) -> str:
        return self._failing_task(kind, guest, f"VM {guest.vmid} already running")


def pve_tls_context(ca, hostname: str = "127.0.0.1") -> tuple[ssl.SSLContext, Any]:
    """A server TLS context with a certificate from ``ca`` (trustme) for ``hostname``."""
    cert = ca.issue_cert(hostname)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(ctx)
    return ctx, cert
