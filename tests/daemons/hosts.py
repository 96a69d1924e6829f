"""The real daemons started by scripts/daemons, and how the tests read their own state.

Each ``Host`` knows how to point a Provider row at its daemon (the driver's way in)
and how to look at a guest *without* the driver: docker-py at API 1.41 for Docker
and Podman, the ``lxc`` / ``incus`` command line over the unix socket for LXD and
Incus (Incus's provider goes through HTTPS with a client certificate, so the two
ways in differ). Guest ports are checked by a TCP connect to 127.0.0.1 and an HTTP
GET answered by busybox httpd inside the guest (the image serves ports 22 and 80).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

DIR = Path(os.environ.get("DAEMONS_DIR", "/tmp/cloudhost-daemons"))
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "daemons"
GUEST_PAGE = "cloudhost-guest"
NAMES = ("docker", "podman", "lxd", "incus")
# Host port ranges per daemon, apart, so the four never compete for a host port; and below
# Linux's ephemeral ports (ip_local_port_range, 32768-60999): a client socket of this machine
# (the test's own database connection) that got such a port as its local port makes the
# daemon's bind of 0.0.0.0:<port> fail with "address already in use" for as long as it lives.
PORT_RANGES = {"docker": (21000, 21199), "podman": (21200, 21399), "lxd": (21400, 21599), "incus": (21600, 21799)}


def http_get(port: int, seconds: float = 10.0) -> str:
    """The guest's page through host port ``port`` on 127.0.0.1 ('' when nothing answers in time)."""
    limit = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
                data = b""
                while chunk := sock.recv(4096):
                    data += chunk
            if GUEST_PAGE.encode() in data:
                return data.decode(errors="replace")
        except OSError:
            pass
        if time.monotonic() > limit:
            return ""
        time.sleep(0.2)


def refused(port: int, seconds: float = 10.0) -> bool:
    """Nothing of a guest answers on 127.0.0.1:port (within ``seconds``: LXD and Incus end a
    deleted proxy device's listener a moment after the call returns)."""
    limit = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
                if GUEST_PAGE.encode() not in sock.recv(4096):
                    return True
        except OSError:
            return True
        if time.monotonic() > limit:
            return False
        time.sleep(0.2)


def password_matches(shadow_hash: str, password: str) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # Python 3.11: deprecated, still there; verifies a SHA-512 crypt hash

    return bool(shadow_hash) and shadow_hash.startswith("$6$") and crypt.crypt(password, shadow_hash) == shadow_hash


@dataclass
class Host:
    name: str
    image: str
    connection: dict
    secrets: dict = field(default_factory=dict)

    @property
    def provider_type(self) -> str:
        return "docker" if self.name in ("docker", "podman") else self.name

    def up(self) -> bool:
        return subprocess.run([str(SCRIPT), "status", self.name], capture_output=True, text=True).stdout.startswith(
            f"{self.name}: up"
        )

    def stop_daemon(self) -> None:
        subprocess.run([str(SCRIPT), "stop", self.name], check=True, capture_output=True, timeout=120)

    def start_daemon(self) -> None:
        subprocess.run([str(SCRIPT), "start", self.name], check=True, capture_output=True, timeout=300)

    # -- the guest as the daemon sees it (overridden below)

    def status(self, guest: str) -> str | None:
        """'running', 'stopped', or None when the daemon has no such guest."""
        raise NotImplementedError

    def run(self, guest: str, script: str) -> str:
        raise NotImplementedError

    def shadow_hash(self, guest: str) -> str:
        line = self.run(guest, "grep '^root:' /etc/shadow")
        return line.split(":")[1] if ":" in line else ""

    def leftovers(self, guest: str) -> list[str]:
        """Everything of ``guest`` the daemon still holds (containers, volumes, images)."""
        raise NotImplementedError

    def purge(self, guest: str) -> None:
        """Remove what a failed test left (so a rerun starts clean)."""
        raise NotImplementedError


