"""Shared pieces of the benchmarks: environment, data reset, worker processes, percentiles."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def setup_django(database: str, broker: str, **extra: str) -> None:
    """Configure the environment (inherited by the worker processes) and start Django."""
    os.environ.update(
        {
            "DATABASE_URL": database,
            "Q_BROKER": broker,
            "TASK_EXTRA_OPERATIONS": "bench.pipeline.noop_ops",
            "LOG_LEVEL": "warning",
            "Q_POLL_SECONDS": "0.02",
            "DJANGO_SETTINGS_MODULE": "config.settings",
            **extra,
        }
    )
    ensure_database(database)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def ensure_database(url: str) -> None:
    if not url.startswith(("mysql", "mariadb")):
        return
    import MySQLdb

    from config.env import parse_database_url

    d = parse_database_url(url, ROOT)
    conn = MySQLdb.connect(host=d["HOST"], user=d["USER"], passwd=d["PASSWORD"], port=int(d["PORT"]))
    conn.cursor().execute(f"CREATE DATABASE IF NOT EXISTS `{d['NAME']}` CHARACTER SET utf8mb4")
    conn.close()


def reset_data(*, wait_purge: bool = True) -> None:
    """Every task, instance and provider gone (and the broker's jobs). ``wait_purge``: then wait
    until InnoDB purged them (a shared server's history list may never get short: bench/live)."""
    from django_q.models import OrmQ

    from tasks.models import Instance, PortMapping, Provider, Task, TaskEvent, TaskSecret, UserQuota, Worker

    for model in (TaskEvent, TaskSecret, PortMapping):
        model.objects.all().delete()
    Instance.objects.update(active_task=None)
    Worker.objects.all().delete()
    Task.objects.all().delete()
    Instance.objects.all().delete()
    Provider.objects.all().delete()
    UserQuota.objects.all().delete()
    OrmQ.objects.all().delete()
    if os.environ.get("Q_BROKER") == "redis":
        import redis

        redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")).flushdb()
    if wait_purge:
        wait_for_purge()


def wait_for_purge(limit: int = 500, timeout: float = 120) -> None:
    """MySQL/MariaDB: wait until InnoDB purged the rows just deleted.

    The purge runs in the background after a mass delete; left running, it would
    take its CPU and undo-log work out of the next measurement.
    """
    from django.db import connection

    if connection.vendor != "mysql":
        return
    deadline = time.monotonic() + timeout
    with connection.cursor() as cur:
        while time.monotonic() < deadline:
            cur.execute("SHOW GLOBAL STATUS LIKE 'Innodb_history_list_length'")
            row = cur.fetchone()
            if row is None or int(row[1]) < limit:
                return
            time.sleep(0.5)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(round(q * len(values) + 0.5)) - 1))]


def spawn(cmd: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), *cmd],
        cwd=ROOT,
        env={**os.environ, **env},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=open(Path(tempfile.gettempdir()) / "bench.log", "ab"),
    )


def stop(proc: subprocess.Popen, node: str | None = None) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    if node:
        from tests.engine.harness import kill_node_processes

        kill_node_processes(node)


def in_threads(n: int, items: list, fn) -> None:
    from django.db import connection

    chunks = [items[i::n] for i in range(n)]

    def run(chunk):
        for item in chunk:
            fn(item)
        connection.close()

    threads = [threading.Thread(target=run, args=(c,)) for c in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def wait_all_done(ids: list[int], timeout: float = 900) -> None:
    from tasks.models import Task

    deadline = time.monotonic() + timeout
    while Task.objects.filter(pk__in=ids).exclude(status="completed").exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"tasks did not finish in {timeout} s")
        time.sleep(0.1)


def cpu_snapshot() -> dict[int, tuple[str, float]]:
    """CPU seconds used so far by every process on the machine, with a role name.

    A process's own time plus its reaped children's: django-q2 recycles its workers
    (every 500 jobs), and a recycled worker's time lives on in its sentinel's.
    """
    import psutil

    me = os.getpid()
    snap = {}
    for proc in psutil.process_iter(["pid", "name", "cmdline", "cpu_times"]):
        times = proc.info["cpu_times"]
        if times is None:
            continue
        cmd = " ".join(proc.info["cmdline"] or [])
        name = proc.info["name"] or ""
        if proc.info["pid"] == me:
            role = "benchmark process (producers)"
        elif "mariadbd" in name or "mysqld" in name:
            role = "database server"
        elif "redis-server" in name:
            role = "redis"
        elif "run_pool" in cmd or "qcluster" in cmd:
            # Workers, pushers, monitors and sentinels look alike without setproctitle, which
            # is left out on purpose: it overwrites /proc/<pid>/environ, where the test
            # harness finds a machine's processes by WORKER_NODE.
            role = "django-q2 processes (task code runs in their workers)"
        elif "run_workers" in cmd:
            role = "run_workers supervisor"
        else:
            role = "other"
        snap[proc.info["pid"]] = (role, times.user + times.system + times.children_user + times.children_system)
    return snap


# Server-wide counters (MySQL/MariaDB SHOW GLOBAL STATUS) and how they are reported per task.
DB_COUNTERS = {
    "Questions": "statements",
    "Com_commit": "commits",
    "Com_insert": "inserts",
    "Com_update": "updates",
    "Innodb_row_lock_waits": "row lock waits",
}


def db_counters() -> dict[str, int]:
    """The database server's DB_COUNTERS now (empty off MySQL/MariaDB). Counts every client's work."""
    from django.db import connection

    if connection.vendor != "mysql":
        return {}
    names = ", ".join(f"'{n}'" for n in DB_COUNTERS)
    with connection.cursor() as cur:
        cur.execute(f"SHOW GLOBAL STATUS WHERE Variable_name IN ({names})")
        return {name: int(value) for name, value in cur.fetchall()}


def db_report(before: dict[str, int], after: dict[str, int], tasks: int) -> list[tuple[str, float]]:
    """Each counter's growth per task, in DB_COUNTERS order (the benchmark's own polling included)."""
    return [(label, (after[name] - before[name]) / tasks) for name, label in DB_COUNTERS.items() if name in before]


def cpu_report(before: dict, after: dict, tasks: int) -> list[tuple[str, float]]:
    """CPU milliseconds per task by role between two snapshots (processes born in between count whole)."""
    totals: dict[str, float] = {}
    for pid, (role, cpu) in after.items():
        start = before.get(pid, (role, 0.0))[1]
        totals[role] = totals.get(role, 0.0) + max(0.0, cpu - start)
    rows = sorted(((role, secs * 1000 / tasks) for role, secs in totals.items()), key=lambda r: -r[1])
    return [*rows, ("total", sum(r[1] for r in rows))]
