"""The periodic jobs beside the sweep: retention and traffic (django-q2 schedules).

``ensure_periodic_jobs()`` is called once by the supervisor's ``ensure_schedules``
at every start of a worker tier. Each schedule is kept as one row with the
wanted settings, the same way as the sweep's: several machines starting at once
may both insert a row (django-q2's ``Schedule.name`` is not unique), so each
start keeps the oldest row it sees and deletes the others. A job switched off
by its setting has its row deleted, so turning it off takes effect at the next
start of any machine.
"""

from __future__ import annotations

import logging

from django.conf import settings

logger = logging.getLogger(__name__)

RETENTION_SCHEDULE = "cloudhost-retention"
TRAFFIC_SCHEDULE = "cloudhost-traffic"


def ensure_schedule(name: str, wanted: dict | None) -> None:
    """One row named ``name`` with the ``wanted`` fields; none when ``wanted`` is None."""
    from django_q.models import Schedule

    rows = Schedule.objects.filter(name=name).order_by("pk")
    if wanted is None:
        if rows.exists():
            rows.delete()
            logger.info("schedules: %s switched off, its schedule removed", name)
        return
    found = list(rows)
    if not found:
        Schedule.objects.create(name=name, **wanted)
        found = list(rows.all())  # with any row a machine starting beside this one inserted
    keep, *extra = found
    if extra:
        Schedule.objects.filter(pk__in=[r.pk for r in extra]).delete()
        logger.info("schedules: removed %d duplicate %s schedule(s)", len(extra), name)
    stale = {k: v for k, v in wanted.items() if getattr(keep, k) != v}
    if stale:
        Schedule.objects.filter(pk=keep.pk).update(**stale)


def ensure_periodic_jobs() -> None:
    """Retention (TASK_RETENTION_DAYS, 0 = off) and traffic sampling (TRAFFIC_SAMPLE_MINUTES, 0 = off)."""
    from django_q.models import Schedule

    retention_on = settings.TASK_RETENTION_DAYS > 0
    ensure_schedule(
        RETENTION_SCHEDULE,
        {
            "func": "tasks.purge.retention_job",
            "schedule_type": Schedule.MINUTES,
            "minutes": settings.TASK_RETENTION_EVERY_MINUTES,
            "repeats": -1,
        }
        if retention_on
        else None,
    )
    traffic_on = settings.TRAFFIC_SAMPLE_MINUTES > 0
    ensure_schedule(
        TRAFFIC_SCHEDULE,
        {
            "func": "tasks.traffic_counters.sample_job",
            "schedule_type": Schedule.MINUTES,
            "minutes": settings.TRAFFIC_SAMPLE_MINUTES,
            "repeats": -1,
        }
        if traffic_on
        else None,
    )