class DockerHost(Host):
    @property
    def api(self):
        import docker

        if not hasattr(self, "_api"):
            self._api = docker.APIClient(base_url=self.connection["base_url"], version="1.41", timeout=60)
        return self._api

    def inspect(self, guest: str) -> dict | None:
        import docker

        try:
            return self.api.inspect_container(guest)
        except docker.errors.NotFound:
            return None

    def status(self, guest: str) -> str | None:
        info = self.inspect(guest)
        if info is None:
            return None
        return "running" if info["State"]["Running"] else "stopped"

    def run(self, guest: str, script: str) -> str:
        exec_id = self.api.exec_create(guest, ["sh", "-c", script])["Id"]
        return self.api.exec_start(exec_id).decode(errors="replace").strip()

    def data_volumes(self, guest: str) -> list[str]:
        info = self.inspect(guest) or {}
        return [m["Name"] for m in info.get("Mounts", []) if m.get("Type") == "volume" and m["Destination"] == "/data"]

    def image_layers(self, guest: str) -> int:
        """Layers of the image the container runs on."""
        info = self.inspect(guest)
        return len(self.api.inspect_image(info["Image"])["RootFS"]["Layers"])

    def leftovers(self, guest: str) -> list[str]:
        found = [c["Names"][0] for c in self.api.containers(all=True) if any(guest in n for n in c["Names"])]
        found += [v["Name"] for v in self.api.volumes().get("Volumes") or [] if v["Name"].startswith(guest)]
        found += [t for i in self.api.images() for t in i.get("RepoTags") or [] if guest in t]
        return found

    def purge(self, guest: str) -> None:
        for c in self.api.containers(all=True):
            if any(guest in n for n in c["Names"]):
                self.api.remove_container(c["Id"], force=True, v=True)
        for v in self.api.volumes().get("Volumes") or []:
            if v["Name"].startswith(guest):
                self.api.remove_volume(v["Name"], force=True)
        for i in self.api.images():
            for t in i.get("RepoTags") or []:
                if guest in t:
                    self.api.remove_image(t, force=True)


class LxdHost(Host):
    @property
    def cli(self) -> list[str]:
        return ["lxc"] if self.name == "lxd" else ["incus"]

    @property
    def env(self) -> dict:
        var = "LXD_DIR" if self.name == "lxd" else "INCUS_DIR"
        return {**os.environ, var: str(DIR / self.name / "state")}

    def query(self, path: str) -> dict | None:
        out = subprocess.run([*self.cli, "query", path], capture_output=True, text=True, env=self.env, timeout=60)
        return json.loads(out.stdout) if out.returncode == 0 else None

    def status(self, guest: str) -> str | None:
        state = self.query(f"/1.0/instances/{guest}/state")
        if state is None:
            return None
        return {"Running": "running", "Stopped": "stopped"}.get(state["status"], state["status"])

    def run(self, guest: str, script: str) -> str:
        out = subprocess.run(
            [*self.cli, "exec", guest, "--", "sh", "-c", script],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
        )
        return out.stdout.strip()

    def leftovers(self, guest: str) -> list[str]:
        return [i for i in self.query("/1.0/instances") or [] if i.rsplit("/", 1)[-1].startswith(guest)]

    def purge(self, guest: str) -> None:
        for _ in range(5):  # a daemon just restarted may still be busy with the instance
            left = self.leftovers(guest)
            if not left:
                return
            for path in left:
                name = path.rsplit("/", 1)[-1]
                subprocess.run([*self.cli, "delete", "--force", name], capture_output=True, env=self.env, timeout=120)
            time.sleep(1)


def host(name: str) -> Host:
    low, high = PORT_RANGES[name]
    if name in ("docker", "podman"):
        connection = {
            "base_url": f"unix://{DIR / name / (name + '.sock')}",
            "images": {"busybox": "cloudhost/busybox:latest"},
            "swap_stop_timeout": 5,
        }
        return DockerHost(name, "busybox", connection)
    if name == "lxd":
        return LxdHost(name, "cloudhost-busybox", {"endpoint": f"unix://{DIR / 'lxd' / 'state' / 'unix.socket'}"})
    # Incus through HTTPS with a client certificate (the daemon's own certificate pinned).
    folder = DIR / "incus"
    connection = {"endpoint": "https://127.0.0.1:18444", "server_cert": (folder / "server.crt").read_text()}
    secrets = {"client_cert": (folder / "client.crt").read_text(), "client_key": (folder / "client.key").read_text()}
    return LxdHost(name, "cloudhost-busybox", connection, secrets)
