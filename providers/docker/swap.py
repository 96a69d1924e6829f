"""Port bindings and the container swap of the Docker driver.

Published ports are fixed at create time, so a port change (and a rebuild)
swaps the container: stop, commit (optionally), rename aside, create the new one,
start it, remove the old one; a failure or a crash midway is repaired by
``_recover_swap``. ``ContainerSwap`` is a mixin of DockerDriver (it uses EngineApi).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from providers.base import (
    AmbiguousOutcome,
    CancelToken,
    ConflictError,
    GuestSpec,
    PortSpec,
    ProgressCallback,
    ProviderError,
)
from providers.docker.engine import (
    LABEL_GENERATION,
    LABEL_IMAGE,
    LABEL_NAME,
    STATE_REPO,
)

logger = logging.getLogger(__name__)

SHELLS = {"sh", "bash", "ash", "dash", "zsh", "ksh", "mksh"}

# ------------------------------------------------------------------ ports


def host_ip(listen_ip: str | None) -> str:
    """HostIp of a binding: "" for every address. An explicit "0.0.0.0" becomes a
    ``-d 0.0.0.0/32`` DNAT rule on Podman, which nothing ever matches."""
    return "" if listen_ip in (None, "", "0.0.0.0") else listen_ip


def bindings_with(bindings: dict, port: PortSpec) -> dict:
    out = bindings_without(bindings, port)
    for i in range(port.host_port_end - port.host_port_start + 1):
        key = f"{port.guest_port_start + i}/{port.protocol}"
        out.setdefault(key, []).append({"HostIp": host_ip(port.listen_ip), "HostPort": str(port.host_port_start + i)})
    return out


def bindings_for(ports: list[PortSpec]) -> dict:
    bindings: dict = {}
    for port in ports:
        bindings = bindings_with(bindings, port)
    return bindings


def bindings_without(bindings: dict, port: PortSpec) -> dict:
    """Drop every binding of ``port``'s host ports for its protocol (host ports are unique per provider)."""
    hosts = {str(p) for p in range(port.host_port_start, port.host_port_end + 1)}
    out: dict[str, list] = {}
    for key, entries in (bindings or {}).items():
        keep = [
            dict(e) for e in entries or [] if not (key.endswith(f"/{port.protocol}") and e.get("HostPort") in hosts)
        ]
        if keep:
            out[key] = keep
    return out


def normal_bindings(bindings: dict | None) -> dict:
    return {
        k: sorted((host_ip(e.get("HostIp")), e.get("HostPort") or "") for e in v)
        for k, v in (bindings or {}).items()
        if v
    }


def ports_from_bindings(bindings: dict | None) -> list[PortSpec]:
    """PortSpecs from PortBindings, contiguous single ports merged back into ranges."""
    singles = []
    for key, entries in (bindings or {}).items():
        guest, _, proto = key.partition("/")
        for entry in entries or []:
            if entry.get("HostPort"):
                singles.append((proto or "tcp", entry.get("HostIp") or "0.0.0.0", int(entry["HostPort"]), int(guest)))
    singles.sort()
    specs: list[PortSpec] = []
    for proto, ip, host, guest in singles:
        last = specs[-1] if specs else None
        if (
            last
            and (last.protocol, last.listen_ip) == (proto, ip)
            and last.host_port_end + 1 == host
            and last.guest_port_end + 1 == guest
        ):
            last.host_port_end, last.guest_port_end = host, guest
        else:
            specs.append(PortSpec(proto, host, host, guest, guest, listen_ip=ip))
    return specs


def created_image(driver: Any, created: dict, op: str) -> str:
    """The image id a just-created container runs on."""
    return (driver._inspect(created.get("Id", ""), op) or {}).get("Image", "")


