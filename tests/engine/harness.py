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
