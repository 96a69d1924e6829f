"""A provider host for tests: a command interpreter (iptables subset, pct exec chpasswd)
usable directly as a HostShell, or behind a real SSH server (paramiko) on 127.0.0.1.
"""

from __future__ import annotations

import shlex
import socket
import threading
import time
from collections.abc import Sequence

import paramiko


class FakeHostShell:
    """Records every call; keeps iptables rules and container passwords; failures on demand."""

    def __init__(self):
        self.calls: list[tuple[list[str], str | None]] = []
        self.rules: dict[str, dict[str, list[list[str]]]] = {
            "nat": {"PREROUTING": [], "POSTROUTING": []},
            "filter": {"FORWARD": [], "INPUT": []},
        }
        self.passwords: dict[str, str] = {}  # vmid -> root password set through pct exec
        self.stopped_cts: set[str] = set()
        self.fail_next: list[tuple[int, str]] = []  # (rc, stderr) for the next runs
        self.raise_next: list[Exception] = []
        self.delay = 0.0  # seconds each command takes
        self.lock = threading.Lock()

    def run(self, argv: Sequence[str], stdin: bytes | str | None = None, timeout: float = 60) -> tuple[int, str, str]:
        argv = list(argv)
        if isinstance(stdin, bytes):
            stdin = stdin.decode()
        if self.delay:
            time.sleep(self.delay)
        with self.lock:
            self.calls.append((argv, stdin))
            if self.raise_next:
                raise self.raise_next.pop(0)
            if self.fail_next:
                rc, err = self.fail_next.pop(0)
                return rc, "", err
            if argv and argv[0] == "iptables":
                return self._iptables(argv[1:])
            if argv[:2] == ["pct", "exec"] and argv[3:] == ["--", "chpasswd"]:
                vmid = argv[2]
                if vmid in self.stopped_cts:
                    return 255, "", f"CT {vmid} not running\n"
                for line in (stdin or "").splitlines():
                    user, _, password = line.partition(":")
                    if user == "root":
                        self.passwords[vmid] = password
                return 0, "", ""
            if argv[:1] == ["netfilter-persistent"]:
                return 0, "run-parts: executing save\n", ""
        return 127, "", f"{argv[0] if argv else ''}: command not found\n"

    def rule_lines(self, table: str, chain: str) -> list[str]:
        return [shlex.join(rule) for rule in self.rules[table][chain]]

    def _iptables(self, args: list[str]) -> tuple[int, str, str]:
        table = "filter"
        rest: list[str] = []
        i = 0
        while i < len(args):
            if args[i] == "-w":
                i += 2 if i + 1 < len(args) and args[i + 1].isdigit() else 1
                continue
            if args[i] == "-t":
                table = args[i + 1]
                i += 2
                continue
            rest = args[i:]
            break
        if len(rest) < 2 or table not in self.rules or rest[1] not in self.rules[table]:
            return 1, "", "iptables: No chain/target/match by that name.\n"
        action, chain, spec = rest[0], rest[1], rest[2:]
        rules = self.rules[table][chain]
        if action == "-S":
            lines = [f"-P {chain} ACCEPT"] + [f"-A {chain} {shlex.join(r)}" for r in rules]
            return 0, "\n".join(lines) + "\n", ""
        if action == "-A":
            rules.append(spec)
            return 0, "", ""
        if action in ("-D", "-C"):
            if spec in rules:
                if action == "-D":
                    rules.remove(spec)
                return 0, "", ""
            return 1, "", "iptables: Bad rule (does a matching rule exist in that chain?).\n"
        return 2, "", f"iptables: unknown action {action}\n"


class FakeSSHServer:
    """A real SSH server (paramiko) on 127.0.0.1 that runs exec requests on a FakeHostShell."""

    def __init__(self, shell: FakeHostShell, host_key: paramiko.PKey, authorized_key: paramiko.PKey):
        self.shell = shell
        self.host_key = host_key
        self.authorized = authorized_key
        self.commands: list[str] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._transports: list[paramiko.Transport] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def host_key_line(self) -> str:
        return f"{self.host_key.get_name()} {self.host_key.get_base64()}"

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()
        for transport in self._transports:
            transport.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            transport = paramiko.Transport(conn)
            transport.add_server_key(self.host_key)
            self._transports.append(transport)
            try:
                transport.start_server(server=_Interface(self))
            except (paramiko.SSHException, EOFError, OSError):
                continue

    def _exec(self, channel: paramiko.Channel, command: str) -> None:
        self.commands.append(command)
        stdin = bytearray()
        while True:
            data = channel.recv(65536)
            if not data:
                break
            stdin += data
        rc, out, err = self.shell.run(shlex.split(command), stdin.decode() if stdin else None)
        if out:
            channel.sendall(out.encode())
        if err:
            channel.sendall_stderr(err.encode())
        channel.send_exit_status(rc)
        channel.close()


class _Interface(paramiko.ServerInterface):
    def __init__(self, server: FakeSSHServer):
        self.server = server

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return paramiko.OPEN_SUCCEEDED if kind == "session" else paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        if username == "root" and key.get_base64() == self.server.authorized.get_base64():
            return paramiko.AUTH_SUCCESSFUL
        return paramiko.AUTH_FAILED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        threading.Thread(target=self.server._exec, args=(channel, command.decode()), daemon=True).start()
        return True
