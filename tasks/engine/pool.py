"""A machine's worker pool, as the supervisor starts it (``manage.py run_pool``).

The pool process runs django-q2 clusters (each a sentinel with its pusher,
monitor and workers, on the same broker): the base cluster from the start,
extra ones when the supervisor asks (a line ``grow <workers>`` on its stdin),
stopped again when it says so (``retire <name>``). It forks each cluster from
itself, so an extra cluster is serving within a fraction of a second instead
of the seconds a new interpreter takes to import Django. What it runs it
writes to a status file (``WORKER_POOL_STATUS_FILE``: name, sentinel pid,
workers, base of each cluster, and how many workers wait for a job: the most
seen over the last IDLE_WINDOW_SECONDS) for the supervisor.

Before it forks anything, this process

- imports everything a task needs (the engine, every operation, every driver and
  the client libraries they use), so the forked workers share those pages
  instead of each importing its own copy;
- collects and freezes the garbage collector's heap (``gc.freeze``): a
  collection in a worker no longer writes to the inherited objects' headers,
  which would copy their pages, so a worker's PSS is its own work;
- ties itself and every process it forks to its parent: each one gets
  ``PR_SET_PDEATHSIG`` = SIGKILL, so when the supervisor dies (kill -9,
  crash), its pool dies at once instead of serving jobs unsupervised with old
  code. A child whose parent died before the signal was set exits by itself.

  Its stdin closing (the supervisor gone) stops it too.

The broker (tasks.engine.broker) serves every provider queue listed in
``WORKER_QUEUES_FILE``. django-q2's Sentinel stops its pusher first and lets a
job in progress end, so retiring a cluster never touches a running task.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import json
import logging
import os
import select
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
PRELOAD = (
    "django_q.cluster",
    "django_q.worker",
    "tasks.engine.worker",
    "tasks.engine.dispatch",
    "tasks.engine.transitions",
    "tasks.engine.health",
    "tasks.engine.maintenance",
    "tasks.reconcile",
    "tasks.traffic",
)

_parent: dict[str, int] = {}


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def die_with_parent(expected_parent: int | None) -> None:
    """SIGKILL this process when its parent dies; exit now if it already has."""
    if not sys.platform.startswith("linux"):
        return
    if _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        logger.warning("pool: prctl(PR_SET_PDEATHSIG) failed: errno %s", ctypes.get_errno())
        return
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)  # the parent died before the signal was set


def _before_fork() -> None:
    _parent["pid"] = os.getpid()


def _after_fork_in_child() -> None:
    die_with_parent(_parent.get("pid"))


def tie_to_parent(supervisor_pid: int | None) -> None:
    """This process and every process it forks die with their parent."""
    die_with_parent(supervisor_pid)
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def preload() -> list[str]:
    """Import what the workers will need; return the modules that could not be imported."""
    from providers.base import import_drivers
    from tasks.operations import get_operation

    get_operation("create")  # loads every operation module (and TASK_EXTRA_OPERATIONS)
    import_drivers()
    missing = []
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError as exc:  # an optional client library absent: the driver loads on use
            missing.append(f"{name} ({exc})")
    return missing


def warm() -> None:
    """Do once, before forking, the work every worker would otherwise repeat at its first task.

    A forked worker inherits this process's caches: the database wrapper's server data and
    features (read from the server at the first connection), each model's field maps and
    converters (built by the first query on it), the hot paths' tables (tasks.engine.sql).
    Cold, a worker spent about 20 ms of CPU on them before its first claim; with 80 tasks
    admitted at once on two cores that is most of the delay before the last one starts.
    Read-only; a database that cannot be reached only leaves the caches cold.
    """
    from django.apps import apps
    from django.db import DatabaseError, connection

    from tasks.engine import sql

    try:
        connection.ensure_connection()
        for model in apps.get_app_config("tasks").get_models():
            sql.table(model)
            model._default_manager.filter(pk=None).first()
        sql.for_update()  # (the locking reads' clause: a backend feature read once)
    except DatabaseError as exc:
        logger.warning("pool: could not warm the database caches: %s", exc)


def _sentinel(stop_event, start_event, flags: list, scheduler: bool) -> None:
    """A forked cluster: django-q2's Sentinel with a worker per busy flag, its pusher gated."""
    from django_q.brokers import get_broker
    from django_q.conf import Conf

    Conf.WORKERS = len(flags)  # (this process's own copy: the sentinel sizes its pool from it)
    Conf.SCHEDULER = scheduler
    os.environ["WORKER_POOL_NAME"] = multiprocessing_name()
    gated_sentinel_class()(flags, stop_event, start_event, uuid.uuid4(), get_broker())


