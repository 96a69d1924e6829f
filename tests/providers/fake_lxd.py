"""An in-process fake LXD / Incus daemon: the ``/1.0`` REST API over real sockets.

A stateful werkzeug WSGI app (instances, devices, images, background operations,
exec websockets) served on a unix socket and on 127.0.0.1 with mutual TLS
(trustme certificates, client certificate checked against a trust list), so the
drivers' real transport code runs end to end. It speaks both flavours
(``flavour="lxd"|"incus"``) and both ``/wait`` shapes (``wait_style``:
"operation" = Incus >= 6.12 renders the operation; "error" = LXD >= 5.3 and
older Incus put an error body under HTTP 200).

Knobs, reset between tests:

- ``fail_next(method, path, status=, message=, times=, delay=, drop=, after=)``:
  the next matching calls answer an error envelope (or drop the connection,
  before or after doing the work), optionally after a delay (a slow or hung call).
- ``plan(kind, hang=, fail=, duration=, may_cancel=, progress=, exit_code=)``:
  shapes the next background operation of a kind (create, start, stop, restart,
  delete, rebuild, update, exec). A hung operation ends only when cancelled
  (DELETE, if it may be cancelled) or released at teardown.
- ``requests``: every call seen, for assertions ("no PUT was sent").

Operation durations are zero by default, so tests stay fast.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
import secrets
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
import simple_websocket
import trustme
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import Map, Rule
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from providers.base import ProviderConfig, build_driver

logging.getLogger("werkzeug").setLevel(logging.ERROR)

RUNNING, STOPPED = "Running", "Stopped"
_CODES = {RUNNING: 103, STOPPED: 102}
_OP_STATUS = {100: "Created", 103: "Running", 200: "Success", 400: "Failure", 401: "Cancelled"}


class _Fail(Exception):
    """Raised by an operation's work: the operation ends with status_code 400 and this err."""


@dataclass
class Fault:
    method: str | None
    path: str  # regular expression searched in the path
    status: int = 503  # 0: no error, only the delay (a slow call)
    message: str = "Service Unavailable"
    times: int = 1
    delay: float = 0.0
    drop: bool = False
    after: bool = False  # do the work, then drop the connection instead of answering


@dataclass
class Plan:
    kind: str
    hang: bool = False
    fail: str | None = None
    duration: float = 0.0
    may_cancel: bool | None = None
    progress: list[dict[str, Any]] | None = None
    exit_code: int | None = None
    stderr: str = ""
    times: int = 1


@dataclass
class FakeOp:
    kind: str
    description: str
    resources: dict[str, list[str]]
    may_cancel: bool
    cls: str = "task"
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    status_code: int = 103
    err: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)
    wake: threading.Event = field(default_factory=threading.Event)
    cancel_requested: bool = False
    abandoned: bool = False  # its test is over: wake up and do nothing
    finished_at: float | None = None
    # exec websockets
    secrets: dict[str, str] = field(default_factory=dict)
    attached: set[str] = field(default_factory=set)
    stdin: bytearray = field(default_factory=bytearray)
    stdin_closed: threading.Event = field(default_factory=threading.Event)
    output: dict[str, bytes] = field(default_factory=dict)
    output_ready: threading.Event = field(default_factory=threading.Event)

    def render(self) -> dict[str, Any]:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return {
            "id": self.id,
            "class": self.cls,
            "description": self.description,
            "created_at": now,
            "updated_at": now,
            "status": _OP_STATUS.get(self.status_code, "Running"),
            "status_code": self.status_code,
            "resources": self.resources,
            "metadata": copy.deepcopy(self.metadata),
            "may_cancel": self.may_cancel,
            "err": self.err,
            "location": "none",
        }


