"""An in-process Docker Engine API: a stateful werkzeug app on a unix socket (or TCP+TLS).

Faithful where the driver depends on it: the /v1.xx prefix, {"message"} error
bodies with the daemon's status codes (304 already started/stopped, 404, 409),
NDJSON pull progress with in-stream errors under HTTP 200, auto-created named
volumes, commit, rename, and exec start hijacked with 101 UPGRADED followed by
a raw multiplexed stream that reads stdin. A container's "filesystem" is a dict
that commit copies into an image, so tests can see what survives a recreate.
Knobs: fail the next N calls, pulls that hang or break mid-stream, container
actions that take long or hang, execs that hang or fail.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from werkzeug.wrappers import Request, Response

NEVER = "0001-01-01T00:00:00Z"
_ids = itertools.count(1)


def new_id() -> str:
    return hashlib.sha256(f"fake-{next(_ids)}-{time.monotonic()}".encode()).hexdigest()


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime())


@dataclass
class Image:
    id: str
    tags: list[str]
    layers: list[tuple[str, int]]
    fs: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class Container:
    id: str
    name: str
    image: str  # the reference it was created from
    image_id: str
    config: dict[str, Any]
    host_config: dict[str, Any]
    fs: dict[str, Any]
    status: str = "created"
    started_at: str = NEVER
    exit_code: int = 0
    ip: str = ""
    exit_at_once: bool = False  # its process ends right after start


@dataclass
class Exec:
    id: str
    container: str
    cmd: list[str]
    env: list[str]
    running: bool = False
    exit_code: int | None = None
    stdin: bytes = b""


@dataclass
class Fault:
    count: int
    status: int
    message: str
    method: str | None = None
    path: str | None = None


class DockerError(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


class FakeDocker:
    def __init__(self):
        self.lock = threading.RLock()
        # What a registry would serve: reference -> layer sizes.
        self.registry: dict[str, list[int]] = {"debian:12": [30_000_000, 10_000_000], "ubuntu:24.04": [28_000_000]}
        self.images: dict[str, Image] = {}
        self.containers: dict[str, Container] = {}
        self.volumes: dict[str, dict[str, Any]] = {}
        self.execs: dict[str, Exec] = {}
        self.faults: list[Fault] = []
        self.calls: list[tuple[str, str, dict, Any]] = []
        self.versions_seen: set[str] = set()
        self.pull_hang: set[str] = set()
        self.pull_errors: dict[str, str] = {}
        self.stop_delay = 0.0
        self.hang_actions: set[str] = set()  # container actions (start, stop, restart, remove) that block
        self.exec_hang = False  # an exec that never finishes (until release)
        self.ignore_stop = False  # the process survives SIGTERM and the daemon's own kill (a stuck one)
        self.busy_host_ports: set[str] = set()  # "tcp/20022": bound by something else on the host
        # Podman's answers: volumes only in the top-level Mounts and HostConfig.Binds,
        # API versions up to 1.41 only (set api_version too).
        self.podman = False
        self.api_version = "1.47"  # the newest the daemon accepts; newer -> 400, as Docker 20.10 does
        self._released = threading.Event()
        self._ips = itertools.count(2)

    # -- knobs

    def fail_next(self, count: int, status: int, message: str, method: str | None = None, path: str | None = None):
        with self.lock:
            self.faults.append(Fault(count, status, message, method, path))

    def release(self) -> None:
        self._released.set()

    def by_name(self, name: str) -> Container | None:
        return next((c for c in self.containers.values() if c.name == name), None)

    def calls_to(self, method: str, pattern: str) -> list[tuple[dict, Any]]:
        return [(q, b) for m, p, q, b in self.calls if m == method and re.search(pattern, p)]

    def pulled(self, reference: str) -> None:
        """Make an image present, as if pulled earlier."""
        repo, tag = _split(reference)
        layers = [(new_id()[:12], size) for size in self.registry.get(f"{repo}:{tag}", [1000])]
        image = Image(
            "sha256:" + new_id(), [f"{repo}:{tag}"], layers, config={"Cmd": ["bash"], "Env": ["PATH=/usr/bin"]}
        )
        self.images[image.id] = image

    # -- lookup

    def _image(self, ref: str) -> Image | None:
        if ref.startswith("sha256:"):
            return self.images.get(ref)
        repo, tag = _split(ref)
        return next((i for i in self.images.values() if f"{repo}:{tag}" in i.tags), None)

    def _container(self, ref: str) -> Container:
        found = self.containers.get(ref) or self.by_name(ref.lstrip("/"))
        if found is None and len(ref) >= 12:
            found = next((c for cid, c in self.containers.items() if cid.startswith(ref)), None)
        if found is None:
            raise DockerError(404, f"No such container: {ref}")
        return found

    # -- WSGI

    def __call__(self, environ, start_response):
        request = Request(environ)
        path = request.path
        m = re.match(r"^/v(1\.\d+)(/.*)$", path)
        if m:
            self.versions_seen.add(m.group(1))
            path = m.group(2)
            if _vt(m.group(1)) > _vt(self.api_version):
                message = f"client version {m.group(1)} is too new. Maximum supported API version is {self.api_version}"
                return _json({"message": message}, 400)(environ, start_response)
        body: Any = None
        if request.method in ("POST", "PUT") and request.content_type == "application/json":
            body = request.get_json(silent=True)
        params = dict(request.args.items())
        with self.lock:
            self.calls.append((request.method, path, params, body))
            for fault in self.faults:
                if fault.count > 0 and fault.method in (None, request.method):
                    if fault.path is None or re.search(fault.path, path):
                        fault.count -= 1
                        return _json({"message": fault.message}, fault.status)(environ, start_response)
        if request.method == "POST" and path == "/images/create":
            return self._pull(params)(environ, start_response)
        m = re.fullmatch(r"/exec/([0-9a-f]+)/start", path)
        if m and request.method == "POST" and not (body or {}).get("Detach"):
            return self._hijack(m.group(1), environ, start_response)
        m = re.fullmatch(r"/containers/[^/]+(/start|/stop|/restart)?", path)
        if m and (request.method == "POST" and m.group(1) or request.method == "DELETE" and not m.group(1)):
            self._slow((m.group(1) or "/remove")[1:])
        with self.lock:
            try:
                response = self._route(request.method, path, params, body)
            except DockerError as exc:
                response = _json({"message": exc.message}, exc.status)
        return response(environ, start_response)

    def _slow(self, action: str) -> None:
        if action in self.hang_actions:
            self._released.wait(10)
        elif self.stop_delay and action in ("stop", "restart"):
            time.sleep(self.stop_delay)

    def _route(self, method: str, path: str, q: dict, body: Any) -> Response:
        if path == "/_ping":
            return Response("OK", content_type="text/plain")
        if (method, path) == ("GET", "/version"):
            return _json(
                {
                    "Version": "4.3.1" if self.podman else "27.3.1",
                    "ApiVersion": self.api_version,
                    "MinAPIVersion": "1.24",
                    "Os": "linux",
                    "Arch": "amd64",
                    "KernelVersion": "6.8.0-fake",
                }
            )
        m = re.fullmatch(r"/images/(.+)/json", path)
        if m and method == "GET":
            image = self._image(m.group(1))
            if image is None:
                raise DockerError(404, f"No such image: {m.group(1)}")
            return _json({"Id": image.id, "RepoTags": image.tags, "Config": image.config})
        m = re.fullmatch(r"/images/(.+)/tag", path)
        if m and method == "POST":
            image = self._image(m.group(1))
            if image is None:
                raise DockerError(404, f"No such image: {m.group(1)}")
            ref = f"{q.get('repo')}:{q.get('tag') or 'latest'}"
            for other in self.images.values():
                if ref in other.tags:
                    other.tags.remove(ref)
            image.tags.append(ref)
            return Response(status=201)
        m = re.fullmatch(r"/images/(.+)", path)
        if m and method == "DELETE":
            image = self._image(m.group(1))
            if image is None:
                raise DockerError(404, f"No such image: {m.group(1)}")
            users = [c for c in self.containers.values() if c.image_id == image.id]
            if users:
                raise DockerError(
                    409,
                    f'conflict: unable to remove repository reference "{m.group(1)}" (must force) - '
                    f"container {users[0].id[:12]} is using its referenced image {image.id[7:19]}",
                )
            del self.images[image.id]
            return _json([{"Untagged": m.group(1)}, {"Deleted": image.id}])
        if (method, path) == ("POST", "/commit"):
            container = self._container(q["container"])
            repo, tag = q.get("repo", ""), q.get("tag") or "latest"
            for image in self.images.values():
                if f"{repo}:{tag}" in image.tags:
                    image.tags.remove(f"{repo}:{tag}")
            base = self.images.get(container.image_id)
            image = Image(
                "sha256:" + new_id(),
                [f"{repo}:{tag}"],
                (base.layers if base else []) + [(new_id()[:12], 1000)],
                fs=dict(container.fs),
                config={k: container.config.get(k) for k in ("Cmd", "Env")},
            )
            self.images[image.id] = image
            return _json({"Id": image.id}, 201)
        m = re.fullmatch(r"/volumes/([^/]+)", path)
        if m:
            name = m.group(1)
            if name not in self.volumes:
                raise DockerError(404, f"get {name}: no such volume")
            if method == "GET":
                return _json({"Name": name, "Driver": "local", "Mountpoint": f"/var/lib/docker/volumes/{name}/_data"})
            if method == "DELETE":
                users = [c.id for c in self.containers.values() if name in _volumes_of(c)]
                if users:
                    raise DockerError(409, f"remove {name}: volume is in use - [{', '.join(users)}]")
                del self.volumes[name]
                return Response(status=204)
        if (method, path) == ("POST", "/containers/create"):
            return self._create(q.get("name", ""), body or {})
        m = re.fullmatch(r"/containers/([^/]+)(/[a-z]+)?", path)
        if m:
            return self._container_route(method, self._container(m.group(1)), m.group(2) or "", q, body or {})
        m = re.fullmatch(r"/exec/([0-9a-f]+)/(json|start)", path)
        if m:
            ex = self.execs.get(m.group(1))
            if ex is None:
                raise DockerError(404, f"No such exec instance: {m.group(1)}")
            if m.group(2) == "json":
                return _json(
                    {"ID": ex.id, "Running": ex.running, "ExitCode": ex.exit_code, "ContainerID": ex.container}
                )
            self._run_exec(ex, b"")  # detached: no stdin
            return Response(status=200)
        raise DockerError(404, f"page not found: {method} {path}")

    def _create(self, name: str, body: dict) -> Response:
        if not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+", name):
            raise DockerError(400, f"Invalid container name ({name}), only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed")
        existing = self.by_name(name)
        if existing:
            raise DockerError(
                409,
                f'Conflict. The container name "/{name}" is already in use by container "{existing.id}". '
                "You have to remove (or rename) that container to be able to reuse that name.",
            )
        image = self._image(body.get("Image", ""))
        if image is None:
            raise DockerError(404, f"No such image: {body.get('Image')}")
        host = dict(body.get("HostConfig") or {})
        for mount in host.get("Mounts") or []:
            if mount.get("Type") == "volume":
                self.volumes.setdefault(mount["Source"], {"data": {}})
        config = {k: v for k, v in body.items() if k != "HostConfig"}
        config.setdefault("Cmd", image.config.get("Cmd"))
        config.setdefault("Env", image.config.get("Env"))
        container = Container(new_id(), name, body["Image"], image.id, config, host, dict(image.fs))
        self.containers[container.id] = container
        return _json({"Id": container.id, "Warnings": []}, 201)

    def _container_route(self, method: str, c: Container, action: str, q: dict, body: dict) -> Response:
        if action == "" and method == "DELETE":
            if c.status == "running" and q.get("force") not in ("1", "true", "True"):
                raise DockerError(
                    409,
                    f'cannot remove container "/{c.name}": container is running: stop the container before '
                    "removing or force remove",
                )
            del self.containers[c.id]
            return Response(status=204)
        if action == "/json" and method == "GET":
            return _json(self._inspect(c))
        if action == "/start":
            if c.status == "running":
                return Response(status=304)
            for key, entries in (c.host_config.get("PortBindings") or {}).items():
                proto = key.partition("/")[2] or "tcp"
                for entry in entries or []:
                    bound = f"{proto}/{entry.get('HostPort')}"
                    if bound in self.busy_host_ports or any(
                        bound in _bound(o) for o in self.containers.values() if o is not c and o.status == "running"
                    ):
                        raise DockerError(
                            500,
                            f"driver failed programming external connectivity on endpoint {c.name} ({c.id[:12]}): "
                            f"Bind for {entry.get('HostIp') or '0.0.0.0'}:{entry.get('HostPort')} failed: port is "
                            "already allocated",
                        )
            c.started_at = now_iso()
            if c.exit_at_once:
                c.status, c.exit_code = "exited", 1
            else:
                c.status, c.ip = "running", f"172.17.0.{next(self._ips)}"
            return Response(status=204)
        if action == "/stop":
            if c.status != "running":
                return Response(status=304)
            if not self.ignore_stop:
                c.status, c.exit_code, c.ip = "exited", 0, ""
            return Response(status=204)
        if action == "/kill":
            if c.status != "running":
                raise DockerError(409, f"Cannot kill container: {c.id}: Container {c.id} is not running")
            c.status, c.exit_code, c.ip = "exited", 137, ""
            return Response(status=204)
        if action == "/restart":
            c.status, c.started_at = "running", now_iso()
            c.ip = c.ip or f"172.17.0.{next(self._ips)}"
            return Response(status=204)
        if action == "/rename":
            new = q.get("name", "")
            if self.by_name(new):
                raise DockerError(409, f'Conflict. The container name "/{new}" is already in use')
            c.name = new
            return Response(status=204)
        if action == "/exec" and method == "POST":
            if c.status != "running":
                raise DockerError(409, f"container {c.id} is not running")
            ex = Exec(new_id(), c.id, list(body.get("Cmd") or []), list(body.get("Env") or []))
            self.execs[ex.id] = ex
            return _json({"Id": ex.id}, 201)
        raise DockerError(404, f"page not found: {method} /containers/{c.id}{action}")

    def _inspect(self, c: Container) -> dict:
        vols = _volumes_of(c)
        host_config = dict(c.host_config)
        if self.podman:
            host_config.pop("Mounts", None)
            host_config["Binds"] = [f"{v}:{dest}:rw,rprivate,nosuid,nodev,rbind" for v, dest in vols.items()] or None
        return {
            "Id": c.id,
            "Name": f"/{c.name}",
            "Image": c.image_id,
            "Created": now_iso(),
            "State": {
                "Status": c.status,
                "Running": c.status in ("running", "stopping", "paused"),
                "Paused": c.status == "paused",
                "Restarting": False,
                "Dead": False,
                "Pid": 4242 if c.status == "running" else 0,
                "ExitCode": c.exit_code,
                "Error": "",
                "StartedAt": c.started_at,
                "FinishedAt": NEVER,
            },
            "Config": {**c.config, "Image": c.image},
            "HostConfig": host_config,
            "Mounts": [
                {
                    "Type": "volume",
                    "Name": v,
                    "Source": f"/var/lib/docker/volumes/{v}/_data",
                    "Destination": dest,
                    "RW": True,
                }
                for v, dest in vols.items()
            ],
            "NetworkSettings": {
                "Networks": {
                    "bridge": {
                        "IPAddress": c.ip,
                        "IPPrefixLen": 16 if c.ip else 0,
                        "Gateway": "172.17.0.1" if c.ip else "",
                        "GlobalIPv6Address": "",
                    }
                },
                "Ports": {k: v for k, v in (c.host_config.get("PortBindings") or {}).items() if c.status == "running"},
            },
        }

    # -- streams

    def _pull(self, q: dict):
        reference = f"{q.get('fromImage')}:{q.get('tag') or 'latest'}"
        repo, tag = _split(reference)
        reference = f"{repo}:{tag}"
        if reference not in self.registry:
            return _json(
                {
                    "message": f"pull access denied for {repo}, repository does not exist or may require "
                    "'docker login': denied: requested access to the resource is denied"
                },
                404,
            )
        sizes = self.registry[reference]

        def stream():
            layers = [(new_id()[:12], size) for size in sizes]
            yield _line({"status": f"Pulling from library/{repo}", "id": tag})
            for lid, _ in layers:
                yield _line({"status": "Pulling fs layer", "progressDetail": {}, "id": lid})
            for n, (lid, size) in enumerate(layers):
                yield _line(
                    {"status": "Downloading", "progressDetail": {"current": size // 2, "total": size}, "id": lid}
                )
                if n == 0 and reference in self.pull_errors:
                    message = self.pull_errors[reference]
                    yield _line({"errorDetail": {"message": message}, "error": message})
                    return
                if n == 0 and reference in self.pull_hang:
                    self._released.wait(10)
                    return
                yield _line({"status": "Downloading", "progressDetail": {"current": size, "total": size}, "id": lid})
                yield _line({"status": "Pull complete", "progressDetail": {}, "id": lid})
            with self.lock:
                image = Image(
                    "sha256:" + new_id(), [reference], layers, config={"Cmd": ["bash"], "Env": ["PATH=/usr/bin"]}
                )
                self.images[image.id] = image
            yield _line({"status": "Digest: sha256:" + new_id()})
            yield _line({"status": f"Status: Downloaded newer image for {reference}"})

        return Response(stream(), content_type="application/json")

    def _hijack(self, exec_id: str, environ, start_response):
        ex = self.execs.get(exec_id)
        if ex is None:
            return _json({"message": f"No such exec instance: {exec_id}"}, 404)(environ, start_response)
        # The start body was read in __call__; stdin follows on the raw socket.
        start_response(
            "101 UPGRADED",
            [("Content-Type", "application/vnd.docker.raw-stream"), ("Connection", "Upgrade"), ("Upgrade", "tcp")],
        )

        def body():
            yield b""  # flushes the 101 headers
            sock = environ["werkzeug.socket"]
            sock.settimeout(5)
            data = b""
            try:
                while b"\n" not in data:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            except OSError:
                pass
            if self.exec_hang:
                self._released.wait(10)
            with self.lock:
                out, err = self._run_exec(ex, data)
            if out:
                yield _frame(1, out)
            if err:
                yield _frame(2, err)

        return body()

    def _run_exec(self, ex: Exec, stdin: bytes) -> tuple[bytes, bytes]:
        ex.stdin = stdin
        container = self.containers.get(ex.container)
        script = " ".join(ex.cmd)
        if container is None:
            ex.exit_code = 126
            return b"", b"container gone\n"
        if "chpasswd" in script:
            user, _, password = stdin.decode().splitlines()[0].partition(":") if stdin else ("", "", "")
            if container.fs.get("chpasswd_fails") or not user:
                ex.exit_code = 1
                return (
                    b"",
                    b"chpasswd: (user root) pam_chauthtok() failed, error:\nAuthentication token manipulation error\n",
                )
            container.fs[f"password:{user}"] = password
            ex.exit_code = 0
            return b"", b""
        ex.exit_code = 127
        return b"", f"sh: {ex.cmd[0] if ex.cmd else ''}: not found\n".encode()


def _split(reference: str) -> tuple[str, str]:
    if "@" in reference:
        return tuple(reference.split("@", 1))  # type: ignore[return-value]
    repo, _, tag = reference.rpartition(":")
    if not repo or "/" in tag:
        return reference, "latest"
    return repo, tag


def _volumes_of(c: Container) -> dict[str, str]:
    return {m["Source"]: m.get("Target", "") for m in c.host_config.get("Mounts") or [] if m.get("Type") == "volume"}


def _bound(c: Container) -> set[str]:
    return {
        f"{key.partition('/')[2] or 'tcp'}/{e.get('HostPort')}"
        for key, entries in (c.host_config.get("PortBindings") or {}).items()
        for e in entries or []
    }


def _vt(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data), status=status, content_type="application/json")


def _line(data: dict) -> bytes:
    return (json.dumps(data) + "\r\n").encode()


def _frame(stream: int, data: bytes) -> bytes:
    return bytes([stream, 0, 0, 0]) + len(data).to_bytes(4, "big") + data