class GatedQueue:
    """A worker's view of its cluster's task queue: taking a job raises the worker's busy
    flag, asking for the next one lowers it (shared memory the pusher reads)."""

    def __init__(self, queue, flag):
        self.queue, self.flag = queue, flag

    def get(self, *args, **kwargs):
        self.flag.value = 0
        item = self.queue.get(*args, **kwargs)
        self.flag.value = 1
        return item

    def __getattr__(self, name):
        return getattr(self.queue, name)


class Gate:
    """The pusher takes a job from the broker only for a worker that is free to run it.

    django-q2's pusher pulls whenever its task queue has room, so a cluster whose
    workers are all busy holds up to two jobs (one queued, one in hand) that other
    clusters could run: with one pool serving every provider, another provider's
    job would wait behind long tasks. Here a job is pulled only while more workers
    wait for work than jobs are queued for them; otherwise jobs stay in the broker,
    where an idle cluster (or a new one: the supervisor grows the pool when they
    wait) takes them.
    """

    POLL = 0.005

    def __init__(self, flags, queue):
        self.flags, self.queue = flags, queue

    def free(self) -> int:
        idle = sum(1 for flag in self.flags if flag.value == 0)
        try:
            queued = self.queue.qsize()
        except NotImplementedError:  # (macOS) no qsize: fall back to an empty-queue check
            queued = 0 if self.queue.empty() else 1
        return idle - queued

    def wait(self, timeout: float) -> bool:
        """True as soon as a worker is free for one more job; False after ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.free() <= 0:
            if time.monotonic() >= deadline:
                return False
            time.sleep(self.POLL)
        return True


_gated: list = []


def gated_sentinel_class():
    """django-q2's Sentinel whose workers report busy/idle and whose pusher waits for a free one."""
    if _gated:
        return _gated[0]
    from multiprocessing import Value

    from django_q.cluster import Sentinel
    from django_q.worker import worker

    class GatedSentinel(Sentinel):
        def __init__(self, flags: list, *args, **kwargs):
            # One busy flag per worker slot, made by the pool process before it forked this
            # cluster (the pool and the pusher read them all); a slot's flag is 1 (busy)
            # until a worker waits on it.
            self.flags = flags
            self.slot_process: list = [None] * len(self.flags)
            super().__init__(*args, **kwargs)

        def spawn_worker(self):
            slot = next(
                i for i, p in enumerate(self.slot_process) if p is None or not p.is_alive()
            )  # a dead worker's slot: django-q2 spawns one worker for each it lost
            self.flags[slot].value = 1
            queue = GatedQueue(self.task_queue, self.flags[slot])
            self.spawn_process(worker, queue, self.result_queue, Value("f", -1), self.timeout)
            self.slot_process[slot] = self.pool[-1]

        def spawn_pusher(self):
            self.broker.gate = Gate(self.flags, self.task_queue)
            return super().spawn_pusher()

        def spawn_cluster(self):
            # django-q2 forks the workers first and the pusher last: a cluster of 50 would
            # take no job until its last worker is forked. With the gate, the pusher can
            # come first: it hands out jobs as the workers appear.
            from django import db
            from django_q.status import Stat

            self.pool = []
            Stat(self).save()
            db.connections.close_all()
            self.monitor = self.spawn_monitor()
            self.pusher = self.spawn_pusher()
            for _ in range(self.pool_size):
                self.spawn_worker()

    _gated.append(GatedSentinel)
    return GatedSentinel


@dataclass
class Member:
    name: str
    workers: int
    base: bool
    process: object
    stop_event: object
    start_event: object
    retiring: bool = False
    running: bool = False
    flags: list = field(default_factory=list)  # its workers' busy flags (GatedSentinel)


# The pool reports its idle workers as the most seen over this window: a report of none
# means every worker stayed busy that long, not that one was between two jobs.
IDLE_WINDOW_SECONDS = 0.3