class FakeLXD:
    """The daemon's state and its WSGI app (``__call__``)."""

    EXTENSIONS = ["instances", "instance_create_start", "instances_rebuild", "projects", "network_forward"]

    def __init__(self, flavour: str = "lxd", wait_style: str | None = None):
        self.flavour = flavour
        self.default_wait_style = wait_style or ("operation" if flavour == "incus" else "error")
        self.trusted: set[str] = set()
        self.lock = threading.RLock()
        self.url_map = Map(
            [
                Rule("/1.0", endpoint="server"),
                Rule("/1.0/instances", endpoint="instances"),
                Rule("/1.0/instances/<name>", endpoint="instance"),
                Rule("/1.0/instances/<name>/state", endpoint="state"),
                Rule("/1.0/instances/<name>/rebuild", endpoint="rebuild"),
                Rule("/1.0/instances/<name>/exec", endpoint="exec"),
                Rule("/1.0/operations/<op_id>", endpoint="operation"),
                Rule("/1.0/operations/<op_id>/wait", endpoint="wait"),
                Rule("/1.0/operations/<op_id>/websocket", endpoint="websocket", websocket=True),
            ]
        )
        self.reset()

    # ----------------------------------------------------------------- knobs

    def reset(self) -> None:
        with self.lock:
            for op in getattr(self, "operations", {}).values():
                op.abandoned = True  # release anything still hanging, without touching the next test's state
                op.wake.set()
            self.instances: dict[str, dict[str, Any]] = {}
            self.operations: dict[str, FakeOp] = {}
            self.images = {"debian/12", "ubuntu/24.04", "alpine/3.20"}
            self.extensions = list(self.EXTENSIONS)
            self.projects = {"default"}
            self.wait_style = self.default_wait_style
            self.faults: list[Fault] = []
            self.plans: list[Plan] = []
            self.requests: list[dict[str, Any]] = []
            self.exec_log: list[dict[str, Any]] = []
            self.retention = 5.0
            self.shutdown_delay = 0.05  # how long a guest ignoring ACPI "takes" before a graceful stop fails
            self._ip = 10

    def fail_next(self, method: str | None, path: str, **kw: Any) -> None:
        with self.lock:
            self.faults.append(Fault(method=method, path=path, **kw))

    def plan(self, kind: str, **kw: Any) -> None:
        with self.lock:
            self.plans.append(Plan(kind=kind, **kw))

    def add_instance(self, name: str, *, status: str = STOPPED, type: str = "container", **fields: Any) -> dict:
        with self.lock:
            inst = self._new_instance(name, type, fields.pop("config", {}), fields.pop("devices", {}), "debian/12")
            inst.update(status=status, **fields)
            self.instances[name] = inst
            return inst

    def calls(self, method: str, path_re: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == method and re.search(path_re, r["path"])]

    # ------------------------------------------------------------ WSGI entry

    def __call__(self, environ, start_response):
        request = Request(environ)
        body = None
        if request.data:
            try:
                body = json.loads(request.data)
            except ValueError:
                body = None
        with self.lock:
            self.requests.append(
                {
                    "method": request.method,
                    "path": request.path,
                    "args": request.args.to_dict(),
                    "json": body,
                    "headers": dict(request.headers),
                }
            )
            fault = self._take_fault(request.method, request.path)
        if fault and fault.delay and not self._sleep(fault.delay):
            # Its test is over: a late request must not touch the next test's state.
            return self._drop(environ)
        if fault and fault.drop and not fault.after:
            return self._drop(environ)
        if fault and not fault.drop and fault.status:
            return self._error(fault.status, fault.message)(environ, start_response)
        try:
            response = self._dispatch(request, body, environ)
        except HTTPException as exc:
            response = self._error(exc.code or 500, exc.description or exc.name)
        if fault and fault.after:
            return self._drop(environ)
        if response is None:  # a websocket session took over the connection
            raise ConnectionError("websocket finished")
        return response(environ, start_response)

    def _take_fault(self, method: str, path: str) -> Fault | None:
        for f in self.faults:
            if (f.method is None or f.method == method) and re.search(f.path, path):
                f.times -= 1
                if f.times <= 0:
                    self.faults.remove(f)
                return f
        return None

    def _take_plan(self, kind: str) -> Plan | None:
        with self.lock:
            for p in self.plans:
                if p.kind == kind:
                    p.times -= 1
                    if p.times <= 0:
                        self.plans.remove(p)
                    return p
        return None

    def _sleep(self, seconds: float) -> bool:
        """Sleep, interruptible by reset(): False when the test that asked for it is over."""
        end = time.monotonic() + seconds
        marker = self.operations  # reset() replaces the dict
        while marker is self.operations and (left := end - time.monotonic()) > 0:
            time.sleep(min(0.02, left))
        return marker is self.operations

    @staticmethod
    def _drop(environ):
        sock = environ.get("werkzeug.socket")
        try:
            sock.shutdown(2)
        except OSError:
            pass
        raise ConnectionError("fault: connection dropped")

    # -------------------------------------------------------------- responses

    @staticmethod
    def _sync(metadata: Any, status: int = 200, etag: str | None = None) -> Response:
        body = {"type": "sync", "status": "Success", "status_code": 200, "operation": "", "metadata": metadata}
        resp = Response(json.dumps(body), status=status, mimetype="application/json")
        if etag:
            resp.headers["ETag"] = etag
        return resp

    @staticmethod
    def _async(op: FakeOp) -> Response:
        body = {
            "type": "async",
            "status": "Operation created",
            "status_code": 100,
            "operation": f"/1.0/operations/{op.id}",
            "metadata": op.render(),
        }
        resp = Response(json.dumps(body), status=202, mimetype="application/json")
        resp.headers["Location"] = f"/1.0/operations/{op.id}"
        return resp

    @staticmethod
    def _error(status: int, message: str, http_status: int | None = None) -> Response:
        body = {"type": "error", "error": message, "error_code": status, "metadata": None}
        return Response(json.dumps(body), status=http_status or status, mimetype="application/json")

    # --------------------------------------------------------------- routing

    def _trusted(self, environ) -> bool:
        if environ.get("wsgi.url_scheme") != "https":
            return True  # the unix socket: access is the socket's file permissions
        sock = environ.get("werkzeug.socket")
        der = sock.getpeercert(binary_form=True) if sock is not None else None
        return bool(der) and hashlib.sha256(der).hexdigest() in self.trusted

    def _dispatch(self, request: Request, body: Any, environ) -> Response | None:
        adapter = self.url_map.bind_to_environ(environ)
        try:
            endpoint, args = adapter.match(method=None)
        except NotFound:
            return self._error(404, "not found")
        except MethodNotAllowed:
            return self._error(405, "method not allowed")
        trusted = self._trusted(environ)
        if endpoint == "server":
            return self._server(trusted)
        if endpoint == "websocket":  # authorised by the secret, like the real daemons
            return self._websocket(args["op_id"], request.args.get("secret", ""), environ)
        if not trusted:
            return self._error(403, "not authorized")
        project = request.args.get("project", "default")
        if project not in self.projects:
            return self._error(404, "Project not found")
        handler = getattr(self, f"_{endpoint}")
        return handler(request, body, **args)

    def _server(self, trusted: bool) -> Response:
        md: dict[str, Any] = {
            "api_extensions": self.extensions if trusted else [],
            "api_status": "stable",
            "api_version": "1.0",
            "auth": "trusted" if trusted else "untrusted",
            "public": False,
            "auth_methods": ["tls"],
        }
        if trusted:
            md["environment"] = {
                "server": self.flavour,
                "server_name": f"fake-{self.flavour}",
                "server_version": "6.1" if self.flavour == "incus" else "5.21.2",
                "kernel_version": "6.8.0",
                "storage": "dir",
                "project": "default",
            }
        return self._sync(md)

    # -------------------------------------------------------------- instances

    def _new_instance(self, name: str, itype: str, config: dict, devices: dict, image: str) -> dict[str, Any]:
        self._ip += 1
        return {
            "name": name,
            "type": itype,
            "status": STOPPED,
            "config": dict(config),
            "devices": copy.deepcopy(devices),
            "profiles": ["default"],
            "architecture": "x86_64",
            "ephemeral": False,
            "stateful": False,
            "description": "",
            "image": image,
            "password": None,
            "ignore_shutdown": False,
            "restarts": 0,
            "ip": self._ip,
        }

    def _render_instance(self, inst: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": inst["name"],
            "type": inst["type"],
            "status": inst["status"],
            "status_code": _CODES.get(inst["status"], 112),
            "config": dict(inst["config"]),
            "devices": copy.deepcopy(inst["devices"]),
            "expanded_config": dict(inst["config"]),
            "expanded_devices": copy.deepcopy(inst["devices"]),
            "profiles": list(inst["profiles"]),
            "architecture": inst["architecture"],
            "ephemeral": inst["ephemeral"],
            "stateful": inst["stateful"],
            "description": inst["description"],
            "location": "none",
            "project": "default",
        }

    @staticmethod
    def _etag(inst: dict[str, Any]) -> str:
        put = {k: inst[k] for k in ("architecture", "config", "devices", "ephemeral", "profiles", "description")}
        return '"' + hashlib.sha256(json.dumps(put, sort_keys=True).encode()).hexdigest()[:16] + '"'

    def _instances(self, request: Request, body: Any) -> Response:
        if request.method == "GET":
            with self.lock:
                return self._sync([f"/1.0/instances/{n}" for n in sorted(self.instances)])
        if request.method != "POST":
            return self._error(405, "method not allowed")
        if not isinstance(body, dict) or not body.get("name"):
            return self._error(400, "No name provided")
        name, itype = body["name"], body.get("type", "container")
        if itype not in ("container", "virtual-machine"):
            return self._error(400, f"Invalid instance type {itype!r}")
        source = body.get("source") or {}
        if source.get("type") != "image" or not (source.get("alias") or source.get("fingerprint")):
            return self._error(400, "Invalid source")
        config = body.get("config") or {}
        for key in ("limits.cpu", "limits.memory"):
            if key in config and not re.fullmatch(r"\d+(MiB|GiB|MB|GB)?", str(config[key])):
                return self._error(400, f'Invalid value for config key "{key}"')
        with self.lock:
            if name in self.instances:
                return self._error(409, f'Instance "{name}" already exists')
        image = source.get("alias") or source.get("fingerprint")

        def work() -> None:
            if image not in self.images:
                raise _Fail("Failed getting remote image info: Image not found")
            if name in self.instances:
                raise _Fail(f'Instance "{name}" already exists')
            inst = self._new_instance(name, itype, config, body.get("devices") or {}, image)
            inst["profiles"] = list(body.get("profiles") or ["default"])
            inst["source"] = copy.deepcopy(source)
            if body.get("start"):
                inst["status"] = RUNNING
            self.instances[name] = inst

        progress = [
            {"download_progress": "rootfs: 42% (3.10MB/s)"},
            {"download_progress": "rootfs: 100% (3.10MB/s)"},
            {
                "progress": {"stage": "create_instance_from_image_unpack", "percent": "80", "speed": "200MB/s"},
                "create_instance_from_image_unpack_progress": "Unpack: 80% (200MB/s)",
            },
        ]
        op = self._start_op("create", "Creating instance", name, work, may_cancel=True, progress=progress)
        return self._async(op)

    def _instance(self, request: Request, body: Any, name: str) -> Response:
        with self.lock:
            inst = self.instances.get(name)
            if inst is None:
                return self._error(404, "Instance not found")
            if request.method == "GET":
                return self._sync(self._render_instance(inst), etag=self._etag(inst))
            if request.method == "PATCH":
                body = body or {}
                for key, dev in (body.get("devices") or {}).items():
                    if not isinstance(dev, dict) or "type" not in dev:
                        return self._error(400, f'Invalid devices: Device "{key}" has no type')
                    if dev["type"] == "proxy":
                        err = self._check_proxy(name, key, dev)
                        if err:
                            return self._error(400, err)
                inst["config"].update(body.get("config") or {})
                inst["devices"].update(copy.deepcopy(body.get("devices") or {}))
                return self._sync({})
            if request.method == "PUT":
                if_match = request.headers.get("If-Match")
                if if_match and if_match != self._etag(inst):
                    return self._error(412, "ETag doesn't match")
                body = body or {}

                def update() -> None:
                    current = self.instances.get(name)
                    if current is None:
                        raise _Fail("Instance not found")
                    for key in ("config", "devices", "profiles", "description", "architecture", "ephemeral"):
                        if key in body:
                            current[key] = copy.deepcopy(body[key])

                return self._async(self._start_op("update", "Updating instance", name, update))
            if request.method == "DELETE":
                if inst["status"] == RUNNING:
                    return self._error(400, "Instance is running")

                def delete() -> None:
                    self.instances.pop(name, None)

                return self._async(self._start_op("delete", "Deleting instance", name, delete))
        return self._error(405, "method not allowed")

    def _check_proxy(self, name: str, key: str, dev: dict[str, Any]) -> str:
        listen = str(dev.get("listen", ""))
        if not re.fullmatch(r"(tcp|udp):[^:]+:\d+(-\d+)?", listen):
            return f'Invalid devices: Device validation failed for "{key}": invalid listen address'
        for other_name, other in self.instances.items():
            for other_key, other_dev in other["devices"].items():
                if other_dev.get("listen") == listen and (other_name, other_key) != (name, key):
                    return f'Failed to start device "{key}": listen tcp {listen}: bind: address already in use'
        return ""

    def _state(self, request: Request, body: Any, name: str) -> Response:
        with self.lock:
            inst = self.instances.get(name)
            if inst is None:
                return self._error(404, "Instance not found")
            if request.method == "GET":
                return self._sync(self._render_state(inst))
            body = body or {}
            action = body.get("action")
            if action not in ("start", "stop", "restart", "freeze", "unfreeze"):
                return self._error(400, f"Unknown action {action!r}")
        force = bool(body.get("force"))
        timeout = body.get("timeout", -1)

        def work() -> None:
            current = self.instances.get(name)
            if current is None:
                raise _Fail("Instance not found")
            if action == "start":
                if current["status"] == RUNNING:
                    raise _Fail("The instance is already running")
                current["status"] = RUNNING
            elif action == "stop":
                if current["status"] == STOPPED:
                    raise _Fail("The instance is already stopped")
                if not force and current["ignore_shutdown"]:
                    self.lock.release()
                    try:
                        time.sleep(min(float(timeout) if timeout and timeout > 0 else 600, self.shutdown_delay))
                    finally:
                        self.lock.acquire()
                    raise _Fail('Failed shutting down instance, status is "Running": context deadline exceeded')
                current["status"] = STOPPED
            elif action == "restart":
                if current["status"] != RUNNING:
                    raise _Fail("The instance isn't running")
                if not force and current["ignore_shutdown"]:
                    raise _Fail('Failed shutting down instance, status is "Running": context deadline exceeded')
                current["restarts"] += 1

        return self._async(self._start_op(action, f"{action.capitalize()}ing instance", name, work))

    def _render_state(self, inst: dict[str, Any]) -> dict[str, Any]:
        running = inst["status"] == RUNNING
        network = {}
        if running:
            network = {
                "lo": {
                    "addresses": [
                        {"family": "inet", "address": "127.0.0.1", "netmask": "8", "scope": "local"},
                        {"family": "inet6", "address": "::1", "netmask": "128", "scope": "local"},
                    ],
                    "state": "up",
                    "type": "loopback",
                },
                "eth0": {
                    "addresses": [
                        {"family": "inet6", "address": f"fd42::{inst['ip']}", "netmask": "64", "scope": "global"},
                        {"family": "inet", "address": f"10.0.3.{inst['ip']}", "netmask": "24", "scope": "global"},
                        {"family": "inet6", "address": f"fe80::{inst['ip']}", "netmask": "64", "scope": "link"},
                    ],
                    "state": "up",
                    "type": "broadcast",
                },
            }
        return {
            "status": inst["status"],
            "status_code": _CODES.get(inst["status"], 112),
            "network": network,
            "pid": 4242 if running else 0,
            "processes": 12 if running else 0,
        }

    def _rebuild(self, request: Request, body: Any, name: str) -> Response:
        if "instances_rebuild" not in self.extensions:
            return self._error(404, "not found")
        with self.lock:
            inst = self.instances.get(name)
            if inst is None:
                return self._error(404, "Instance not found")
            if inst["status"] != STOPPED:
                return self._error(400, "Instance must be stopped to be rebuilt")
        source = (body or {}).get("source") or {}
        image = source.get("alias") or source.get("fingerprint")

        def work() -> None:
            if source.get("type") == "image" and image not in self.images:
                raise _Fail("Failed getting remote image info: Image not found")
            current = self.instances[name]
            current["image"] = image
            current["password"] = None
            current["rebuilds"] = current.get("rebuilds", 0) + 1

        return self._async(self._start_op("rebuild", "Rebuilding instance", name, work, may_cancel=True))

    # -------------------------------------------------------------------- exec

    def _exec(self, request: Request, body: Any, name: str) -> Response:
        body = body or {}
        with self.lock:
            inst = self.instances.get(name)
            if inst is None:
                return self._error(404, "Instance not found")
            if inst["status"] != RUNNING:
                return self._error(400, "Instance is not running")
        if body.get("record-output") and (body.get("wait-for-websocket") or body.get("interactive")):
            return self._error(400, "Cannot use record-output with wait-for-websocket or interactive")
        if not body.get("wait-for-websocket"):
            return self._error(400, "the fake only implements websocket exec")
        command = list(body.get("command") or [])
        plan = self._take_plan("exec")
        op = FakeOp(
            kind="exec",
            description="Executing command",
            resources={"instances": [f"/1.0/instances/{name}"]},
            may_cancel=True,
            cls="websocket",
        )
        op.secrets = {fd: secrets.token_hex(16) for fd in ("0", "1", "2", "control")}
        op.metadata = {"fds": dict(op.secrets), "command": command, "environment": body.get("environment") or {}}
        with self.lock:
            self.operations[op.id] = op
        entry = {"instance": name, "command": command, "environment": body.get("environment") or {}, "op": op}
        threading.Thread(target=self._run_exec, args=(op, plan, entry), daemon=True).start()
        return self._async(op)

    def _run_exec(self, op: FakeOp, plan: Plan | None, entry: dict[str, Any]) -> None:
        deadline = time.monotonic() + 5
        while not {"0", "1", "2"} <= op.attached and time.monotonic() < deadline and not op.wake.is_set():
            time.sleep(0.005)
        if not {"0", "1", "2"} <= op.attached:
            return self._finish(op, 400, "Timed out waiting for websockets")
        op.stdin_closed.wait(5)
        entry["stdin"] = bytes(op.stdin)
        with self.lock:
            self.exec_log.append(entry)
        if plan and plan.hang:
            op.wake.wait()
            if op.abandoned:
                op.output_ready.set()
                return None
            if op.cancel_requested:
                op.output_ready.set()
                return self._finish(op, 401, "Operation cancelled")
        if plan and plan.fail:
            op.output_ready.set()
            return self._finish(op, 400, plan.fail)
        rc, stderr = 0, b""
        if entry["command"] == ["chpasswd"]:
            line = bytes(op.stdin).decode().strip()
            user, _, password = line.partition(":")
            if not password:
                rc, stderr = 1, b"chpasswd: line 1: missing new password\n"
            else:
                with self.lock:
                    inst = self.instances.get(entry["instance"])
                    if inst is not None and user == "root":
                        inst["password"] = password
        else:
            rc, stderr = 127, b"command not found\n"
        if plan and plan.exit_code is not None:
            rc, stderr = plan.exit_code, plan.stderr.encode()
        op.output = {"1": b"", "2": stderr}
        op.metadata = {"return": rc, "fds": dict(op.secrets)}
        op.output_ready.set()
        self._finish(op, 200, "")

    def _websocket(self, op_id: str, secret: str, environ) -> Response | None:
        with self.lock:
            op = self.operations.get(op_id)
        fd = next((k for k, v in op.secrets.items() if v == secret), None) if op else None
        if op is None or fd is None or fd in op.attached:
            return self._error(403, "not authorized")
        ws = simple_websocket.Server(environ)
        op.attached.add(fd)
        try:
            if fd == "0":
                while True:
                    data = ws.receive(timeout=5)
                    if data is None:
                        break
                    op.stdin += data if isinstance(data, bytes) else data.encode()
            elif fd in ("1", "2"):
                op.output_ready.wait(10)
                if op.output.get(fd):
                    ws.send(op.output[fd])
                ws.close()
            else:
                op.done.wait(10)
                ws.close()
        except simple_websocket.ConnectionClosed:
            pass
        finally:
            if fd == "0":
                op.stdin_closed.set()
        # Let the websocket's reader see the client's close before the server
        # thread gives up on the connection (no stray keep-alive read).
        ws.thread.join(timeout=2)
        return None

    # -------------------------------------------------------------- operations

    def _start_op(
        self,
        kind: str,
        description: str,
        name: str,
        work,
        *,
        may_cancel: bool = False,
        progress: list[dict[str, Any]] | None = None,
    ) -> FakeOp:
        plan = self._take_plan(kind)
        if plan and plan.may_cancel is not None:
            may_cancel = plan.may_cancel
        op = FakeOp(kind=kind, description=description, resources={"instances": [f"/1.0/instances/{name}"]},
                    may_cancel=may_cancel)  # fmt: skip
        with self.lock:
            self.operations[op.id] = op
        threading.Thread(target=self._run_op, args=(op, plan, work, progress), daemon=True).start()
        return op

    def _run_op(self, op: FakeOp, plan: Plan | None, work, progress: list[dict[str, Any]] | None) -> None:
        steps = plan.progress if plan and plan.progress is not None else (progress or [])
        step_time = (plan.duration / max(1, len(steps))) if plan else 0.0
        waits = [step_time] * len(steps)
        if plan and not steps and plan.duration:
            waits = [plan.duration]
        for i, seconds in enumerate(waits):
            if i < len(steps):
                op.metadata = dict(steps[i])  # the daemons replace the metadata map on each update
            op.wake.wait(seconds)
            if op.abandoned:
                return
            if op.cancel_requested:
                return self._finish(op, 401, "Operation cancelled")
        if plan and plan.hang:
            op.wake.wait()
            if op.abandoned:
                return
            if op.cancel_requested:
                return self._finish(op, 401, "Operation cancelled")
        if plan and plan.fail:
            return self._finish(op, 400, plan.fail)
        try:
            with self.lock:
                if op.abandoned:  # reset() sets it under this lock: the next test's state stays untouched
                    return None
                work()
        except _Fail as exc:
            return self._finish(op, 400, str(exc))
        self._finish(op, 200, "")

    def _finish(self, op: FakeOp, code: int, err: str) -> None:
        with self.lock:
            op.status_code, op.err = code, err
            op.finished_at = time.monotonic()
        op.done.set()

    def _live_op(self, op_id: str) -> FakeOp | None:
        with self.lock:
            now = time.monotonic()
            for key, op in list(self.operations.items()):
                if op.finished_at is not None and now - op.finished_at > self.retention:
                    del self.operations[key]
            return self.operations.get(op_id)

    def _operation(self, request: Request, body: Any, op_id: str) -> Response:
        op = self._live_op(op_id)
        if op is None:
            return self._error(404, "Operation not found")
        if request.method == "GET":
            return self._sync(op.render())
        if request.method == "DELETE":
            if op.done.is_set():
                return self._error(400, "Only running operations can be cancelled")
            if not op.may_cancel:
                return self._error(400, "This operation can't be cancelled")
            op.cancel_requested = True
            op.wake.set()
            op.done.wait(2)
            return self._sync({})
        return self._error(405, "method not allowed")

    def _wait(self, request: Request, body: Any, op_id: str) -> Response:
        raw = request.args.get("timeout", "-1")
        try:
            timeout = int(raw)  # both daemons parse it with strconv.Atoi
        except ValueError:
            return self._error(500, "Failed to extract operation wait timeout from URL")
        op = self._live_op(op_id)
        if op is None:
            return self._error(404, "Operation not found")
        finished = op.done.wait(None if timeout < 0 else timeout)
        if self.wait_style == "error":
            # LXD >= 5.3 / Incus < 6.12: the 200 header is already out when the
            # wait fails, so the error body travels under HTTP 200.
            if not finished:
                return self._error(500, "context deadline exceeded", http_status=200)
            if op.status_code != 200:
                return self._error(400, op.err or "Operation cancelled", http_status=200)
        return self._sync(op.render())


