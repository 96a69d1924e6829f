"""Real worker-tier processes for engine tests (MariaDB: they share the test database)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parents[2]

FAST = {
    "TASK_LEASE_SECONDS": "3",
    "TASK_HEARTBEAT_SECONDS": "1",
    "TASK_CANCEL_POLL_SECONDS": "0.2",
    "TASK_SWEEP_SECONDS": "0.5",
    "TASK_HARD_KILL_GRACE_SECONDS": "1",
    "TASK_DISPATCH_TIMEOUT_SECONDS": "5",
    "TASK_SHUTDOWN_GRACE_SECONDS": "2",
    "Q_POLL_SECONDS": "0.02",
    "TASK_EXTRA_OPERATIONS": "tests.engine.ops_for_tests",
    "LOG_LEVEL": "info",
}


def database_url() -> str:
    d = connection.settings_dict
    return f"mysql://{d['USER']}:{d['PASSWORD']}@{d['HOST'] or '127.0.0.1'}:{d['PORT'] or 3306}/{d['NAME']}"


class WorkerTier:
    """`manage.py run_workers` in a subprocess, standing in for one worker machine."""

    def __init__(self, tmp_path: Path, node: str, exec_log: Path | None = None, **env):
        self.node = node
        self.log_path = tmp_path / f"tier-{node}.log"
        self.env = {**os.environ, **FAST, "DATABASE_URL": database_url(), "WORKER_NODE": node, **env}
        self.env["VAR_DIR"] = str(settings.VAR_DIR)
        if exec_log is not None:
            self.env["TEST_EXEC_LOG"] = str(exec_log)
        self.proc: subprocess.Popen | None = None

    def start(self) -> WorkerTier:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "manage.py"), "run_workers", "--no-maintenance"],
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def stop(self, timeout: float = 30) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode if self.proc else 0

    def kill(self) -> None:
        """The whole machine dies: SIGKILL every process of the tier."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        # Its clusters run in their own sessions; find them by the node name in their environment.
        kill_node_processes(self.node)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> WorkerTier:
        """Until the pool's base cluster runs (its workers take jobs)."""
        wait_until(lambda: "base cluster pool-1 started" in self.log(), timeout, 0.1, f"the pool of {self.node}")
        return self

    def __enter__(self) -> WorkerTier:
        return self.start().wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()
        kill_node_processes(self.node)


def kill_node_processes(node: str) -> None:
    """SIGKILL every process whose environment names this worker node.

    Passes repeat until one finds nothing: a django-q2 sentinel killed late in a
    pass may have respawned a worker after the pass listed the processes.
    """
    import psutil

    for _ in range(20):
        found = 0
        for proc in psutil.process_iter(["pid", "environ"]):
            try:
                env = proc.info["environ"] or {}
            except (psutil.AccessDenied, psutil.NoSuchProcess):
                continue
            if env.get("WORKER_NODE") == node and proc.pid != os.getpid():
                found += 1
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass
        if not found:
            return
        time.sleep(0.05)


def wait_until(predicate, timeout: float, interval: float = 0.05, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {message}")


def read_exec_log(path: Path) -> list[tuple[int, int, float, float]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.startswith("start "):
            continue
        task, pid, start, end = line.split()
        rows.append((int(task), int(pid), float(start), float(end)))
    return rows


def read_exec_starts(path: Path) -> list[int]:
    """Task ids of every execution that began (killed ones included)."""
    if not path.exists():
        return []
    return [int(line.split()[1]) for line in path.read_text().splitlines() if line.startswith("start ")]


def add_simulated_guests(provider, instances) -> None:
    """Bulk-created instances get their running guest on the simulated host too (reconciliation reads it)."""
    from providers.simulated import SimulatedStore

    store = SimulatedStore.for_provider(provider.pk, provider.connection)
    for inst in instances:
        store.put_guest(inst.guest_name, status="running", instance_type=inst.instance_type)


class FreezableProxy:
    """A TCP proxy in front of the database that can stop forwarding without closing
    anything: every statement of its clients then hangs, as on a half-open connection
    or a hung server (their read timeout is all that ends it). New connections hang too."""

    def __init__(self, host: str, port: int):
        import socket
        import threading

        self.target = (host, port)
        self.frozen = threading.Event()
        self.closed = threading.Event()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.sockets: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self) -> str:
        d = connection.settings_dict
        return f"mysql://{d['USER']}:{d['PASSWORD']}@127.0.0.1:{self.port}/{d['NAME']}"

    def freeze(self) -> None:
        self.frozen.set()

    def thaw(self) -> None:
        self.frozen.clear()

    def close(self) -> None:
        self.closed.set()
        self.frozen.clear()
        for sock in [self.listener, *self.sockets]:
            try:
                sock.close()
            except OSError:
                pass

    def _accept(self) -> None:
        import socket
        import threading

        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            self.sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src, dst) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                while self.frozen.is_set() and not self.closed.is_set():
                    time.sleep(0.02)  # held: neither side hears anything
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.close()
            except OSError:
                pass


def calls_overlap(calls: list[dict], limit: int) -> list[str]:
    """What a monitor of a simulated provider's execution record (SimulatedStore.calls) sees
    wrong: two calls on one guest at once, or more calls on the host at once than ``limit``.
    A call with no end (its process died inside it) counts as running until now."""
    problems = []
    now = time.time()
    points = []
    by_guest: dict[str, list[tuple[float, float, dict]]] = {}
    for c in calls:
        end = c["ended"] if c["ended"] is not None else now
        points += [(c["started"], 1), (end, -1)]
        by_guest.setdefault(c["guest"], []).append((c["started"], end, c))
    running = 0
    for at, delta in sorted(points, key=lambda p: (p[0], p[1])):  # an end at the same instant frees first
        running += delta
        if running > limit:
            problems.append(f"{running} calls on the host at {at:.3f} (limit {limit})")
    for guest, spans in by_guest.items():
        spans.sort(key=lambda s: s[0])
        latest = None  # the call that ends last among those begun so far
        for start, end, call in spans:
            if latest is not None and start < latest[1]:
                before = latest[2]
                problems.append(
                    f"{guest}: {call['op']} (pid {call['pid']}) began {latest[1] - start:.3f} s before"
                    f" {before['op']} (pid {before['pid']}) ended"
                )
            if latest is None or end > latest[1]:
                latest = (start, end, call)
    return problems
