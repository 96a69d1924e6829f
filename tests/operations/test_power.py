"""start, stop, restart: the instance shows what the provider says, never a guess."""

from __future__ import annotations

import pytest

from tasks import services
from tests.operations.conftest import fresh, inject, run, store, usage

# operation -> (fixture giving the instance before, status after success)
CASES = {
    "start": ("stopped_instance", "running"),
    "stop": ("live_instance", "stopped"),
    "restart": ("live_instance", "running"),
}


@pytest.fixture
def before(request):
    op = request.param
    return op, request.getfixturevalue(CASES[op][0])


def _queue(alice, instance, op, **kwargs):
    return services.request_operation(alice, instance.pk, op, **kwargs)


@pytest.mark.parametrize("before", list(CASES), indirect=True)
def test_success_follows_the_guest(alice, provider, before):
    op, instance = before
    held = usage(instance)
    applied = store(provider).applied(op, instance.guest_name)
    task = _queue(alice, instance, op)
    run(provider)
    task, instance = fresh(task), fresh(instance)
    assert (task.status, task.progress, instance.status) == ("completed", 100, CASES[op][1])
    assert store(provider).guest(instance.guest_name)["status"] == CASES[op][1]
    assert instance.active_task_id is None and usage(instance) == held
    assert instance.addresses  # kept while stopped, refreshed when running
    assert store(provider).applied(op, instance.guest_name) == applied + 1  # exactly once


@pytest.mark.parametrize("before", list(CASES), indirect=True)
def test_provider_failure_shows_the_state_read_back(alice, provider, before):
    op, instance = before
    was = instance.status
    inject(provider, fail_ops={op: "permanent"})
    task = _queue(alice, instance, op)
    run(provider)
    task, instance = fresh(task), fresh(instance)
    assert (task.status, task.error_code) == ("failed", "provider_error")
    # Not "starting"/"stopping", not "unknown": what the provider reports.
    assert instance.status == was and not instance.needs_reconcile
    assert instance.active_task_id is None


def test_failure_with_an_unreadable_provider_marks_the_instance_for_reconciliation(alice, provider, live_instance):
    inject(provider, fail_ops={"stop": "permanent", "get_state": "permanent"})
    task = _queue(alice, live_instance, "stop")
    run(provider)
    instance = fresh(live_instance)
    assert fresh(task).status == "failed"
    assert (instance.status, instance.needs_reconcile) == ("unknown", True)


def test_transient_failures_are_retried_with_backoff(alice, provider, live_instance):
    inject(provider, fail_times={"stop": 3})
    task = _queue(alice, live_instance, "stop")
    run(provider)
    assert fresh(task).status == "completed" and fresh(live_instance).status == "stopped"
    messages = list(fresh(task).events.filter(kind="step").values_list("message", flat=True))
    retries = [m for m in messages if "retry" in m]
    assert [m.partition(" (")[0] for m in retries] == [
        f"stopping the guest: provider error, retry {i} of 3" for i in (1, 2, 3)
    ]
    # each retry's provider error is on the timeline, not only in the worker's log
    assert all(m.endswith(")") and len(m.partition(" (")[2]) > 1 for m in retries), retries


@pytest.mark.parametrize("before", list(CASES), indirect=True)
def test_cancel_while_running_leaves_the_guest_as_it_is(alice, provider, interrupt, before):
    op, instance = before
    # restart: cancel at the boot step, after the guest was shut down.
    at = 2 if op == "restart" else 1
    interrupt(op, "cancel", at=at)
    task = _queue(alice, instance, op)
    run(provider)
    task, instance = fresh(task), fresh(instance)
    expected = {"start": "stopped", "stop": "running", "restart": "stopped"}[op]
    assert (task.status, task.error_code) == ("cancelled", "cancelled_by_user")
    assert instance.status == expected == store(provider).guest(instance.guest_name)["status"]
    assert instance.active_task_id is None


@pytest.mark.parametrize("before", list(CASES), indirect=True)
def test_timeout_ends_timeout_with_the_true_state(alice, provider, before):
    op, instance = before
    was = instance.status
    inject(provider, hang_ops=[op])
    task = _queue(alice, instance, op, timeout_seconds=1)
    run(provider)
    task, instance = fresh(task), fresh(instance)
    assert (task.status, task.error_code) == ("timeout", "timeout")
    assert "timed out after 1 s" in task.error_message
    assert instance.status == was and instance.active_task_id is None