class ContainerSwap:
    # -- container settings

    def _volume_name(self, name: str, generation: int) -> str:
        return f"{name}-data" if generation == 0 else f"{name}-data-{generation}"

    def _container_config(self, spec: GuestSpec, image: str, bindings: dict | None, generation: int) -> dict[str, Any]:
        """A new container's settings; ``bindings`` None: publish ``spec.ports``."""
        if bindings is None:
            bindings = bindings_for(spec.ports)
        conn = self.config.connection
        labels = {f"cloudhost.label.{k}": str(v) for k, v in spec.labels.items()}
        labels.update({LABEL_NAME: spec.name, LABEL_IMAGE: spec.image, LABEL_GENERATION: str(generation)})
        host = {
            "NanoCpus": int(spec.cpu) * 1_000_000_000,
            "Memory": int(spec.memory_mb) * 1024 * 1024,
            "MemorySwap": int(spec.memory_mb) * 1024 * 1024,  # no swap beyond the memory limit
            "PortBindings": bindings,
            "Mounts": [
                {"Type": "volume", "Source": self._volume_name(spec.name, generation), "Target": self.data_path}
            ],
            "RestartPolicy": {"Name": "unless-stopped"},
            "Init": bool(conn.get("init", True)),
        }
        if conn.get("storage_opt_size"):
            host["StorageOpt"] = {"size": f"{int(spec.disk_mb)}M"}
        if conn.get("network"):
            host["NetworkMode"] = conn["network"]
        config: dict[str, Any] = {
            "Image": image,
            "Hostname": spec.name,
            "Labels": labels,
            # A distro image's shell stays up with a TTY, like `docker run -dit`.
            "Tty": True,
            "OpenStdin": True,
            "ExposedPorts": {key: {} for key in bindings},
            "HostConfig": host,
        }
        if conn.get("command"):
            config["Cmd"] = list(conn["command"])
        signal = self._stop_signal(config.get("Cmd"), image)
        if signal:
            config["StopSignal"] = signal
        return config

    def _stop_signal(self, cmd: list | None, image: str) -> str:
        """connection.stop_signal; "auto" (the default): SIGHUP when the container's command
        is a shell. An interactive shell (it has a TTY here) ignores SIGTERM, so even under
        an init every stop would wait the full timeout; a hang-up ends it at once. Any
        other command keeps the image's stop signal."""
        setting = str(self.config.connection.get("stop_signal", "auto"))
        if setting != "auto":
            return setting
        if not cmd:
            try:
                found = self.api.inspect_image(image).get("Config") or {}
            except Exception:  # only a hint; the create itself reports a missing image
                return ""
            if found.get("Entrypoint"):
                return ""
            cmd = found.get("Cmd")
        return "SIGHUP" if cmd and os.path.basename(str(cmd[0])) in SHELLS else ""

    @staticmethod
    def _config_from(old: dict, image: str, bindings: dict) -> dict[str, Any]:
        """The old container's settings, with another image and port bindings."""
        c, h = old.get("Config", {}), old.get("HostConfig", {})
        keys = (
            "Hostname",
            "Env",
            "Cmd",
            "Entrypoint",
            "Labels",
            "Tty",
            "OpenStdin",
            "WorkingDir",
            "User",
            "StopSignal",
        )
        config = {k: c[k] for k in keys if c.get(k) is not None}
        config["Image"] = image
        config["ExposedPorts"] = {key: {} for key in bindings}
        host_keys = ("NanoCpus", "Memory", "MemorySwap", "Mounts", "RestartPolicy", "StorageOpt", "NetworkMode", "Init")
        config["HostConfig"] = {k: h[k] for k in host_keys if h.get(k) is not None}
        config["HostConfig"]["Mounts"] = ContainerSwap._mounts_of(old)
        config["HostConfig"]["PortBindings"] = bindings
        return config

    @staticmethod
    def _mounts_of(old: dict) -> list[dict]:
        """The old container's mounts as HostConfig.Mounts. Docker echoes HostConfig.Mounts;
        Podman leaves it empty and reports them only in the top-level ``Mounts`` (and as
        ``HostConfig.Binds`` strings), so they are rebuilt from there."""
        mounts = (old.get("HostConfig") or {}).get("Mounts")
        if mounts:
            return [dict(m) for m in mounts]
        out = []
        for m in old.get("Mounts") or []:
            kind, target = m.get("Type"), m.get("Destination")
            if kind == "volume" and m.get("Name") and target:
                out.append({"Type": "volume", "Source": m["Name"], "Target": target, "ReadOnly": not m.get("RW", True)})
            elif kind == "bind" and m.get("Source") and target:
                out.append({"Type": "bind", "Source": m["Source"], "Target": target, "ReadOnly": not m.get("RW", True)})
        return out

    # -- the swap (port change, rebuild)

    def _swap_name(self, name: str, was_running: bool) -> str:
        return f"{name}-swap-{'running' if was_running else 'stopped'}"

    def _recover_swap(self, name: str, op: str) -> None:
        """Undo a swap a crash left halfway: the container renamed aside is the truth."""
        for was_running in (True, False):
            aside = self._ours(self._inspect(self._swap_name(name, was_running), op), name)
            if aside is None:
                continue
            logger.warning("docker %s: repairing an unfinished swap of %s", self.config.name, name)
            current = self._inspect(name, op)
            if current is not None:
                self._call(None, op, self.api.remove_container, current["Id"], force=True, mutation=True)
            self._call(None, op, self.api.rename, aside["Id"], name, mutation=True)
            if was_running:
                self._start_again(name, op)
            return

    def _swap(
        self,
        old: dict,
        name: str,
        new_config: dict,
        cancel: CancelToken,
        progress: ProgressCallback,
        op: str,
        *,
        commit: bool,
        start: bool | None = None,
    ) -> dict:
        was_running = bool(old.get("State", {}).get("Running"))
        start = was_running if start is None else start
        stopping = False
        committed = ""
        state_tag = f"{STATE_REPO}/{name}:current"
        try:
            if was_running:
                # Inside the try: a cancel or a failure while stopping brings the old
                # container back as it was (running), like one later in the swap.
                progress(20, "stopping the container")
                stopping = True
                self._stop(name, cancel, self.swap_stop_timeout, op)
                stopping = False
            if commit:
                progress(35, "saving the container's filesystem")
                committed = self._call(
                    cancel,
                    op,
                    self.api.commit,
                    old["Id"],
                    repository=f"{STATE_REPO}/{name}",
                    tag="current",
                    mutation=True,
                ).get("Id", "")
                new_config["Image"] = state_tag
            cancel.raise_if_cancelled()
            self._call(cancel, op, self.api.rename, old["Id"], self._swap_name(name, was_running), mutation=True)
            progress(55, "creating the new container")
            created = self._call(
                None, op, self.api.create_container_from_config, new_config, name, mutation=True, creating=True
            )
            if start:
                progress(70, "starting the new container")
                self._call(None, op, self.api.start, created["Id"], mutation=True)
        except BaseException as exc:
            logger.warning(
                "docker %s: swap of %s failed (%s); restoring the old container", self.config.name, name, exc
            )
            try:
                self._recover_swap(name, op)  # renamed aside: back under its name, started if it ran
                if was_running:
                    self._restore_running(old["Id"], op, stop_in_flight=stopping)
                if committed:
                    # The commit of this attempt goes; the tag goes back to the image the
                    # old container runs on (delete removes the state image by its tag).
                    if old.get("Config", {}).get("Image") == state_tag:
                        self._call(None, op, self.api.tag, old["Image"], f"{STATE_REPO}/{name}", "current", force=True)
                    self._drop_image(committed, op)
            except ProviderError as undo:
                logger.error("docker %s: could not restore %s: %s", self.config.name, name, undo)
            raise
        progress(85, "removing the old container")
        self._call(None, op, self.api.remove_container, old["Id"], force=True, mutation=True)
        if old.get("Config", {}).get("Image") == state_tag and old.get("Image") != created_image(self, created, op):
            self._drop_image(old["Image"], op)  # the previous commit, untagged and now unused
        return created

    def _drop_image(self, image_id: str, op: str) -> None:
        try:
            self._call(None, op, self.api.remove_image, image_id, mutation=True)
        except ProviderError as exc:  # in use or gone: nothing to free
            logger.info("docker %s: image %s kept: %s", self.config.name, image_id[:19], exc)

    def _restore_running(self, container_id: str, op: str, *, stop_in_flight: bool) -> None:
        """Start the old container again. A stop abandoned on cancel still runs on the
        daemon: wait for it to end first (a stop of a stopping container waits for
        it), or it would stop the container right after this start."""
        if stop_in_flight:
            try:
                self._call(None, op, self.api.stop, container_id, timeout=self.swap_stop_timeout, mutation=True)
            except (ProviderError, AmbiguousOutcome) as exc:
                logger.warning("docker %s: waiting for the stop of %s: %s", self.config.name, container_id[:12], exc)
        if not (self._inspect(container_id, op) or {}).get("State", {}).get("Running"):
            self._start_again(container_id, op)

    def _start_again(self, container: str, op: str, seconds: float = 10.0) -> None:
        """Start the old container on the ports it had. Podman frees the ports of the
        new container it just removed a moment later: "address already in use" is
        retried for a few seconds."""
        limit = time.monotonic() + seconds
        while True:
            try:
                self._call(None, op, self.api.start, container, mutation=True)
                return
            except ConflictError:
                if time.monotonic() > limit:
                    raise
                time.sleep(0.3)

    def _stop(self, name: str, cancel: CancelToken, timeout: int, op: str) -> None:
        remaining = cancel.remaining()
        t = int(max(0, min(timeout, remaining - 1))) if remaining is not None else int(timeout)
        try:
            self._call(cancel, op, self.api.stop, name, timeout=t, mutation=True, abandon=True)
        except AmbiguousOutcome:
            pass  # read back below
        state = (self._inspect(name, op) or {}).get("State", {})
        if state.get("Running"):
            try:
                self._call(cancel, op, self.api.kill, name, mutation=True)
            except ConflictError:
                pass  # stopped meanwhile
