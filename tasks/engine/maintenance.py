"""The periodic sweep: recovery, timeouts, re-dispatch, admission, probes, reconciliation.

Run by every worker-tier supervisor every TASK_SWEEP_SECONDS, by
``manage.py cleanup_tasks`` (cron or by hand), and by a django-q2 schedule.
Every step is a compare-and-set, so several machines sweeping at once is safe:
a healthy task on another machine is never touched (recovery acts only on an
expired lease).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from tasks.engine import clock, dispatch, health, transitions
from tasks.engine.states import EXECUTING, PENDING, ErrorCode
from tasks.models import Provider, Task, Worker

logger = logging.getLogger(__name__)


@dataclass
class SweepReport:
    changes: list[str] = field(default_factory=list)
    recovered: int = 0
    timed_out: int = 0
    redispatched: int = 0
    admitted: int = 0
    reconciled: int = 0
    resumed: int = 0
    released: int = 0

    def add(self, line: str) -> None:
        self.changes.append(line)


def expired_leases(now=None):
    now = now or clock.now()
    return Task.objects.filter(status__in=EXECUTING, lease_expires_at__lt=now)


def overdue(now=None):
    """Executing tasks far past their deadline whose lease is still renewed: the hard kill failed."""
    now = now or clock.now()
    slack = settings.TASK_HARD_KILL_GRACE_SECONDS + settings.TASK_LEASE_SECONDS
    found = []
    for task in Task.objects.filter(status__in=EXECUTING, lease_expires_at__gte=now).only(
        "id", "started_at", "timeout_seconds", "task_type"
    ):
        if task.deadline is not None and task.deadline + timedelta(seconds=slack) < now:
            found.append(task)
    return found


def release_holds(report: SweepReport, *, dry_run: bool = False) -> None:
    """Free the slot and instance of ended tasks whose revoked lease has run out (database clock)."""
    now = clock.now()
    if dry_run:
        for pk in Task.objects.filter(held_until__lt=now).values_list("pk", flat=True):
            report.add(f"task {pk}: its revoked lease ran out: would release its slot and instance")
        return
    for pk in transitions.release_expired_holds(now):
        report.add(f"task {pk}: its revoked lease ran out: slot and instance released")
        report.released += 1


def recover(report: SweepReport, *, dry_run: bool = False) -> None:
    for task in expired_leases().only("id", "worker", "lease_expires_at", "started_at", "timeout_seconds", "task_type"):
        line = f"task {task.pk}: lease of {task.worker or '?'} expired at {task.lease_expires_at:%H:%M:%S}"
        if dry_run:
            report.add(f"{line}: would resume it (or end it worker_lost, timeout or cancelled)")
            continue
        if transitions.recover_lost(task.pk):
            task.refresh_from_db(fields=["status"])
            report.add(f"{line}: {'resumed' if task.status == 'pending' else 'ended ' + task.status}")
            report.recovered += 1
    for task in overdue():
        line = f"task {task.pk}: still running {task.effective_timeout} s past its start with a live lease"
        if dry_run:
            report.add(f"{line}: would end it timeout")
            continue
        if transitions.finish(
            task.pk,
            "timeout",
            token=None,
            actor="system:timeout-sweep",
            sources=EXECUTING,
            error_code=ErrorCode.TIMEOUT,
            error_message="timed out and the worker did not stop; lease revoked",
            needs_reconcile=True,
        ):
            report.add(f"{line}: ended timeout")
            report.timed_out += 1
    # (Here, so every caller of recovery, the supervisor's sweep too, frees them.)
    release_holds(report, dry_run=dry_run)


def redispatch(report: SweepReport, *, dry_run: bool = False) -> None:
    if dry_run:
        cutoff = clock.now() - timedelta(seconds=settings.TASK_DISPATCH_TIMEOUT_SECONDS)
        stale = Task.objects.filter(status=PENDING, admitted_at__isnull=False, dispatched_at__lt=cutoff)
        for pk in stale.values_list("pk", flat=True):
            report.add(f"task {pk}: admitted but never claimed: would send its job again")
        return
    for pk in dispatch.redispatch_stale():
        report.add(f"task {pk}: admitted but never claimed: job sent again")
        report.redispatched += 1


def admit_all(report: SweepReport, provider_ids=None, *, dry_run: bool = False) -> None:
    qs = Provider.objects.filter(enabled=True)
    if provider_ids is not None:
        qs = qs.filter(pk__in=provider_ids)
    for pid in qs.values_list("pk", flat=True):
        if dry_run:
            continue
        admitted = dispatch.admit(pid)
        if admitted:
            report.add(f"provider {pid}: admitted {len(admitted)} pending task(s) {admitted}")
            report.admitted += len(admitted)


def reconcile(report: SweepReport, *, dry_run: bool = False) -> None:
    try:
        from tasks.reconcile import reconcile_pending
    except ImportError:
        return
    if dry_run:
        return
    try:
        n = reconcile_pending(limit=20)
    except Exception:
        logger.exception("reconciliation failed")
        return
    if n:
        report.add(f"reconciled {n} instance(s) with their provider")
        report.reconciled += n


def prune_workers() -> None:
    """Forget worker rows not heard of for an hour (dead processes)."""
    Worker.objects.filter(last_heartbeat__lt=timezone.now() - timedelta(hours=1)).delete()


def probe(report: SweepReport, *, dry_run: bool = False) -> None:
    """Probe the providers held as unreachable that are due (tasks.engine.health); an answer resumes the queue.

    The supervisor does this in a thread of its own; here (cleanup_tasks, the
    schedule) it may wait out a dead host's connect timeout, which is fine.
    """
    if dry_run:
        for pk in health.due(Provider.objects.all()).values_list("pk", flat=True):
            report.add(f"provider {pk}: held as unreachable: would probe it")
        return
    for pk, error in health.probe_due(Provider.objects.all()).items():
        if error is None:
            report.add(f"provider {pk}: answers again: its queue resumes")
            report.resumed += 1
        else:
            report.add(f"provider {pk}: still unreachable ({error})")


def sweep(*, dry_run: bool = False, admit: bool = True) -> SweepReport:
    report = SweepReport()
    recover(report, dry_run=dry_run)
    redispatch(report, dry_run=dry_run)
    probe(report, dry_run=dry_run)
    if admit:
        admit_all(report, dry_run=dry_run)
    reconcile(report, dry_run=dry_run)
    return report


def sweep_job() -> str:
    """django-q2 schedule entry point."""
    report = sweep()
    prune_workers()
    return f"{len(report.changes)} change(s)"
