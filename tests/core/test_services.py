"""Creating, cancelling and force-stopping tasks through the services."""

from __future__ import annotations

import pytest

from tasks import services
from tasks.engine.states import InstanceStatus
from tasks.errors import InstanceBusy, InvalidInput, InvalidState, NotCancellable, NotFound, QuotaExceeded
from tasks.models import Instance, Task, TaskEvent


def test_second_operation_on_a_busy_instance_names_the_task_in_the_way(alice, running_instance):
    first = services.request_operation(alice, running_instance.pk, "stop")
    with pytest.raises(InstanceBusy) as err:
        services.request_operation(alice, running_instance.pk, "restart")
    assert err.value.extra["active_task"] == first.pk
    assert Task.objects.filter(instance=running_instance).count() == 1
    running_instance.refresh_from_db()
    assert running_instance.active_task_id == first.pk


def test_operation_forbidden_by_instance_state(alice, running_instance):
    with pytest.raises(InvalidState):
        services.request_operation(alice, running_instance.pk, "start")
    assert not Task.objects.exists()


def test_users_cannot_touch_others_instances(alice, bob, running_instance):
    with pytest.raises(NotFound):
        services.request_operation(bob, running_instance.pk, "stop")
    task = services.request_operation(alice, running_instance.pk, "stop")
    with pytest.raises(NotFound):
        services.cancel_task(bob, task.pk)


def test_cancel_pending_ends_cancelled_and_frees_the_instance(alice, running_instance):
    task = services.request_operation(alice, running_instance.pk, "stop")
    task = services.cancel_task(alice, task.pk)
    assert (task.status, task.error_code) == ("cancelled", "cancelled_by_user")
    running_instance.refresh_from_db()
    assert running_instance.active_task_id is None
    assert running_instance.status == InstanceStatus.RUNNING
    with pytest.raises(NotCancellable):
        services.cancel_task(alice, task.pk)
    # The instance takes a new operation at once.
    services.request_operation(alice, running_instance.pk, "stop")


def test_admin_cancel_needs_a_reason_and_is_audited(alice, root, running_instance):
    task = services.request_operation(alice, running_instance.pk, "stop")
    with pytest.raises(InvalidInput):
        services.cancel_task(root, task.pk, admin=True, reason="  ")
    task = services.cancel_task(root, task.pk, admin=True, reason="maintenance window")
    assert (task.error_code, task.cancel_reason) == ("cancelled_by_admin", "maintenance window")
    last = TaskEvent.objects.filter(task=task).last()
    assert (last.to_status, last.actor) == ("cancelled", "admin:root")


def test_create_reserves_quota_and_capacity_and_refuses_beyond(alice, provider):
    instance, task = services.create_instance(
        alice, provider=provider, image="debian/12", cpu=2, memory_mb=2048, disk_mb=20480
    )
    provider.refresh_from_db()
    assert (provider.cpu_used, provider.memory_used_mb, provider.containers_used) == (2, 2048, 1)
    alice.quota.refresh_from_db()
    assert alice.quota.used_instances == 1 and alice.quota.used_cpu == 2
    assert instance.ssh_port is not None and instance.active_task_id == task.pk
    with pytest.raises(QuotaExceeded) as err:
        services.create_instance(alice, provider=provider, image="debian/12", cpu=64)
    assert err.value.extra["resource"] == "cpu"
    assert Instance.objects.count() == 1
    # Cancelling the pending create gives everything back.
    services.cancel_task(alice, task.pk)
    provider.refresh_from_db()
    alice.quota.refresh_from_db()
    assert (provider.cpu_used, provider.containers_used, alice.quota.used_instances) == (0, 0, 0)
    instance.refresh_from_db()
    assert instance.status == InstanceStatus.DELETED and not instance.port_mappings.filter(status="pending").exists()
