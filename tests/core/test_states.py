"""The transition table is closed: every (from, to) pair of the seven states."""

from __future__ import annotations

import itertools

import pytest
from django.utils import timezone

from tasks.engine import transitions
from tasks.engine.states import ALL_STATES, FINAL, PENDING, RUNNING, TRANSITIONS
from tasks.models import Instance, Task, TaskEvent
from tests.conftest import make_task

PAIRS = list(itertools.product(ALL_STATES, ALL_STATES))


@pytest.mark.parametrize(("source", "target"), PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
def test_transition_table_is_closed(source, target, running_instance):
    task = make_task(running_instance, status=source, lease_token="tok", admitted_at=timezone.now())
    allowed = source in TRANSITIONS.get(target, frozenset())
    token = "tok" if target in (RUNNING, PENDING) else None  # (pending: the lease holder hands it back)

    first = transitions.apply(task.pk, target, actor="test", token=token, worker="w1")

    task.refresh_from_db()
    events = list(TaskEvent.objects.filter(task=task, kind="transition").values_list("from_status", "to_status"))
    assert first is allowed
    if allowed:
        assert task.status == target
        assert events == [(source, target)]
        # The same transition again loses: exactly once.
        assert transitions.apply(task.pk, target, actor="test", token=token, worker="w1") is False
        assert TaskEvent.objects.filter(task=task).count() == 1
    else:
        assert task.status == source
        assert events == []


def test_terminal_states_never_change(running_instance):
    for final in FINAL:
        task = make_task(running_instance, status=final)
        for target in ALL_STATES:
            assert transitions.apply(task.pk, target, actor="test", token=None) is False
        task.refresh_from_db()
        assert task.status == final


def test_worker_writes_are_fenced_by_the_token(running_instance):
    task = make_task(running_instance, lease_token="good", admitted_at=timezone.now())
    assert transitions.claim(task.pk, token="stale", worker="w") is False
    assert transitions.claim(task.pk, token="good", worker="w") is True
    assert transitions.finish(task.pk, "completed", token="stale", actor="w") is False
    assert transitions.report_progress(task.pk, token="stale", progress=50, message="x") is False
    assert transitions.finish(task.pk, "completed", token="good", actor="w") is True
    task.refresh_from_db()
    assert task.status == "completed" and task.progress == 100


def test_force_stop_revokes_the_lease(running_instance):
    task = make_task(running_instance, lease_token="tok", admitted_at=timezone.now())
    assert transitions.claim(task.pk, token="tok", worker="w")
    Instance.objects.filter(pk=running_instance.pk).update(active_task=task)
    assert transitions.force_stop(task.pk, actor="admin:root", reason="stuck") is True
    task.refresh_from_db()
    assert (task.status, task.error_code) == ("cancelled", "force_stopped")
    # The old worker's late writes are refused (the status is terminal).
    assert transitions.renew_lease(task.pk, token="tok") is None
    assert transitions.report_progress(task.pk, token="tok", progress=50, message="late", step=True) is False
    assert transitions.finish(task.pk, "completed", token="tok", actor="w") is False
    running_instance.refresh_from_db()
    assert running_instance.needs_reconcile is True
    # Its worker may still be inside a provider call: the instance stays held until it
    # reports its exit (by its token) or the revoked lease runs out.
    assert task.held_until == task.lease_expires_at and running_instance.active_task_id == task.pk
    assert transitions.release_hold(task.pk, token="other") is False
    assert transitions.release_hold(task.pk, token="tok") is True
    task.refresh_from_db()
    running_instance.refresh_from_db()
    assert (task.held_until, task.lease_token, running_instance.active_task_id) == (None, "", None)
    assert not task.events.filter(kind="step").exists()


def test_recovery_only_touches_expired_leases(running_instance):
    task = make_task(running_instance, lease_token="tok", admitted_at=timezone.now())
    transitions.claim(task.pk, token="tok", worker="w")
    assert transitions.recover_lost(task.pk) is False  # lease still valid
    Task.objects.filter(pk=task.pk).update(lease_expires_at=timezone.now() - timezone.timedelta(seconds=1))
    assert transitions.recover_lost(task.pk) is True
    task.refresh_from_db()
    # Resumed: pending again, and admitted at once under a new lease token (the old one is void).
    assert (task.status, task.error_code) == ("pending", "") and task.lease_token != "tok"
