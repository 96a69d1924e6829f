"""Retention: delete finished tasks and their events in bounded batches.

Each batch is its own short transaction touching only terminal tasks (rows
admission never reads for update), so purging never blocks admission for long.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from tasks.engine.states import FINAL
from tasks.models import Instance, Task, TaskDeletions, TaskEvent, TaskSecret, WebhookDelivery, Worker

logger = logging.getLogger(__name__)


def purge_queryset(older_than_days: float, statuses: list[str] | None = None):
    cutoff = timezone.now() - timedelta(days=older_than_days)
    wanted = [s for s in (statuses or FINAL) if s in FINAL]
    return Task.objects.filter(status__in=wanted, completed_at__lt=cutoff)


def purge(
    older_than_days: float,
    statuses: list[str] | None = None,
    *,
    batch_size: int = 1000,
    dry_run: bool = False,
    pause: float = 0.0,
    max_seconds: float | None = None,
) -> int:
    """Delete matching tasks; return how many (or would be, with dry_run).

    ``max_seconds``: stop after the batch that crosses this budget (the scheduled
    retention, so one run never holds the maintenance cluster long; the next run
    goes on where it stopped).
    """
    qs = purge_queryset(older_than_days, statuses)
    if dry_run:
        return qs.count()
    total = 0
    deadline = time.monotonic() + max_seconds if max_seconds is not None else None
    while True:
        ids = list(qs.order_by("completed_at", "id").values_list("id", flat=True)[:batch_size])
        if not ids:
            return total
        with transaction.atomic():
            # A terminal task is never an instance's active task, but be certain.
            keep = set(Instance.objects.filter(active_task_id__in=ids).values_list("active_task_id", flat=True))
            ids = [i for i in ids if i not in keep]
            Worker.objects.filter(current_task_id__in=ids).update(current_task=None)
            # Rows that point at the tasks (the raw DELETE below runs no ORM cascade).
            Task.objects.filter(retry_of_id__in=ids).update(retry_of=None)
            WebhookDelivery.objects.filter(task_id__in=ids).delete()  # and their attempts
            # Plain DELETEs by primary key lists: no ORM collector, short row locks.
            TaskEvent.objects.filter(task_id__in=ids)._raw_delete(TaskEvent.objects.db)
            TaskSecret.objects.filter(task_id__in=ids)._raw_delete(TaskSecret.objects.db)
            deleted = Task.objects.filter(pk__in=ids, status__in=FINAL)._raw_delete(Task.objects.db)
            TaskDeletions.add(deleted)  # the kept statistics are rebuilt (tasks.stats)
        total += deleted
        logger.info("purge: deleted %d task(s), %d so far", deleted, total)
        if not ids:
            return total
        if deadline is not None and time.monotonic() >= deadline:
            logger.info("purge: time budget used, %d deleted; the next run goes on", total)
            return total
        if pause:
            time.sleep(pause)


def retention_job() -> str:
    """The retention schedule (tasks.schedules): finished tasks older than TASK_RETENTION_DAYS.

    The same short batches as ``manage.py purge_tasks``, with a short pause between
    them and at most TASK_RETENTION_MAX_SECONDS per run.
    """
    days = settings.TASK_RETENTION_DAYS
    if days <= 0:
        return "retention off (TASK_RETENTION_DAYS=0)"
    n = purge(
        float(days),
        batch_size=settings.TASK_RETENTION_BATCH_SIZE,
        pause=0.05,
        max_seconds=settings.TASK_RETENTION_MAX_SECONDS,
    )
    if n:
        logger.info("retention: purged %d task(s) finished over %d day(s) ago", n, days)
    return f"purged {n} task(s)"


def purge_job(older_than_days: float = 30, statuses: str = "") -> str:
    """django-q2 schedule entry point, e.g. args "90" for tasks finished over 90 days ago."""
    n = purge(float(older_than_days), [s for s in statuses.split(",") if s] or None)
    return f"purged {n} task(s)"
