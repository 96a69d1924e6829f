"""Retention that runs by itself: the django-q2 schedule and its job."""

from __future__ import annotations

from datetime import timedelta

from django.utils import timezone
from django_q.models import Schedule

from tasks import purge, schedules
from tasks.engine import supervisor
from tasks.models import Task, TaskEvent
from tests.conftest import make_task


def _aged(instance, status: str, days: float) -> Task:
    task = make_task(instance, status=status)
    Task.objects.filter(pk=task.pk).update(completed_at=timezone.now() - timedelta(days=days))
    TaskEvent.objects.create(task=task, from_status="pending", to_status=status, actor="test")
    return task


def test_the_worker_tier_start_creates_the_retention_and_traffic_schedules(db, settings):
    settings.TASK_RETENTION_DAYS, settings.TASK_RETENTION_EVERY_MINUTES = 90, 10
    supervisor.ensure_schedules()
    supervisor.ensure_schedules()  # a second start changes nothing
    row = Schedule.objects.get(name=schedules.RETENTION_SCHEDULE)
    assert (row.func, row.schedule_type, row.minutes, row.repeats) == (
        "tasks.purge.retention_job",
        Schedule.MINUTES,
        10,
        -1,
    )
    assert Schedule.objects.get(name=schedules.TRAFFIC_SCHEDULE).func == "tasks.traffic_counters.sample_job"
    # A changed interval reaches the kept row; a duplicate left by machines starting at once goes.
    settings.TASK_RETENTION_EVERY_MINUTES = 30
    Schedule.objects.create(name=schedules.RETENTION_SCHEDULE, func="tasks.purge.retention_job")
    supervisor.ensure_schedules()
    rows = list(Schedule.objects.filter(name=schedules.RETENTION_SCHEDULE))
    assert [r.pk for r in rows] == [row.pk] and rows[0].minutes == 30


def test_retention_and_sampling_switched_off_remove_their_schedules(db, settings):
    supervisor.ensure_schedules()
    settings.TASK_RETENTION_DAYS, settings.TRAFFIC_SAMPLE_MINUTES = 0, 0
    supervisor.ensure_schedules()
    assert not Schedule.objects.filter(name__in=[schedules.RETENTION_SCHEDULE, schedules.TRAFFIC_SCHEDULE]).exists()
    assert Schedule.objects.filter(name=supervisor.SWEEP_SCHEDULE).exists()


def test_the_retention_job_purges_finished_tasks_older_than_the_setting(running_instance, settings):
    settings.TASK_RETENTION_DAYS = 30
    old = [_aged(running_instance, status, 31) for status in ("completed", "failed", "cancelled", "timeout")]
    recent = _aged(running_instance, "completed", 29)
    active = make_task(running_instance, status="running")
    assert purge.retention_job() == "purged 4 task(s)"
    assert set(Task.objects.values_list("pk", flat=True)) == {recent.pk, active.pk}
    assert not TaskEvent.objects.filter(task_id__in=[t.pk for t in old]).exists()
    assert TaskEvent.objects.filter(task=recent).exists()


def test_retention_zero_keeps_everything(running_instance, settings):
    settings.TASK_RETENTION_DAYS = 0
    _aged(running_instance, "completed", 10_000)
    assert purge.retention_job().startswith("retention off")
    assert Task.objects.count() == 1


def test_one_run_stops_after_its_time_budget_and_the_next_goes_on(running_instance, settings):
    settings.TASK_RETENTION_DAYS, settings.TASK_RETENTION_BATCH_SIZE = 30, 2
    settings.TASK_RETENTION_MAX_SECONDS = 1
    for _ in range(5):
        _aged(running_instance, "completed", 40)
    # A budget already used after the first batch: one batch per run, oldest first.
    settings.TASK_RETENTION_MAX_SECONDS = 1e-9
    assert purge.retention_job() == "purged 2 task(s)"
    assert Task.objects.count() == 3
    settings.TASK_RETENTION_MAX_SECONDS = 60
    assert purge.retention_job() == "purged 3 task(s)"
    assert Task.objects.count() == 0
