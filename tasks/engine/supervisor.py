"""The worker tier of one machine: one django-q2 cluster per provider queue, supervised.

``manage.py run_workers`` runs a Supervisor. It

- starts, for every enabled provider this machine serves, a ``qcluster``
  process with ``Q_CLUSTER_NAME=provider-<id>`` and as many workers as the
  provider's limit (the limit itself is enforced by admission in the database;
  the worker count only has to be large enough), plus one small maintenance
  cluster on the default queue for django-q2 schedules;
- follows provider changes while it runs: a new or re-enabled provider gets a
  cluster, a raised limit gets an extra cluster with the missing workers (running
  tasks are never touched), a disabled provider's clusters stop once its
  running tasks are done; a cluster that dies is started again;
- sweeps every TASK_SWEEP_SECONDS: recovery of expired leases, re-dispatch of
  lost jobs, admission per provider at its task_poll_interval (when polling is
  on) and a global safety admission every 30 s, reconciliation;
- on SIGTERM/SIGINT drains: a drain file tells its workers to claim nothing
  more; running tasks get TASK_SHUTDOWN_GRACE_SECONDS to finish, then their
  operations are cancelled and their leases released so recovery acts at once;
  jobs this machine may have taken but not run are sent again for the others.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection
from django.utils import timezone

from tasks.engine import dispatch, health, maintenance, transitions
from tasks.engine.states import EXECUTING
from tasks.models import Provider, Task, Worker

logger = logging.getLogger(__name__)

SAFETY_ADMIT_SECONDS = 30.0
# After a provider grows, its unclaimed jobs are sent again at once and once more
# this long after, when the new cluster is polling (see reconcile_clusters).
GROW_RESEND_SECONDS = 2.0
MAINTENANCE_QUEUE = "maintenance"


@dataclass
class Cluster:
    queue: str
    workers: int
    proc: subprocess.Popen
    provider_id: int | None
    started: float = field(default_factory=time.monotonic)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


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


class Supervisor:
    def __init__(self, *, sweep: bool = True, maintenance_cluster: bool = True, python: str | None = None):
        self.sweep_enabled = sweep
        self.maintenance_cluster = maintenance_cluster
        self.python = python or sys.executable
        self.manage = str(Path(settings.BASE_DIR) / "manage.py")
        self.name = f"{settings.WORKER_NODE}:{os.getpid()}"
        self.drain_file = Path(settings.VAR_DIR) / f"drain-{settings.WORKER_NODE}-{os.getpid()}"
        self.clusters: dict[str, list[Cluster]] = {}
        self.stopping = False
        self.last_poll: dict[int, float] = {}
        self.last_safety = 0.0
        self.prober: threading.Thread | None = None
        self.resend_at: dict[int, float] = {}

    # ------------------------------------------------------------------ processes
    def _env(self, queue: str | None, workers: int) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("Q_CLUSTER_NAME", None)
        if queue:
            env["Q_CLUSTER_NAME"] = queue
        env["Q_CLUSTER_WORKERS"] = str(workers)
        env["WORKER_DRAIN_FILE"] = str(self.drain_file)
        env["WORKER_NODE"] = settings.WORKER_NODE
        env["WORKER_SUPERVISOR"] = self.name
        return env

    def _spawn(self, queue: str, workers: int, provider_id: int | None) -> Cluster:
        env = self._env(None if queue == MAINTENANCE_QUEUE else queue, workers)
        proc = subprocess.Popen(
            [self.python, self.manage, "qcluster"],
            env=env,
            cwd=str(settings.BASE_DIR),
            start_new_session=True,  # its own process group: killpg reaches its workers
        )
        logger.info("supervisor: started cluster %s (%d workers) pid %s", queue, workers, proc.pid)
        cluster = Cluster(queue=queue, workers=workers, proc=proc, provider_id=provider_id)
        self.clusters.setdefault(queue, []).append(cluster)
        return cluster

    def _stop_clusters(self, queue: str) -> None:
        for cluster in self.clusters.pop(queue, []):
            if cluster.alive:
                cluster.proc.send_signal(signal.SIGTERM)
                logger.info("supervisor: stopping cluster %s pid %s", queue, cluster.proc.pid)

    def reconcile_clusters(self) -> None:
        """Make the running clusters match the providers this machine should serve."""
        now = time.monotonic()
        for pk, at in list(self.resend_at.items()):
            if now >= at:
                del self.resend_at[pk]
                dispatch.redispatch_stale(cutoff=timezone.now(), provider_ids=[pk])
        providers = {
            p.queue_name: p
            for p in served_provider_filter(Provider.objects.all()).only(
                "id", "enabled", "allow_concurrent_tasks", "max_concurrent_tasks"
            )
        }
        # Reap dead clusters so they are started again below.
        for queue, group in list(self.clusters.items()):
            for cluster in list(group):
                if not cluster.alive:
                    logger.warning(
                        "supervisor: cluster %s pid %s exited (%s)", queue, cluster.proc.pid, cluster.proc.returncode
                    )
                    group.remove(cluster)
            if not group:
                self.clusters.pop(queue)
        if self.maintenance_cluster and MAINTENANCE_QUEUE not in self.clusters:
            self._spawn(MAINTENANCE_QUEUE, 1, None)
        for queue, provider in providers.items():
            have = sum(c.workers for c in self.clusters.get(queue, []))
            if provider.enabled:
                want = provider.concurrency_limit
                if have < want:
                    # Never restart a cluster to resize it: that would touch running tasks.
                    self._spawn(queue, want - have, provider.pk)
                    if have:
                        # A busy cluster's pusher may hold jobs its workers cannot run yet;
                        # send copies so the new workers take them (first claim wins). Now,
                        # and again once the new cluster polls: the busy cluster's pusher,
                        # still polling while the new one starts, may take the first copies
                        # too (django-q2's pusher holds one more, blocked on its full queue).
                        dispatch.redispatch_stale(cutoff=timezone.now(), provider_ids=[provider.pk])
                        self.resend_at[provider.pk] = time.monotonic() + GROW_RESEND_SECONDS
            elif (
                queue in self.clusters
                and not Task.objects.filter(provider_id=provider.pk, status__in=EXECUTING).exists()
            ):
                self._stop_clusters(queue)
        for queue in list(self.clusters):
            if queue != MAINTENANCE_QUEUE and queue not in providers:
                self._stop_clusters(queue)

    def child_pids(self) -> list[int]:
        import psutil

        pids = []
        for group in self.clusters.values():
            for cluster in group:
                try:
                    proc = psutil.Process(cluster.proc.pid)
                    pids.append(proc.pid)
                    pids.extend(child.pid for child in proc.children(recursive=True))
                except psutil.NoSuchProcess:
                    continue
        return pids

    # ---------------------------------------------------------------------- sweep
    def tick(self) -> None:
        """One round of the loop's database work. Each step fails alone: a registry
        write that breaks must not keep recovery from running."""
        self.step("heartbeat", self.heartbeat)
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
        return summarize_queues(sorted(self.clusters), Worker._meta.get_field("queue").max_length)

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

    def sweep(self) -> None:
        report = maintenance.SweepReport()
        maintenance.recover(report)
        maintenance.redispatch(report)
        now = time.monotonic()
        due = []
        served = served_provider_filter(Provider.objects.filter(enabled=True)).values_list(
            "pk", "enable_task_polling", "task_poll_interval", "unreachable_since", "probed_at"
        )
        safety = now - self.last_safety >= SAFETY_ADMIT_SECONDS
        probe_cutoff = health.probe_cutoff()
        to_probe = []
        for pk, polling, interval, unreachable_since, probed_at in served:
            if unreachable_since is not None:
                if probed_at is None or probed_at < probe_cutoff:
                    to_probe.append(pk)
                continue  # held: nothing to admit until it answers
            if safety or (polling and now - self.last_poll.get(pk, 0.0) >= interval):
                due.append(pk)
                self.last_poll[pk] = now
        if safety:
            self.last_safety = now
        if due:
            maintenance.admit_all(report, due)
        maintenance.reconcile(report)
        for line in report.changes:
            logger.info("sweep: %s", line)
        if to_probe:
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
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.drain_file.unlink(missing_ok=True)
        ensure_schedules()
        if settings.WEBHOOK_DELIVERY:  # signed webhooks (tasks.webhooks): a thread of its own
            from tasks import webhooks

            webhooks.start_thread(lambda: self.stopping)
        logger.info("supervisor %s starting (providers: %s)", self.name, settings.WORKER_PROVIDERS or "all")
        # Jobs a previous run of this machine took but never ran: send them again now.
        served = list(served_provider_filter(Provider.objects.all()).values_list("pk", flat=True))
        dispatch.redispatch_stale(cutoff=timezone.now(), provider_ids=served)
        if self.sweep_enabled:
            self.sweep()  # recovery at start-up (expired leases only)
        next_clusters = 0.0
        while not self.stopping:
            started = time.monotonic()
            close_old_connections()
            if started >= next_clusters:
                self.step("clusters", self.reconcile_clusters)
                next_clusters = started + 1.0
            self.tick()
            remaining = settings.TASK_SWEEP_SECONDS - (time.monotonic() - started)
            deadline = time.monotonic() + max(0.05, remaining)
            while not self.stopping and time.monotonic() < deadline:
                time.sleep(0.05)
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
        for queue in list(self.clusters):
            for cluster in self.clusters[queue]:
                if cluster.alive:
                    cluster.proc.send_signal(signal.SIGTERM)
        # 2. Give running tasks the grace period, plus a little for the operations to wind down.
        deadline = time.monotonic() + grace + 3.0
        while time.monotonic() < deadline and any(c.alive for g in self.clusters.values() for c in g):
            time.sleep(0.1)
        for group in self.clusters.values():
            for cluster in group:
                if cluster.alive:
                    logger.warning(
                        "supervisor: cluster %s pid %s did not stop; killing it", cluster.queue, cluster.proc.pid
                    )
                    try:
                        os.killpg(cluster.proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    cluster.proc.wait(timeout=10)
        # 3. Release what is left so recovery acts at once, and run it.
        try:
            close_old_connections()
            names = [f"{settings.WORKER_NODE}:{pid}" for pid in pids]
            held = list(Task.objects.filter(status__in=EXECUTING, worker__in=names).values_list("pk", "lease_token"))
            for pk, token in held:
                transitions.release_lease(pk, token=token)
            if held:
                logger.warning("supervisor: released %d unfinished task(s): %s", len(held), [h[0] for h in held])
                maintenance.recover(maintenance.SweepReport())
            served = list(served_provider_filter(Provider.objects.all()).values_list("pk", flat=True))
            dispatch.redispatch_stale(cutoff=timezone.now(), provider_ids=served)
            Worker.objects.filter(name=self.name).delete()
            Worker.objects.filter(name__in=names).delete()
        except Exception:
            logger.exception("supervisor: could not release tasks at shutdown; recovery will act when leases expire")
        self.drain_file.unlink(missing_ok=True)
        logger.info("supervisor %s stopped", self.name)


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
