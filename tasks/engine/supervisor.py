"""The worker tier of one machine: one pool of django-q2 workers for every provider queue.

``manage.py run_workers`` runs a Supervisor. It

- runs the pool: one django-q2 cluster (``manage.py run_pool``, tasks.engine.pool)
  whose broker serves every provider queue this machine serves (their names in
  a file the brokers re-read, tasks.engine.broker), WORKER_POOL_MIN workers
  while idle. Each provider keeps its own queue; its limit is enforced by
  admission in the database, so the pool only has to be large enough;
- grows the pool while admitted jobs wait in the broker for a free worker (seen
  at two checks in a row): an extra cluster on the same broker with as many
  workers as wait (plus the jobs busy pushers may hold), up to
  WORKER_CONCURRENCY (default: the sum of the limits of the providers served),
  and sends the waiting jobs again so the new workers take them (the first
  claim wins); an extra cluster whose workers ran nothing for
  WORKER_POOL_IDLE_SECONDS is stopped (django-q2 lets a running job end first,
  so running tasks are never touched). A raised provider limit needs no restart.
  It also grows the pool when none of its workers waited for a job over the
  pool's last window (tasks.engine.pool.Pool.check_idle): one provider's
  backlog can fill a small pool, and another provider's next job would wait
  for the growth; such a cluster is kept while it is the only room;
- follows provider changes (the queue list, the concurrency cap) and starts a
  cluster that died again;
- sweeps every TASK_SWEEP_SECONDS: one query over the live tasks tells what
  needs doing (recovery of expired leases, re-dispatch of lost jobs, admission
  of waiting tasks at their provider's task_poll_interval and a safety round
  every 30 s); reconciliation and the registry heartbeat run less often. While
  idle that is one query a second whatever the number of providers;
- runs django-q2's scheduler in its base cluster (the sweep schedule), so no
  cluster of its own is needed for maintenance;
- is the only parent of its pool: each cluster and every process it forks die
  when their parent dies (tasks.engine.pool), a lock file keeps a second
  supervisor of the same node from starting beside it, and leftovers of an old
  one (processes whose supervisor is gone) are killed at start;
- on SIGTERM/SIGINT drains: a drain file tells its workers to claim nothing
  more; running tasks get TASK_SHUTDOWN_GRACE_SECONDS to finish, then their
  operations are cancelled and the tasks handed back (pending again, resumed by
  another worker, not counted as a lost attempt: transitions.release_lease);
  jobs this machine may have taken but not run are sent again for the others.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection
from django.utils import timezone

from tasks import schedules
from tasks.engine import clock, dispatch, health, maintenance, sql, transitions
from tasks.engine.states import EXECUTING, PENDING
from tasks.models import Provider, Task, Worker

logger = logging.getLogger(__name__)

SAFETY_ADMIT_SECONDS = 30.0
POOL_CHECK_SECONDS = 0.25
# How long a grow may take before the supervisor may ask again.
GROW_WAIT_SECONDS = 5.0
# Workers per extra cluster: a grow of 78 is five clusters whose sentinels fork their
# workers side by side (one sentinel forks its own one after another: ~15-40 ms each),
# and an idle one is retired without waiting for the busy rest.
GROW_CLUSTER_WORKERS = 16
# How often a pool whose workers are all busy (none waiting for a job) may ask to grow
# ahead of the next job when the last ask grew nothing (the demand did not call for it).
HEADROOM_RETRY_SECONDS = 5.0
# Jobs waiting in the broker at one check that start a grow at once (a burst); a single
# one must still be waiting at the next check (it may be about to be taken).
GROW_AT_ONCE = 2
PROVIDERS_REFRESH_SECONDS = 2.0
HEARTBEAT_SECONDS = 5.0
RECONCILE_SECONDS = 10.0
OVERDUE_SECONDS = 10.0
# An admitted job not claimed this long after it was sent waits for a worker.
UNCLAIMED_SECONDS = 0.5
HELD = "held"  # (the live summary's row of the stopping holds)


def grow_chunks(workers: int) -> list[int]:
    """``workers`` split into extra clusters of at most GROW_CLUSTER_WORKERS, as even as can be."""
    n = -(-workers // GROW_CLUSTER_WORKERS)
    return [workers // n + (1 if i < workers % n else 0) for i in range(n)]


@dataclass
class Cluster:
    """A cluster of the pool as its status file tells (tasks.engine.pool)."""

    name: str
    pid: int
    workers: int
    base: bool
    retiring: bool = False
    running: bool = False  # its workers take jobs (else still starting)


@dataclass
class ServedProvider:
    pk: int
    queue: str
    enabled: bool
    limit: int
    polling: bool
    poll_interval: float
    unreachable_since: object
    probed_at: object


def served_provider_filter(qs):
    """Providers this machine serves (WORKER_PROVIDERS: names or ids; empty = all)."""
    wanted = settings.WORKER_PROVIDERS
    if not wanted:
        return qs
    ids = [int(w) for w in wanted if w.isdigit()]
    names = [w for w in wanted if not w.isdigit()]
    from django.db.models import Q

    return qs.filter(Q(pk__in=ids) | Q(name__in=names))


def summarize_queues(queues: list[str], limit: int) -> str:
    """``a,b,c`` when it fits in ``limit`` characters, else as many as fit and ``(+N more)``."""
    full = ",".join(queues)
    if len(full) <= limit:
        return full or "-"
    for keep in range(len(queues) - 1, -1, -1):
        text = ",".join(queues[:keep]) + f"{',' if keep else ''}(+{len(queues) - keep} more)"
        if len(text) <= limit:
            return text
    return f"({len(queues)} queues)"[:limit]


class AlreadyRunning(RuntimeError):
    pass


class Supervisor:
    def __init__(self, *, sweep: bool = True, scheduler: bool = True, python: str | None = None):
        self.sweep_enabled = sweep
        self.scheduler = scheduler
        self.python = python or sys.executable
        self.manage = str(Path(settings.BASE_DIR) / "manage.py")
        self.name = f"{settings.WORKER_NODE}:{os.getpid()}"
        self.run_dir = Path(settings.VAR_DIR) / f"workers-{settings.WORKER_NODE}"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.drain_file = self.run_dir / "drain"
        self.queues_file = self.run_dir / "queues"
        self.status_file = self.run_dir / "pool.json"
        self.pool_proc: subprocess.Popen | None = None
        self.growing: tuple[int, int, float] | None = None  # (workers, clusters before, asked at)
        self.last_busy: dict[str, float] = {}
        self.providers: list[ServedProvider] = []
        self.providers_at = -1e9
        self.stopping = False
        self.last_poll: dict[int, float] = {}
        self.last_safety = 0.0
        self.last_heartbeat = -1e9
        self.worker_runs: dict[int, tuple] = {}  # pid -> (tasks_run, current task) at the last look (retire_idle)
        self.last_reconcile = 0.0
        self.last_overdue = 0.0
        self.prober: threading.Thread | None = None
        self.backlog_seen = False
        self.last_headroom = -1e9  # (monotonic) the last grow because every worker was busy
        self._lock_fd: int | None = None
        self._broker = None

    # ------------------------------------------------------------------ processes
    def acquire(self) -> None:
        """Hold this node's lock for as long as the process lives, and kill leftovers of an
        old supervisor of the node (its pool processes, whose supervisor is gone)."""
        fd = os.open(self.run_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            other = (self.run_dir / "lock").read_text().strip() or "?"
            raise AlreadyRunning(
                f"another run_workers of node {settings.WORKER_NODE!r} is running (pid {other}); "
                "stop it first, or give this one another WORKER_NODE"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd
        killed = kill_leftovers(settings.WORKER_NODE, keep=self.name)
        if killed:
            logger.warning("supervisor: killed %d leftover process(es) of an old supervisor: %s", len(killed), killed)

    def _env(self, workers: int) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("Q_CLUSTER_NAME", None)
        env["Q_CLUSTER_WORKERS"] = str(workers)
        env["Q_SCHEDULER"] = "1" if self.scheduler else "0"
        env["WORKER_QUEUES_FILE"] = str(self.queues_file)
        env["WORKER_POOL_STATUS_FILE"] = str(self.status_file)
        env["WORKER_DRAIN_FILE"] = str(self.drain_file)
        env["WORKER_NODE"] = settings.WORKER_NODE
        env["WORKER_SUPERVISOR"] = self.name
        env["WORKER_SUPERVISOR_PID"] = str(os.getpid())
        return env

    def start_pool(self) -> None:
        workers = min(settings.WORKER_POOL_MIN, self.capacity())
        self.status_file.unlink(missing_ok=True)
        self.pool_proc = subprocess.Popen(
            [self.python, self.manage, "run_pool"],
            env=self._env(workers),
            cwd=str(settings.BASE_DIR),
            stdin=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group: killpg reaches every process of the pool
        )
        self.growing = None
        self.last_busy.clear()
        logger.info("supervisor: started the pool (%d workers) pid %s", workers, self.pool_proc.pid)

    def pool_alive(self) -> bool:
        return self.pool_proc is not None and self.pool_proc.poll() is None

    def command(self, line: str) -> None:
        """Tell the pool (grow N, retire NAME)."""
        try:
            self.pool_proc.stdin.write(line + "\n")
            self.pool_proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            logger.warning("supervisor: the pool did not take %r (it is restarting)", line)

    def pool_status(self) -> dict:
        from tasks.engine.pool import read_status

        status = read_status(self.status_file)
        if not self.pool_alive() or status.get("pid") != self.pool_proc.pid:
            return {"pid": None, "clusters": []}
        return status

    def clusters(self) -> list[Cluster]:
        return [Cluster(**row) for row in self.pool_status()["clusters"]]

    def idle_workers(self) -> int | None:
        """Workers of the pool waiting for a job, the most seen over its last fraction of a
        second (tasks.engine.pool.Pool.check_idle); None when it does not say."""
        return self.pool_status().get("idle_workers")

    @property
    def pool_size(self) -> int:
        """Workers of the clusters that serve (not retiring), and of one asked for but not started yet."""
        size = sum(c.workers for c in self.clusters() if not c.retiring)
        if self.growing is not None:
            size += self.growing[0]
        return size

    def capacity(self) -> int:
        """The most workers this machine runs: WORKER_CONCURRENCY, else the served providers' limits."""
        if settings.WORKER_CONCURRENCY:
            return settings.WORKER_CONCURRENCY
        return max(1, sum(p.limit for p in self.providers if p.enabled))

    def refresh_providers(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.providers_at < PROVIDERS_REFRESH_SECONDS:
            return
        self.providers_at = now
        self.providers = [
            ServedProvider(
                pk=p.pk,
                queue=p.queue_name,
                enabled=p.enabled,
                limit=p.concurrency_limit,
                polling=p.enable_task_polling,
                poll_interval=p.task_poll_interval,
                unreachable_since=p.unreachable_since,
                probed_at=p.probed_at,
            )
            for p in served_provider_filter(Provider.objects.all()).only(
                "id",
                "enabled",
                "allow_concurrent_tasks",
                "max_concurrent_tasks",
                "enable_task_polling",
                "task_poll_interval",
                "unreachable_since",
                "probed_at",
            )
        ]
        from tasks.engine.broker import write_queues

        if write_queues(self.queues_file, [p.queue for p in self.providers]):
            logger.info("supervisor: serving %d provider queue(s)", len(self.providers))

    def broker(self):
        if self._broker is None:
            from django_q.brokers import get_broker

            self._broker = get_broker()
        return self._broker

    def backlog(self) -> int:
        """Jobs of this machine's provider queues waiting in the broker for a worker."""
        names = [p.queue for p in self.providers]
        try:
            return self.broker().ready_total(names)
        except Exception:
            self._broker = None
            raise

    def reconcile_pool(self) -> None:
        """Keep the pool alive and sized to the work: the base cluster, extras while jobs wait."""
        now = time.monotonic()
        self.refresh_providers()
        if not self.pool_alive():
            if self.pool_proc is not None:
                logger.warning("supervisor: the pool pid %s exited (%s)", self.pool_proc.pid, self.pool_proc.returncode)
            self.start_pool()
            return
        clusters = self.clusters()
        if not any(c.running for c in clusters):
            return  # the pool is starting: its base cluster will take what waits
        if self.growing is not None and (len(clusters) > self.growing[1] or now - self.growing[2] > GROW_WAIT_SECONDS):
            self.growing = None  # the new cluster runs (or the pool never made it: ask again if jobs still wait)
        waiting = self.backlog()
        if waiting and (self.backlog_seen or waiting >= GROW_AT_ONCE):
            # Jobs wait in the broker (a gated pusher leaves them there only while every
            # worker is busy): several at once, or one at two checks in a row.
            waiting = 0 if self.grow(waiting, clusters) else waiting
        elif (
            not waiting
            and all(c.running for c in clusters)
            and now - self.last_headroom >= HEADROOM_RETRY_SECONDS
            and self.idle_workers() == 0
        ):
            # Every worker stayed busy (one provider's backlog can fill a small pool):
            # grow now, or the next job of another provider waits for the growth.
            self.last_headroom = now
            self.grow(0, clusters)
        self.backlog_seen = bool(waiting)

    def grow(self, waiting: int, clusters: list[Cluster]) -> bool:
        """Ask the pool for an extra cluster sized to the work this machine should run now,
        within the cap. False when it cannot grow now.

        The jobs seen waiting only trigger it (a copy sent twice counts twice there); the
        size comes from the database: the served providers' tasks admitted and not yet
        claimed, plus the tasks running on this machine, doubled.
        """
        cap = self.capacity()
        size = self.pool_size
        if self.growing is not None or not clusters or size >= cap:
            return False
        # Twice the demand: a burst seen arriving usually goes on arriving (the extra
        # workers are retired after WORKER_POOL_IDLE_SECONDS if it did not).
        workers = min(cap, 2 * self.demand()) - size
        if workers <= 0:
            return False
        chunks = grow_chunks(workers)
        logger.info(
            "supervisor: %s; growing the pool by %d (%d cluster(s))",
            f"{waiting} job(s) wait for a worker" if waiting else "every worker is busy",
            workers,
            len(chunks),
        )
        for chunk in chunks:
            self.command(f"grow {chunk}")
        # Done once every new cluster is listed (or after GROW_WAIT_SECONDS).
        self.growing = (workers, len(clusters) + len(chunks) - 1, time.monotonic())
        return True

    def headroom_fits(self) -> bool:
        """Whether the pool is no larger than a grow would make it now (twice the demand,
        within the cap): an idle extra cluster that is more goes, a right-sized one comes."""
        return self.pool_size <= min(self.capacity(), 2 * self.demand())

    def demand(self) -> int:
        """Tasks of the served providers admitted but not claimed, and tasks running on this machine."""
        from django.db.models import Q

        return Task.objects.filter(
            Q(status=PENDING, admitted_at__isnull=False)
            | Q(status__in=EXECUTING, worker__startswith=f"{settings.WORKER_NODE}:"),
            provider_id__in=[p.pk for p in self.providers],
        ).count()

    def retire_idle(self) -> None:
        """Stop an extra cluster whose workers took no task for WORKER_POOL_IDLE_SECONDS.

        A worker's registry row (tasks.models.Worker) counts its claims (``tasks_run``,
        written at most every WORKER_REGISTRY_INTERVAL_SECONDS): a worker whose count
        moved since the last look, or that runs a task now, is busy. (Its heartbeat is
        no sign of work: refresh_workers keeps idle workers' rows fresh too.)
        """
        extras = [c for c in self.clusters() if not c.base and not c.retiring]
        if not extras:
            return
        now = time.monotonic()
        rows = Worker.objects.filter(node=settings.WORKER_NODE, role="worker").values_list(
            "pid", "tasks_run", "current_task_id"
        )
        seen = {pid: (runs, current) for pid, runs, current in rows}
        active = {pid for pid, state in seen.items() if self.worker_runs.get(pid) != state}
        self.worker_runs = seen
        running = Task.objects.filter(status__in=EXECUTING, worker__startswith=f"{settings.WORKER_NODE}:")
        for name in running.values_list("worker", flat=True):
            pid = name.rpartition(":")[2]
            if pid.isdigit():
                active.add(int(pid))
        idle = self.idle_workers()
        for cluster in extras:
            last = self.last_busy.setdefault(cluster.name, now)
            if self.backlog_seen or active & set(cluster_pids(cluster.pid)):
                self.last_busy[cluster.name] = now
            elif idle is not None and idle <= cluster.workers and self.headroom_fits():
                # The rest of the pool is busy: this cluster is its room for another
                # provider's next job (retired, it would be grown again at once).
                self.last_busy[cluster.name] = now
            elif now - last >= settings.WORKER_POOL_IDLE_SECONDS:
                logger.info("supervisor: cluster %s idle for %.0f s; stopping it", cluster.name, now - last)
                self.command(f"retire {cluster.name}")
                self.last_busy.pop(cluster.name, None)
                if idle is not None:
                    idle -= cluster.workers

    def child_pids(self) -> list[int]:
        return cluster_pids(self.pool_proc.pid) if self.pool_alive() else []

    # ---------------------------------------------------------------------- sweep
    def tick(self) -> None:
        """One round of the loop's database work. Each step fails alone: a registry
        write that breaks must not keep recovery from running."""
        now = time.monotonic()
        if now - self.last_heartbeat >= HEARTBEAT_SECONDS:
            if self.step("heartbeat", self.heartbeat):
                self.last_heartbeat = now
        if self.sweep_enabled:
            self.step("sweep", self.sweep)

    def step(self, name: str, func) -> bool:
        try:
            func()
            return True
        except DatabaseError:
            logger.exception("supervisor: %s failed (database away?); retrying", name)
            connection.close()
        except Exception:
            logger.exception("supervisor: %s failed; retrying", name)
        return False

    def queue_summary(self) -> str:
        """The queues this machine serves, as the registry's queue column can hold them."""
        return summarize_queues(sorted(p.queue for p in self.providers), Worker._meta.get_field("queue").max_length)

    def heartbeat(self) -> None:
        now = timezone.now()
        queues = self.queue_summary()
        if not Worker.objects.filter(name=self.name).update(last_heartbeat=now, draining=self.stopping, queue=queues):
            Worker.objects.create(
                name=self.name,
                node=settings.WORKER_NODE,
                host=socket.gethostname(),
                pid=os.getpid(),
                queue=queues,
                role="supervisor",
                last_heartbeat=now,
            )
        self.refresh_workers(now)

    def refresh_workers(self, now) -> None:
        """Keep the registry rows of this pool's live worker processes fresh, idle or not.

        A worker writes its own row only when it claims and while a task runs; an idle
        one would look dead after a minute (and its row be deletable). Its supervisor
        knows it lives (its pool's process tree): ONE update per heartbeat period for
        all of them, so an idle tier costs no query per worker. A dead worker is not in
        the tree any more, so its row ages and goes stale.
        """
        pids = self.child_pids()
        if pids:
            Worker.objects.filter(node=settings.WORKER_NODE, role="worker", pid__in=pids).update(last_heartbeat=now)

    def sweep(self) -> None:
        """Recovery, re-dispatch and admission, driven by one summary of the live tasks."""
        report = maintenance.SweepReport()
        live = live_summary()
        now = time.monotonic()
        if live.expired or live.hold_expired:
            maintenance.recover(report)  # (it also frees the stopping holds that ran out)
        elif live.executing and now - self.last_overdue >= OVERDUE_SECONDS:
            self.last_overdue = now
            maintenance.recover(report)  # (also ends tasks far past their deadline: rare, checked less often)
        if live.stale_dispatch:
            maintenance.redispatch(report)
        self.refresh_providers()
        served = {p.pk for p in self.providers}
        unclaimed = sum(n for pk, n in live.unclaimed.items() if pk in served)
        if unclaimed and self.pool_alive():
            # Admitted jobs nobody claimed for a while, though none waits in the broker:
            # busy pushers hold them (prefetch). A grow re-sends them for the new workers.
            self.grow(unclaimed, self.clusters())
        due = []
        safety = now - self.last_safety >= SAFETY_ADMIT_SECONDS
        if safety:
            self.last_safety = now
        probe_cutoff = health.probe_cutoff()
        to_probe = []
        for p in self.providers:
            if not p.enabled:
                continue
            if p.unreachable_since is not None:
                if p.probed_at is None or p.probed_at < probe_cutoff:
                    to_probe.append(p.pk)
                continue  # held: nothing to admit until it answers
            if p.pk not in live.waiting:
                continue  # nothing waits for admission: no query for this provider
            if safety or (p.polling and now - self.last_poll.get(p.pk, 0.0) >= p.poll_interval):
                due.append(p.pk)
                self.last_poll[p.pk] = now
        if due:
            maintenance.admit_all(report, due)
        if now - self.last_reconcile >= RECONCILE_SECONDS:
            self.last_reconcile = now
            maintenance.reconcile(report)
        for line in report.changes:
            logger.info("sweep: %s", line)
        if to_probe:
            self.providers_at = -1e9  # see the probe's outcome at the next round
            self.start_probes(to_probe)

    def start_probes(self, provider_ids: list[int]) -> None:
        """Probe these unreachable providers (tasks.engine.health) in a thread, one round at a time:
        a probe of a dead host may take its whole connect timeout."""
        if self.prober is not None and self.prober.is_alive():
            return
        self.prober = threading.Thread(target=self._probe, args=(provider_ids,), name="provider-prober", daemon=True)
        self.prober.start()

    def _probe(self, provider_ids: list[int]) -> None:
        try:
            for pk, error in health.probe_due(Provider.objects.filter(pk__in=provider_ids)).items():
                logger.info("provider %s: probe %s", pk, "answered" if error is None else f"failed: {error}")
        except Exception:
            logger.exception("supervisor: probing providers failed; the next sweep retries")
        finally:
            connection.close()

    # ----------------------------------------------------------------------- loop
    def run(self) -> None:
        self.acquire()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.drain_file.unlink(missing_ok=True)
        if self.scheduler:
            ensure_schedules()
        if settings.WEBHOOK_DELIVERY:  # signed webhooks (tasks.webhooks): a thread of its own
            from tasks import webhooks

            webhooks.start_thread(lambda: self.stopping)
        logger.info("supervisor %s starting (providers: %s)", self.name, settings.WORKER_PROVIDERS or "all")
        self.refresh_providers(force=True)
        # Jobs a previous run of this machine took but never ran: send them again now.
        dispatch.redispatch_stale(cutoff=clock.now(), provider_ids=[p.pk for p in self.providers])
        if self.sweep_enabled:
            self.step("sweep", self.sweep)  # recovery at start-up (expired leases only)
        next_pool = next_tick = next_retire = 0.0
        while not self.stopping:
            now = time.monotonic()
            if now >= next_pool:
                close_old_connections()
                self.step("pool", self.reconcile_pool)
                next_pool = now + POOL_CHECK_SECONDS
            if now >= next_retire:
                self.step("retire", self.retire_idle)
                next_retire = now + 5.0
            if now >= next_tick:
                close_old_connections()
                self.tick()
                next_tick = now + settings.TASK_SWEEP_SECONDS
            time.sleep(max(0.01, min(next_pool, next_tick) - time.monotonic()))
        self.shutdown()

    def _on_signal(self, signum, frame) -> None:
        if self.stopping:
            return
        logger.info("supervisor: signal %s: draining", signum)
        self.stopping = True

    def shutdown(self) -> None:
        grace = settings.TASK_SHUTDOWN_GRACE_SECONDS
        # 1. Stop claiming: the workers see the drain file before any claim, and
        #    cancel their running operations once the file is `grace` seconds old.
        self.drain_file.touch()
        pids = self.child_pids()
        if self.pool_alive():
            self.pool_proc.send_signal(signal.SIGTERM)
            # 2. Give running tasks the grace period, plus a little for the operations to wind down.
            try:
                self.pool_proc.wait(timeout=grace + 3.0)
            except subprocess.TimeoutExpired:
                logger.warning("supervisor: the pool pid %s did not stop; killing it", self.pool_proc.pid)
        if self.pool_proc is not None:
            try:
                os.killpg(self.pool_proc.pid, signal.SIGKILL)  # its process group: whatever is left of it
            except ProcessLookupError:
                pass
            self.pool_proc.wait(timeout=10)
        # 3. Release what is left so recovery acts at once, and run it.
        try:
            close_old_connections()
            names = [f"{settings.WORKER_NODE}:{pid}" for pid in pids]
            held = list(Task.objects.filter(status__in=EXECUTING, worker__in=names).values_list("pk", "lease_token"))
            for pk, token in held:
                transitions.release_lease(pk, token=token, actor=f"supervisor:{self.name}")
            if held:
                logger.warning("supervisor: handed back %d unfinished task(s): %s", len(held), [h[0] for h in held])
                maintenance.recover(maintenance.SweepReport())
            dispatch.redispatch_stale(cutoff=clock.now(), provider_ids=[p.pk for p in self.providers])
            Worker.objects.filter(name=self.name).delete()
            Worker.objects.filter(name__in=names).delete()
        except Exception:
            logger.exception("supervisor: could not release tasks at shutdown; recovery will act when leases expire")
        self.drain_file.unlink(missing_ok=True)
        logger.info("supervisor %s stopped", self.name)


def cluster_pids(pid: int) -> list[int]:
    """A cluster's process and all its descendants."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return [proc.pid, *(child.pid for child in proc.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def kill_leftovers(node: str, keep: str) -> list[int]:
    """SIGKILL processes of this node's worker tier whose supervisor is not ``keep`` and is gone.

    They are found by the environment every pool process inherits (WORKER_NODE,
    WORKER_SUPERVISOR): processes an old supervisor left behind (an old release
    without the parent-death tie, or a supervisor killed before its pool).
    """
    import psutil

    killed = []
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "environ"]):
        try:
            env = proc.info["environ"] or {}
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
        owner = env.get("WORKER_SUPERVISOR")
        if proc.pid == me or env.get("WORKER_NODE") != node or not owner or owner == keep:
            continue
        try:
            owner_pid = int(owner.rsplit(":", 1)[1])
        except (IndexError, ValueError):
            owner_pid = None
        if owner_pid is not None and owner_pid != proc.pid and psutil.pid_exists(owner_pid) and owner_pid != me:
            try:
                if "run_workers" in " ".join(psutil.Process(owner_pid).cmdline()):
                    continue  # a live supervisor's (of another checkout): not ours to kill
            except psutil.NoSuchProcess:
                pass
        try:
            proc.kill()
            killed.append(proc.pid)
        except psutil.NoSuchProcess:
            pass
    return killed


@dataclass
class LiveSummary:
    executing: int = 0
    expired: bool = False
    stale_dispatch: bool = False
    waiting: set = field(default_factory=set)  # providers with tasks waiting for admission
    unclaimed: dict = field(default_factory=dict)  # provider -> admitted jobs not claimed within UNCLAIMED_SECONDS
    hold_expired: bool = False  # an ended task's "stopping" hold ran out (tasks.engine.transitions)


def live_summary() -> LiveSummary:
    """What the sweep needs to know, from one query over the live tasks (the status index)."""
    t = sql.table(Task)
    status, provider, admitted = sql.col(Task, "status"), sql.col(Task, "provider"), sql.col(Task, "admitted_at")
    lease, dispatched = sql.col(Task, "lease_expires_at"), sql.col(Task, "dispatched_at")
    running, cancelling = sorted(EXECUTING)
    now = clock.now()  # leases are on the database server's clock
    cutoff = now - timedelta(seconds=settings.TASK_DISPATCH_TIMEOUT_SECONDS)
    held = sql.col(Task, "held_until")
    at = [sql.prep(Task._meta.get_field("lease_expires_at"), now)]
    rows = sql.fetchall(
        f"SELECT {provider}, {status}, {admitted} IS NULL, COUNT(*),"
        f" MAX(CASE WHEN {lease} < %s THEN 1 ELSE 0 END), MAX(CASE WHEN {dispatched} < %s THEN 1 ELSE 0 END),"
        f" SUM(CASE WHEN {dispatched} < %s THEN 1 ELSE 0 END)"
        f" FROM {t.name} WHERE {status} IN (%s, %s, %s) GROUP BY {provider}, {status}, {admitted} IS NULL"
        # Ended tasks still holding their slot and instance (the "stopping" hold): one row.
        f" UNION ALL SELECT NULL, %s, 0, COUNT(*), MAX(CASE WHEN {held} < %s THEN 1 ELSE 0 END), 0, 0"
        f" FROM {t.name} WHERE {held} IS NOT NULL",
        [
            *at,
            sql.prep(Task._meta.get_field("dispatched_at"), cutoff),
            sql.prep(Task._meta.get_field("dispatched_at"), now - timedelta(seconds=UNCLAIMED_SECONDS)),
            PENDING,
            running,
            cancelling,
            HELD,
            *at,
        ],
    )
    summary = LiveSummary()
    for provider_id, state, unadmitted, count, lease_expired, dispatch_stale, unclaimed in rows:
        if state == HELD:
            summary.hold_expired = bool(lease_expired)
            continue
        if state == PENDING:
            if unadmitted:
                summary.waiting.add(provider_id)
                continue
            summary.stale_dispatch = summary.stale_dispatch or bool(dispatch_stale)
            if unclaimed:
                summary.unclaimed[provider_id] = int(unclaimed)
        else:
            summary.executing += int(count)
            summary.expired = summary.expired or bool(lease_expired)
    return summary


SWEEP_SCHEDULE = "cloudhost-sweep"


def ensure_schedules() -> None:
    """The sweep also runs as a django-q2 schedule (every minute, maintenance cluster).

    Several machines start at once: django-q2's Schedule.name is not unique, so
    two of them may both find no row and both insert one (update_or_create then
    fails with MultipleObjectsReturned at every later start). Each start keeps
    the oldest row it sees and deletes the others; no start deletes the oldest
    row of all, so one row remains.
    """
    from django_q.models import Schedule

    wanted = {
        "func": "tasks.engine.maintenance.sweep_job",
        "schedule_type": Schedule.MINUTES,
        "minutes": 1,
        "repeats": -1,
    }
    rows = Schedule.objects.filter(name=SWEEP_SCHEDULE).order_by("pk")
    found = list(rows)
    if not found:
        Schedule.objects.create(name=SWEEP_SCHEDULE, **wanted)
        found = list(rows.all())  # a fresh query (with any row a machine starting beside this one inserted)
    keep, *extra = found
    if extra:
        Schedule.objects.filter(pk__in=[r.pk for r in extra]).delete()
        logger.info("supervisor: removed %d duplicate %s schedule(s)", len(extra), SWEEP_SCHEDULE)
    stale = {k: v for k, v in wanted.items() if getattr(keep, k) != v}
    if stale:
        Schedule.objects.filter(pk=keep.pk).update(**stale)
    schedules.ensure_periodic_jobs()  # retention and traffic (tasks/schedules.py)