# ------------------------------------------------------------------ serving


@dataclass
class TLSMaterial:
    ca: trustme.CA
    server_cert_pem: str
    client_cert_pem: str
    client_key_pem: str
    client_fingerprint: str
    stranger_cert_pem: str  # signed by the same CA, but not in the trust list
    stranger_key_pem: str
    server_context: Any = None

    def server_fingerprint(self) -> str:
        return hashlib.sha256(ssl.PEM_cert_to_DER_cert(self.server_cert_pem)).hexdigest()


def make_tls_material() -> TLSMaterial:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("client.cloudhost.test")
    stranger = ca.issue_cert("stranger.cloudhost.test")
    client_pem = client.cert_chain_pems[0].bytes().decode()
    material = TLSMaterial(
        ca=ca,
        server_cert_pem=server.cert_chain_pems[0].bytes().decode(),
        client_cert_pem=client_pem,
        client_key_pem=client.private_key_pem.bytes().decode(),
        client_fingerprint=hashlib.sha256(ssl.PEM_cert_to_DER_cert(client_pem)).hexdigest(),
        stranger_cert_pem=stranger.cert_chain_pems[0].bytes().decode(),
        stranger_key_pem=stranger.private_key_pem.bytes().decode(),
    )
    material.server_context = server
    return material


