"""manage.py purge_tasks: bounded-batch retention of finished tasks."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from tasks.models import Task, TaskEvent
from tests.conftest import make_task


def _aged(instance, status: str, days: float) -> Task:
    task = make_task(instance, status=status)
    Task.objects.filter(pk=task.pk).update(completed_at=timezone.now() - timedelta(days=days))
    TaskEvent.objects.create(task=task, from_status="pending", to_status=status, actor="test")
    return task


def test_purges_old_finished_tasks_and_their_events_only(running_instance):
    old_done = _aged(running_instance, "completed", 40)
    old_failed = _aged(running_instance, "failed", 40)
    recent = _aged(running_instance, "completed", 2)
    active = make_task(running_instance, status="running")
    out = StringIO()
    call_command("purge_tasks", "--older-than", "30", "--status", "completed", "--batch-size", "1", stdout=out)
    assert "deleted 1 task(s)" in out.getvalue()
    remaining = set(Task.objects.values_list("pk", flat=True))
    assert remaining == {old_failed.pk, recent.pk, active.pk}
    assert not TaskEvent.objects.filter(task_id=old_done.pk).exists()
    call_command("purge_tasks", "--older-than", "30", stdout=StringIO())
    assert set(Task.objects.values_list("pk", flat=True)) == {recent.pk, active.pk}


def test_dry_run_and_bad_arguments(running_instance):
    _aged(running_instance, "completed", 40)
    out = StringIO()
    call_command("purge_tasks", "--older-than", "30", "--dry-run", stdout=out)
    assert "would delete 1" in out.getvalue() and Task.objects.count() == 1
    with pytest.raises(CommandError, match="running"):
        call_command("purge_tasks", "--older-than", "30", "--status", "running")
    with pytest.raises(CommandError, match="older-than"):
        call_command("purge_tasks", "--older-than", "-1")


def test_purge_takes_retries_and_webhook_deliveries_along(running_instance, alice):
    """Rows that point at a purged task: a retry keeps living (retry_of cleared), deliveries go."""
    from tasks.models import Webhook, WebhookAttempt, WebhookDelivery

    old = _aged(running_instance, "failed", 40)
    retry = make_task(running_instance, status="completed", retry_of=old)
    hook = Webhook(owner=alice, url="https://93.184.215.14/", events=["task.failed"])
    hook.secret = "x" * 10
    hook.save()
    delivery = WebhookDelivery.objects.create(webhook=hook, task=old, event_id=1, event="task.failed", body="{}")
    WebhookAttempt.objects.create(delivery=delivery, ok=True, response_code=200)
    call_command("purge_tasks", "--older-than", "30", stdout=StringIO())
    assert not Task.objects.filter(pk=old.pk).exists()
    retry.refresh_from_db()
    assert retry.retry_of_id is None
    assert not WebhookDelivery.objects.exists() and not WebhookAttempt.objects.exists()
