"""A small channel to run commands on a provider's host, and the NAT rules kept through it.

Some things have no API: a Proxmox container's root password (``pct exec``) and
NAT port mappings (iptables DNAT on the node). Drivers reach the host through
the ``HostShell`` protocol, so tests can hand them a fake that records calls and
the real thing is one paramiko implementation.

Secrets travel on stdin, never in argv: argv is visible in the host's process
list and in shell history, stdin is not.
"""

from __future__ import annotations

import base64
import io
import logging
import shlex
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from providers.base import AuthError, CancelToken, PermanentError, PortSpec, RetryableError, UnreachableError

logger = logging.getLogger(__name__)


class HostShell(Protocol):
    def run(self, argv: Sequence[str], stdin: bytes | str | None = None, timeout: float = 60) -> tuple[int, str, str]:
        """Run ``argv`` on the host; return (exit code, stdout, stderr).

        Raises RetryableError when the host cannot be reached or the command
        does not finish within ``timeout`` seconds, AuthError when the host
        refuses us or is not the host we pinned.
        """


# ----------------------------------------------------------------- paramiko


def _load_private_key(pem: str):
    import paramiko

    errors = []
    for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return cls.from_private_key(io.StringIO(pem))
        except (paramiko.SSHException, ValueError) as exc:
            errors.append(f"{cls.__name__}: {exc}")
    raise AuthError("ssh private key could not be read (" + "; ".join(errors) + ")", op="ssh")


def _load_host_key(line: str):
    import paramiko

    parts = line.split()
    if len(parts) < 2:
        raise PermanentError("ssh host_key must look like 'ssh-ed25519 AAAA...'", op="ssh")
    try:
        return paramiko.PKey.from_type_string(parts[0], base64.b64decode(parts[1]))
    except Exception as exc:
        raise PermanentError(f"ssh host_key is not a valid public key: {exc}", op="ssh") from exc