class Pool:
    def __init__(self, status_file: str | None):
        from django_q.cluster import get_mp_context

        self.ctx = get_mp_context()
        self.status_file = status_file
        self.members: list[Member] = []
        self.serial = 0
        self.stopping = False
        self.idle_seen: list[tuple[float, int]] = []  # (monotonic, idle workers or -1: none serving)
        self.idle_workers: int | None = None  # as last written to the status file

    def add(self, workers: int, *, base: bool) -> Member:
        from django.db import connections
        from django_q.conf import Conf

        connections.close_all()
        self.serial += 1
        stop_event, start_event = self.ctx.Event(), self.ctx.Event()
        scheduler = base and Conf.SCHEDULER
        flags = [self.ctx.Value("b", 1, lock=False) for _ in range(workers)]
        process = self.ctx.Process(
            target=_sentinel, args=(stop_event, start_event, flags, scheduler), name=f"pool-{self.serial}"
        )
        process.start()
        member = Member(f"pool-{self.serial}", workers, base, process, stop_event, start_event, flags=flags)
        self.members.append(member)
        self.write_status()
        return member

    def check_started(self) -> None:
        """Note the clusters whose sentinel says they run (workers, monitor and pusher up)."""
        changed = False
        for m in self.members:
            if not m.running and m.start_event.is_set():
                m.running = changed = True
                kind = "base" if m.base else "extra"
                logger.info("pool: %s cluster %s started (%d workers, pid %s)", kind, m.name, m.workers, m.process.pid)
        if changed:
            self.write_status()

    def retire(self, name: str) -> None:
        for member in self.members:
            if member.name == name and not member.retiring:
                member.retiring = True
                member.stop_event.set()
                logger.info("pool: stopping cluster %s", name)
        self.write_status()

    def reap(self) -> None:
        changed = False
        for member in list(self.members):
            if member.process.is_alive():
                continue
            member.process.join()
            self.members.remove(member)
            changed = True
            if not member.retiring and not self.stopping:
                logger.warning("pool: cluster %s exited (%s); starting it again", member.name, member.process.exitcode)
                self.add(member.workers, base=member.base)
        if changed:
            self.write_status()

    def stop(self) -> None:
        self.stopping = True
        for member in self.members:
            member.stop_event.set()
        for member in self.members:
            member.process.join()
        self.members = []
        self.write_status()

    def check_idle(self, now: float) -> None:
        """Count the serving clusters' workers waiting for a job; report the most seen over
        IDLE_WINDOW_SECONDS when that changes. The supervisor grows the pool ahead of the
        next job when none was idle all that time (another provider's job would wait for
        the growth), and keeps an idle extra cluster while it is the only room left."""
        serving = [m for m in self.members if m.running and not m.retiring]
        idle = sum(1 for m in serving for flag in m.flags if flag.value == 0) if serving else -1
        self.idle_seen = [(t, n) for t, n in self.idle_seen if now - t < IDLE_WINDOW_SECONDS]
        self.idle_seen.append((now, idle))
        most = max(n for _, n in self.idle_seen)
        reported = None if most < 0 else most
        if reported != self.idle_workers:
            self.idle_workers = reported
            self.write_status()

    def write_status(self) -> None:
        if not self.status_file:
            return
        rows = [
            {
                "name": m.name,
                "pid": m.process.pid,
                "workers": m.workers,
                "base": m.base,
                "retiring": m.retiring,
                "running": m.running,
            }
            for m in self.members
        ]
        tmp = f"{self.status_file}.tmp"
        with open(tmp, "w") as f:
            json.dump({"pid": os.getpid(), "clusters": rows, "idle_workers": self.idle_workers}, f)
        os.replace(tmp, self.status_file)


def multiprocessing_name() -> str:
    import multiprocessing

    return multiprocessing.current_process().name


def read_status(path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return {"pid": None, "clusters": []}


def run() -> None:
    supervisor = os.environ.get("WORKER_SUPERVISOR_PID")
    tie_to_parent(int(supervisor) if supervisor else None)
    missing = preload()
    if missing:
        logger.info("pool: not preloaded: %s", ", ".join(missing))
    warm()
    from django.db import connections
    from django_q.conf import Conf

    connections.close_all()  # nothing open to share with the forked processes
    gc.collect()
    gc.freeze()
    pool = Pool(os.environ.get("WORKER_POOL_STATUS_FILE"))
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    signal.signal(signal.SIGINT, lambda *a: stop.append(1))
    pool.add(int(Conf.WORKERS), base=True)
    commands = CommandReader(sys.stdin.fileno())
    while not stop:
        try:
            lines = commands.read(0.1)
        except InterruptedError:
            continue
        if lines is None:
            logger.warning("pool: the supervisor is gone; stopping")
            break
        for line in lines:
            _command(pool, line.split())
        pool.check_started()
        pool.reap()
        pool.check_idle(time.monotonic())
    pool.stop()


class CommandReader:
    """Whole lines from the supervisor's pipe, every line that has arrived.

    (A buffered ``readline`` after ``select`` would leave the other lines of one write
    in its buffer, where select no longer sees them: a grow of five clusters would
    start one, and the rest only when the next command arrives.)
    """

    def __init__(self, fd: int):
        self.fd, self.buffer = fd, b""

    def read(self, timeout: float) -> list[str] | None:
        """The complete lines received within ``timeout``; None once the pipe is closed."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return []
        chunk = os.read(self.fd, 65536)
        if not chunk:
            return None
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        return [line.decode(errors="replace") for line in lines if line.strip()]


def _command(pool: Pool, words: list[str]) -> None:
    if len(words) == 2 and words[0] == "grow" and words[1].isdigit() and int(words[1]) > 0:
        pool.add(int(words[1]), base=False)
    elif len(words) == 2 and words[0] == "retire":
        pool.retire(words[1])
    else:
        logger.error("pool: unknown command %r", " ".join(words))
