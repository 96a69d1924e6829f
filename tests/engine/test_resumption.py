"""Resumption (issue 16): a running task whose worker is lost, or that a draining
worker hands back, goes back to pending at the head of its provider's queue and
another worker resumes it; a task that keeps losing its worker ends failed.

In-process tests (SQLite); the real-process ones are in test_processes.py.
"""

from __future__ import annotations

from datetime import timedelta

from tasks import metrics, services
from tasks.engine import clock, dispatch, transitions
from tasks.engine.worker import run_admitted_inline
from tasks.models import Instance, Task, TaskEvent


def claimed(task: Task, worker: str = "host-a:1") -> Task:
    """Admit (if needed) and claim the task, as a worker would."""
    dispatch.admit(task.provider_id)
    task = Task.objects.get(pk=task.pk)
    assert task.admitted_at is not None, "not admitted"
    assert transitions.claim(task.pk, token=task.lease_token, worker=worker)
    return Task.objects.get(pk=task.pk)


def lose(task: Task) -> bool:
    """The worker dies: its lease runs out, recovery acts."""
    Task.objects.filter(pk=task.pk).update(lease_expires_at=clock.now() - timedelta(seconds=1))
    return transitions.recover_lost(task.pk)


def test_a_lost_task_is_resumed_keeps_its_start_and_instance_and_completes(alice, provider, make_instance):
    instance = make_instance(alice, provider)
    task = claimed(services.request_operation(alice, instance.pk, "restart"))
    first_start = task.started_at
    assert lose(task)

    task.refresh_from_db()
    assert task.status == "pending" and task.error_code == "" and task.started_at == first_start
    assert Instance.objects.get(pk=instance.pk).active_task_id == task.pk  # still its own
    event = TaskEvent.objects.filter(task=task, from_status="running", to_status="pending").get()
    assert (event.from_status, event.actor, event.reason) == ("running", "system:recovery", "resumed:worker_lost")
    assert event.message == "resumed after worker host-a:1 was lost"

    assert run_admitted_inline(provider.pk) == 1  # admitted again at once, resumed and finished
    task.refresh_from_db()
    assert (task.status, task.attempt_count, task.started_at) == ("completed", 2, first_start)
    assert Instance.objects.get(pk=instance.pk).active_task_id is None
    assert metrics.resumption_counts() == {"worker_lost": 1, "handback": 0}
    assert b'cloudhost_task_resumptions_total{reason="worker_lost"} 1.0' in metrics.render()


def test_a_resumed_task_goes_first_and_frees_its_slot_for_itself(alice, provider, make_instance):
    # One slot: the resumed task must get it back before a task queued after it.
    lost = claimed(services.request_operation(alice, make_instance(alice, provider).pk, "restart"))
    later = services.request_operation(alice, make_instance(alice, provider).pk, "restart")
    dispatch.admit(provider.pk)
    assert Task.objects.get(pk=later.pk).admitted_at is None  # waits behind the running one
    assert lose(lost)
    lost.refresh_from_db()
    later.refresh_from_db()
    assert lost.status == "pending" and lost.admitted_at is not None and lost.lease_token
    assert later.admitted_at is None


def test_a_task_that_keeps_losing_its_worker_ends_failed_after_max_attempts(alice, provider, make_instance, settings):
    settings.TASK_MAX_ATTEMPTS = 3
    instance = make_instance(alice, provider)
    task = services.request_operation(alice, instance.pk, "restart")
    for attempt in (1, 2, 3):
        task = claimed(task, worker=f"host-a:{attempt}")
        assert task.attempt_count == attempt
        assert lose(task)
        task.refresh_from_db()
        assert task.status == ("pending" if attempt < 3 else "failed")
    assert task.error_code == "worker_lost" and "3 of 3 attempts" in task.error_message
    assert TaskEvent.objects.filter(task=task, reason="resumed:worker_lost").count() == 2
    assert Instance.objects.get(pk=instance.pk).active_task_id is None


def test_a_cancelling_task_whose_worker_is_lost_ends_cancelled(alice, provider, make_instance):
    instance = make_instance(alice, provider)
    task = claimed(services.request_operation(alice, instance.pk, "restart"))
    assert transitions.request_cancel(task.pk, actor="user:alice")
    assert Task.objects.get(pk=task.pk).status == "cancelling"
    assert lose(task)
    task.refresh_from_db()
    assert (task.status, task.error_code) == ("cancelled", "cancelled_by_user")
    assert not TaskEvent.objects.filter(task=task, from_status="running", to_status="pending").exists()


def test_a_lost_task_past_its_deadline_ends_timeout(alice, provider, make_instance):
    instance = make_instance(alice, provider)
    task = claimed(services.request_operation(alice, instance.pk, "restart", timeout_seconds=60))
    Task.objects.filter(pk=task.pk).update(started_at=clock.now() - timedelta(seconds=120))
    assert lose(task)
    task.refresh_from_db()
    assert (task.status, task.error_code) == ("timeout", "timeout")


def test_a_handback_at_shutdown_is_immediate_and_does_not_count_as_a_lost_attempt(
    alice, provider, make_instance, settings
):
    settings.TASK_MAX_ATTEMPTS = 2
    instance = make_instance(alice, provider)
    task = services.request_operation(alice, instance.pk, "restart")
    for n in range(3):  # three planned restarts of the worker tier
        task = claimed(task, worker=f"host-a:{n}")
        assert transitions.release_lease(task.pk, token=task.lease_token)  # no waiting for the lease
        task.refresh_from_db()
        assert task.status == "pending"
    assert TaskEvent.objects.filter(task=task, reason="resumed:handback").count() == 3
    # Lost once after three handbacks (4 claims): still resumed, since only 1 attempt was lost.
    task = claimed(task)
    assert lose(task)
    assert Task.objects.get(pk=task.pk).status == "pending"
    task = claimed(task)
    assert lose(task)
    task.refresh_from_db()
    assert (task.status, task.error_code, task.attempt_count) == ("failed", "worker_lost", 5)
    assert metrics.resumption_counts() == {"worker_lost": 1, "handback": 3}


def test_a_handback_needs_the_current_lease_token(alice, provider, make_instance):
    task = claimed(services.request_operation(alice, make_instance(alice, provider).pk, "restart"))
    assert transitions.release_lease(task.pk, token="someone-else") is False
    assert Task.objects.get(pk=task.pk).status == "running"


def test_force_stop_and_cancel_are_never_resumed(alice, provider, make_instance):
    task = claimed(services.request_operation(alice, make_instance(alice, provider).pk, "restart"))
    assert transitions.force_stop(task.pk, actor="admin:root", reason="stuck")
    assert lose(task) is False
    assert Task.objects.get(pk=task.pk).status == "cancelled"