class ParamikoHostShell:
    """HostShell over SSH (paramiko), one connection reused for the driver's lifetime.

    The host key is pinned (``host_key``, as in known_hosts); without one the
    connection is refused unless ``insecure_skip_host_key`` is set, because a
    host channel that runs iptables and chpasswd as root must not talk to an
    impostor.
    """

    def __init__(
        self,
        host: str,
        *,
        port: int = 22,
        username: str = "root",
        private_key: str | None = None,
        password: str | None = None,
        host_key: str | None = None,
        insecure_skip_host_key: bool = False,
        connect_timeout: float = 10.0,
    ):
        self.host, self.port, self.username = host, int(port), username
        self._private_key = private_key
        self._password = password
        self._host_key = host_key
        self._insecure = insecure_skip_host_key
        self.connect_timeout = connect_timeout
        self._client = None
        self._lock = threading.Lock()

    def _connect(self):
        import paramiko

        client = paramiko.SSHClient()
        if self._host_key:
            key = _load_host_key(self._host_key)
            name = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
            client.get_host_keys().add(name, key.get_name(), key)
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
        elif self._insecure:
            client.set_missing_host_key_policy(paramiko.WarningPolicy())
        else:
            raise PermanentError("ssh: no host_key pinned for the provider's host", op="ssh")
        pkey = _load_private_key(self._private_key) if self._private_key else None
        try:
            client.connect(
                self.host,
                port=self.port,
                username=self.username,
                pkey=pkey,
                password=self._password,
                timeout=self.connect_timeout,
                banner_timeout=self.connect_timeout,
                auth_timeout=self.connect_timeout,
                allow_agent=False,
                look_for_keys=False,
            )
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise AuthError(f"ssh: host key of {self.host} does not match the pinned key", op="ssh") from exc
        except paramiko.AuthenticationException as exc:
            client.close()
            raise AuthError(f"ssh: authentication to {self.username}@{self.host} failed", op="ssh") from exc
        except paramiko.SSHException as exc:
            client.close()
            if "known_hosts" in str(exc) or "not found in" in str(exc):
                raise AuthError(f"ssh: host key of {self.host} is not the pinned one", op="ssh") from exc
            raise RetryableError(f"ssh: {exc}", op="ssh") from exc
        except (OSError, EOFError) as exc:
            client.close()
            raise UnreachableError(f"ssh: cannot reach {self.host}:{self.port}: {exc}", op="ssh") from exc
        return client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def run(self, argv: Sequence[str], stdin: bytes | str | None = None, timeout: float = 60) -> tuple[int, str, str]:
        import paramiko

        command = shlex.join(list(argv))
        with self._lock:
            if self._client is None or not self._client.get_transport() or not self._client.get_transport().is_active():
                self._client = self._connect()
            transport = self._client.get_transport()
        try:
            chan = transport.open_session(timeout=self.connect_timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            self.close()
            raise RetryableError(f"ssh: cannot open a channel: {exc}", op="ssh") from exc
        out, err = bytearray(), bytearray()
        try:
            chan.settimeout(timeout)
            chan.exec_command(command)
            if stdin is not None:
                chan.sendall(stdin.encode() if isinstance(stdin, str) else stdin)
            chan.shutdown_write()
            deadline = time.monotonic() + timeout
            while True:
                busy = False
                if chan.recv_ready():
                    out += chan.recv(65536)
                    busy = True
                if chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                    busy = True
                if not busy:
                    if chan.exit_status_ready() and chan.eof_received:
                        break
                    if time.monotonic() >= deadline:
                        raise RetryableError(f"ssh: {argv[0]} did not finish within {timeout:.0f} s", op="ssh")
                    time.sleep(0.01)
            rc = chan.recv_exit_status()
        except (TimeoutError, paramiko.SSHException, OSError, EOFError) as exc:
            raise RetryableError(f"ssh: {argv[0]} interrupted: {exc}", op="ssh") from exc
        finally:
            chan.close()
        return rc, out.decode(errors="replace"), err.decode(errors="replace")


def close_all(closers: list) -> None:
    """Run and forget each close callable (a driver's finalizer); one failing does not stop the rest."""
    while closers:
        close = closers.pop()
        try:
            close()
        except Exception:
            logger.debug("closing %r failed", close, exc_info=True)


def from_config(connection: dict[str, Any], secrets: dict[str, Any]) -> HostShell | None:
    """The host channel described by ``connection["ssh"]``, or None when none is configured."""
    ssh = connection.get("ssh")
    if not ssh:
        return None
    if not isinstance(ssh, dict) or not ssh.get("host"):
        raise PermanentError("connection.ssh must be an object with at least 'host'", op="ssh")
    return ParamikoHostShell(
        ssh["host"],
        port=int(ssh.get("port", 22)),
        username=ssh.get("user", "root"),
        private_key=secrets.get("ssh_private_key"),
        password=secrets.get("ssh_password"),
        host_key=ssh.get("host_key"),
        insecure_skip_host_key=bool(ssh.get("insecure_skip_host_key", False)),
        connect_timeout=float(ssh.get("connect_timeout", 10)),
    )


# ---------------------------------------------------------------- NAT rules


@dataclass
class NatRule:
    table: str
    chain: str
    args: list[str]  # the rule spec after "-A CHAIN"

    @property
    def comment(self) -> str:
        return _option(self.args, "--comment")


def _option(args: list[str], name: str) -> str:
    for i, arg in enumerate(args[:-1]):
        if arg == name:
            return args[i + 1]
    return ""


class IptablesNat:
    """DNAT port mappings on a Linux host, each rule tagged with a comment = PortSpec.handle.

    Idempotent: ``ensure`` lists the tagged rules first and adds only what is
    missing. A tagged rule that points somewhere else is stale (the panel's
    database owns host-port allocation, under the provider row lock), so it is
    replaced. Works with iptables-legacy and iptables-nft (the default on PVE 8).
    """

    def __init__(
        self,
        shell: HostShell,
        *,
        forward_accept: bool = True,
        save_command: Sequence[str] | None = None,
        cancel: CancelToken | None = None,
    ):
        self.shell = shell
        self.forward_accept = forward_accept
        self.save_command = list(save_command) if save_command else None
        self.cancel = cancel

    def _timeout(self, default: float) -> float:
        """Checks the cancel token between commands; a deadline bounds each command."""
        if self.cancel is None:
            return default
        self.cancel.raise_if_cancelled()
        remaining = self.cancel.remaining()
        return default if remaining is None else max(1.0, min(default, remaining))

    def _ipt(self, table: str, *args: str, timeout: float = 30) -> str:
        rc, out, err = self.shell.run(["iptables", "-w", "5", "-t", table, *args], timeout=self._timeout(timeout))
        if rc != 0:
            message = (err or out).strip()
            if "xtables lock" in message or "Resource temporarily unavailable" in message:
                raise RetryableError(f"iptables: {message}", op="nat", remote_message=message)
            raise PermanentError(
                f"iptables -t {table} {' '.join(args[:2])}: {message}", op="nat", remote_message=message
            )
        return out

    def rules(self, handle_prefix: str = "pm-") -> list[NatRule]:
        found = []
        for table, chain in (("nat", "PREROUTING"), ("filter", "FORWARD")):
            for line in self._ipt(table, "-S", chain).splitlines():
                args = shlex.split(line)
                if len(args) < 2 or args[0] != "-A":
                    continue
                rule = NatRule(table, args[1], args[2:])
                if rule.comment.startswith(handle_prefix):
                    found.append(rule)
        return found

    @staticmethod
    def wanted(port: PortSpec, dest_ip: str, forward_accept: bool) -> list[NatRule]:
        proto = port.protocol
        if port.host_port_start == port.host_port_end:
            dport = str(port.host_port_start)
            target = f"{dest_ip}:{port.guest_port_start}"
        else:
            dport = f"{port.host_port_start}:{port.host_port_end}"
            target = f"{dest_ip}:{port.guest_port_start}-{port.guest_port_end}"
            if port.guest_port_start != port.host_port_start:
                # "/base" shifts the range: guest = guest_start + (dport - base).
                target += f"/{port.host_port_start}"
        match = ["-p", proto, "-m", proto]
        pre = []
        if port.listen_ip and port.listen_ip not in ("0.0.0.0", "::"):
            pre = ["-d", f"{port.listen_ip}/32"]
        comment = ["-m", "comment", "--comment", port.handle]
        rules = [
            NatRule(
                "nat",
                "PREROUTING",
                [*pre, *match, "--dport", dport, *comment, "-j", "DNAT", "--to-destination", target],
            )
        ]
        if forward_accept:
            gport = (
                str(port.guest_port_start)
                if port.guest_port_start == port.guest_port_end
                else f"{port.guest_port_start}:{port.guest_port_end}"
            )
            rules.append(
                NatRule(
                    "filter", "FORWARD", ["-d", f"{dest_ip}/32", *match, "--dport", gport, *comment, "-j", "ACCEPT"]
                )
            )
        return rules

    def ensure(self, port: PortSpec, dest_ip: str) -> bool:
        """Make the tagged rules for ``port`` exactly the wanted ones. True when something changed."""
        wanted = self.wanted(port, dest_ip, self.forward_accept)
        have = [r for r in self.rules() if r.comment == port.handle]
        changed = False
        for rule in have:
            if not any(w.table == rule.table and w.chain == rule.chain and w.args == rule.args for w in wanted):
                logger.warning("nat: replacing stale rule %s %s %s", rule.table, rule.chain, " ".join(rule.args))
                self._ipt(rule.table, "-D", rule.chain, *rule.args)
                changed = True
        for rule in wanted:
            if not any(h.table == rule.table and h.chain == rule.chain and h.args == rule.args for h in have):
                self._ipt(rule.table, "-A", rule.chain, *rule.args)
                changed = True
        if changed:
            self._save()
        return changed

    def remove(self, handle: str) -> bool:
        """Delete every rule tagged ``handle``. Nothing to delete is success."""
        changed = False
        for rule in self.rules():
            if rule.comment == handle:
                self._ipt(rule.table, "-D", rule.chain, *rule.args)
                changed = True
        if changed:
            self._save()
        return changed

    def remove_for_addresses(self, addresses: Sequence[str]) -> int:
        """Delete our tagged rules that forward to any of ``addresses`` (a deleted guest's)."""
        targets = {a.split("/")[0] for a in addresses}
        removed = 0
        for rule in self.rules():
            dest = _option(rule.args, "--to-destination").split(":")[0] or _option(rule.args, "-d").split("/")[0]
            if dest in targets:
                self._ipt(rule.table, "-D", rule.chain, *rule.args)
                removed += 1
        if removed:
            self._save()
        return removed

    def _save(self) -> None:
        if not self.save_command:
            return
        rc, out, err = self.shell.run(self.save_command, timeout=self._timeout(60))
        if rc != 0:
            # The live rules are right; only their persistence across a reboot failed.
            logger.warning("nat: %s failed (rc %s): %s", self.save_command[0], rc, (err or out).strip()[:200])