class _QuietHandler(WSGIRequestHandler):
    """No access log, and no noise when a client drops a connection on purpose."""

    def log(self, type: str, message: str, *args: Any) -> None:
        return None


class FakeServer:
    """Serves a FakeLXD on a unix socket or on 127.0.0.1 with TLS, in a daemon thread."""

    def __init__(self, fake: FakeLXD, *, unix_path: str | None = None, tls: TLSMaterial | None = None):
        self.fake = fake
        if unix_path:
            self.server = make_server(f"unix://{unix_path}", 0, fake, threaded=True, request_handler=_QuietHandler)
            self.url = f"unix://{unix_path}"
        else:
            assert tls is not None
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.server_context.configure_cert(ctx)
            tls.ca.configure_trust(ctx)
            # Like the daemons: ask for a client certificate; trust is decided per request.
            ctx.verify_mode = ssl.CERT_OPTIONAL
            if fake.flavour == "incus":
                ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            self.server = make_server(
                "127.0.0.1", 0, fake, threaded=True, ssl_context=ctx, request_handler=_QuietHandler
            )
            self.url = f"https://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class LXDEnv:
    """One flavour's fake with both transports, and a driver factory."""

    flavour: str
    fake: FakeLXD
    unix_url: str
    https_url: str
    tls: TLSMaterial

    def connection(self, transport: str = "unix", **overrides: Any) -> dict[str, Any]:
        if transport == "unix":
            conn: dict[str, Any] = {"endpoint": self.unix_url}
        else:
            conn = {"endpoint": self.https_url, "server_cert": self.tls.server_cert_pem}
        conn.update(overrides)
        return conn

    def secrets(self, transport: str = "unix") -> dict[str, Any]:
        if transport == "unix":
            return {}
        return {"client_cert": self.tls.client_cert_pem, "client_key": self.tls.client_key_pem}

    def config(self, transport: str = "unix", secrets: dict | None = None, **overrides: Any) -> ProviderConfig:
        return ProviderConfig(
            provider_id=1,
            name=f"fake-{self.flavour}",
            provider_type=self.flavour,
            connection=self.connection(transport, **overrides),
            secrets=self.secrets(transport) if secrets is None else secrets,
        )

    def driver(self, transport: str = "unix", secrets: dict | None = None, **overrides: Any):
        return build_driver(self.config(transport, secrets, **overrides))


@pytest.fixture(scope="session")
def lxd_tls_material() -> TLSMaterial:
    return make_tls_material()


@pytest.fixture(scope="session")
def lxd_fakes(tmp_path_factory, lxd_tls_material):
    base = tmp_path_factory.mktemp("lxd")
    envs, servers = {}, []
    for flavour in ("lxd", "incus"):
        fake = FakeLXD(flavour)
        fake.trusted.add(lxd_tls_material.client_fingerprint)
        unix = FakeServer(fake, unix_path=str(base / f"{flavour}.sock"))
        tls = FakeServer(fake, tls=lxd_tls_material)
        servers += [unix, tls]
        envs[flavour] = LXDEnv(flavour, fake, unix.url, tls.url, lxd_tls_material)
    yield envs
    for env in envs.values():
        env.fake.reset()
    for server in servers:
        server.close()


@pytest.fixture(params=["lxd", "incus"])
def lxd_env(request, lxd_fakes) -> LXDEnv:
    env = lxd_fakes[request.param]
    env.fake.reset()
    yield env
    env.fake.reset()
