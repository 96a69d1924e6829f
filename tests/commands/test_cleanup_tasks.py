"""manage.py cleanup_tasks: recovery and timeout sweep, with --dry-run."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

from django.core.management import call_command
from django.utils import timezone

from tasks import services
from tasks.engine import dispatch, transitions
from tasks.models import Task


def _running(alice, instance, *, lease_age: float, started_ago: float = 1, timeout: int = 0) -> Task:
    task = services.request_operation(alice, instance.pk, "restart", timeout_seconds=timeout or None)
    dispatch.admit(instance.provider_id)
    task.refresh_from_db()
    transitions.claim(task.pk, token=task.lease_token, worker="gone-host:1")
    now = timezone.now()
    Task.objects.filter(pk=task.pk).update(
        lease_expires_at=now - timedelta(seconds=lease_age), started_at=now - timedelta(seconds=started_ago)
    )
    return task


def run(*args) -> str:
    out = StringIO()
    call_command("cleanup_tasks", *args, stdout=out)
    return out.getvalue()


def test_dry_run_shows_and_changes_nothing(alice, provider, make_instance):
    lost = _running(alice, make_instance(alice, provider), lease_age=5)
    out = run("--dry-run")
    assert f"task {lost.pk}: lease of gone-host:1 expired" in out and "would resume it" in out
    assert "would change 1" in out
    lost.refresh_from_db()
    assert lost.status == "running"


def test_sweep_resumes_lost_tasks_and_leaves_healthy_ones(alice, provider, make_instance):
    provider.allow_concurrent_tasks, provider.max_concurrent_tasks = True, 3
    provider.save()
    lost = _running(alice, make_instance(alice, provider), lease_age=5)
    healthy = _running(alice, make_instance(alice, provider), lease_age=-10)  # lease valid 10 s more
    overdue = _running(alice, make_instance(alice, provider), lease_age=5, started_ago=400, timeout=60)
    out = run()
    for task in (lost, healthy, overdue):
        task.refresh_from_db()
    assert (lost.status, lost.error_code, lost.started_at) == ("pending", "", lost.started_at)
    assert (overdue.status, overdue.error_code) == ("timeout", "timeout")
    assert healthy.status == "running"
    assert f"task {lost.pk}" in out and f"task {overdue.pk}" in out and f"task {healthy.pk}" not in out
    assert f"task {lost.pk}: lease of gone-host:1 expired" in out and "resumed" in out
    assert "recovered 2" in out
    lost.instance.refresh_from_db()
    assert lost.instance.active_task_id == lost.pk  # still its own: the task is resumed


def test_stuck_past_deadline_with_a_live_lease_is_timed_out(alice, provider, make_instance):
    stuck = _running(alice, make_instance(alice, provider), lease_age=-10, started_ago=3600, timeout=60)
    out = run()
    stuck.refresh_from_db()
    assert stuck.status == "timeout" and "timed out 1" in out
    # Its worker still renewed the lease: slot and instance stay held until that lease runs out.
    assert stuck.held_until == stuck.lease_expires_at and stuck.instance.active_task_id == stuck.pk
    Task.objects.filter(pk=stuck.pk).update(held_until=timezone.now() - timedelta(seconds=1))
    out = run()
    stuck.refresh_from_db()
    stuck.instance.refresh_from_db()
    assert (stuck.held_until, stuck.lease_token, stuck.instance.active_task_id) == (None, "", None)
    assert f"task {stuck.pk}: its revoked lease ran out: slot and instance released" in out


def test_a_held_provider_is_probed_and_its_queue_resumed(alice, provider, make_instance):
    from tasks.engine import health
    from tasks.models import Provider

    instance = make_instance(alice, provider)
    health.mark_unreachable(provider.pk, "cannot connect")
    Provider.objects.filter(pk=provider.pk).update(probed_at=timezone.now() - timedelta(minutes=5))
    task = services.request_operation(alice, instance.pk, "stop")
    out = run("--dry-run")
    assert f"provider {provider.pk}: held as unreachable: would probe it" in out
    assert Provider.objects.get(pk=provider.pk).unreachable_since is not None
    out = run()
    # The simulated host answers: the mark goes, and the same sweep admits the waiting task.
    assert f"provider {provider.pk}: answers again: its queue resumes" in out and "providers resumed 1" in out
    assert Provider.objects.get(pk=provider.pk).unreachable_since is None
    assert Task.objects.get(pk=task.pk).admitted_at is not None
