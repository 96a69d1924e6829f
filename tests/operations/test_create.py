"""create: the guest, its password, its ports; on failure or cancel nothing is left."""

from __future__ import annotations

import pytest

from tasks import services
from tasks.errors import Gone
from tasks.models import TaskSecret
from tasks.reconcile import reconcile_instance
from tests.operations.conftest import clear, fresh, inject, port_statuses, run, store, usage


def test_create_runs_the_guest_with_password_ports_and_addresses(alice, provider):
    instance, task = services.create_instance(alice, provider=provider, image="debian/12", cpu=2, memory_mb=1024)
    run(provider)
    task, instance = fresh(task), fresh(instance)
    assert (task.status, task.progress) == ("completed", 100)
    assert instance.status == "running" and instance.addresses and instance.active_task_id is None
    assert instance.provider_ref["name"] == instance.guest_name
    assert usage(instance) == (1, 2, 2, 1)
    assert port_statuses(instance) == ["active", "active"]
    host = store(provider)
    guest = host.guest(instance.guest_name)
    assert guest["status"] == "running" and guest["cpu"] == 2
    # First port -> SSH 22; the rest of the block 1:1, tcp and udp: three mappings on the host.
    ports = {(p["protocol"], p["host_start"], p["guest_start"]) for p in host.ports(instance.guest_name)}
    assert ("tcp", instance.ssh_port, 22) in ports and len(ports) == 3
    password = services.read_password_once(alice, task.pk)
    assert host.password_matches(instance.guest_name, password)
    with pytest.raises(Gone):
        services.read_password_once(alice, task.pk)
    assert host.applied("create", instance.guest_name) == 1
    steps = list(task.events.filter(kind="step").values_list("message", flat=True))
    assert "creating the guest" in steps and "setting up" not in steps and steps[-1] == "created"


def test_lost_response_after_create_does_not_create_twice(alice, provider):
    inject(provider, fail_ops={"create": "ambiguous"}, fail_times={"create": 1})
    instance, task = services.create_instance(alice, provider=provider, image="debian/12")
    run(provider)
    assert fresh(task).status == "completed"
    calls = store(provider).executions("create", instance.guest_name)
    assert [c["applied"] for c in calls] == [1, 0]  # the retry found the guest it had made


def test_transient_errors_are_retried(alice, provider):
    inject(provider, fail_times={"start": 2})
    instance, task = services.create_instance(alice, provider=provider, image="debian/12")
    run(provider)
    assert fresh(task).status == "completed"
    outcomes = [c["outcome"] for c in store(provider).executions("start", instance.guest_name)]
    assert outcomes == ["failed:retryable", "failed:retryable", "applied"]


@pytest.mark.parametrize("failing", ["create", "start", "set_password", "add_port"])
def test_provider_failure_releases_everything_and_leaves_no_guest(alice, provider, failing):
    inject(provider, fail_ops={failing: "permanent"})
    instance, task = services.create_instance(alice, provider=provider, image="debian/12", name="web")
    run(provider)
    task, instance = fresh(task), fresh(instance)
    assert (task.status, task.error_code) == ("failed", "provider_error")
    assert f"simulated permanent failure of {failing}" in task.error_message
    assert instance.status == "failed" and instance.live_name is None and not instance.holds_resources
    assert usage(instance) == (0, 0, 0, 0)
    assert set(port_statuses(instance)) == {"deleted"}
    assert store(provider).guest(instance.guest_name) is None and store(provider).ports() == []
    assert not TaskSecret.objects.filter(task=task).exists()
    clear(provider)  # the name is free again
    again, _ = services.create_instance(alice, provider=provider, image="debian/12", name="web")
    run(provider)
    assert fresh(again).status == "running"


@pytest.mark.parametrize("step", ["image", "unpack", "add_port"])
def test_cancel_while_running_removes_the_partial_guest(alice, provider, interrupt, step):
    op, at = {"image": ("create", 1), "unpack": ("create", 2), "add_port": ("add_port", 2)}[step]
    interrupt(op, "cancel", at=at)
    instance, task = services.create_instance(alice, provider=provider, image="debian/12")
    run(provider)
    task, instance = fresh(task), fresh(instance)
    assert (task.status, task.error_code) == ("cancelled", "cancelled_by_user")
    assert [e for e in task.events.filter(kind="transition").values_list("to_status", flat=True)] == [
        "pending",
        "running",
        "cancelling",
        "cancelled",
    ]
    assert instance.status == "failed" and usage(instance) == (0, 0, 0, 0)
    assert set(port_statuses(instance)) == {"deleted"}
    assert store(provider).guest(instance.guest_name) is None and store(provider).ports() == []


def test_timeout_removes_the_guest_and_releases(alice, provider):
    # The guest exists (created and started) when the password step hangs past the deadline.
    inject(provider, hang_ops=["set_password"])
    instance, task = services.create_instance(alice, provider=provider, image="debian/12", timeout_seconds=1)
    run(provider)
    task, instance = fresh(task), fresh(instance)
    assert (task.status, task.error_code) == ("timeout", "timeout")
    assert instance.status == "failed" and usage(instance) == (0, 0, 0, 0)
    assert store(provider).guest(instance.guest_name) is None
    assert store(provider).applied("create", instance.guest_name) == 1
    assert store(provider).applied("delete", instance.guest_name) == 1


def test_guest_that_cannot_be_removed_keeps_its_resources_until_reconciled(alice, provider):
    inject(provider, fail_ops={"add_port": "permanent", "delete": "permanent"})
    instance, task = services.create_instance(alice, provider=provider, image="debian/12")
    run(provider)
    task, instance = fresh(task), fresh(instance)
    assert task.status == "failed" and "could not be removed again" in task.error_message
    # The guest still uses the host: nothing is released, the operator sees why.
    assert instance.status == "error" and instance.needs_reconcile and instance.holds_resources
    assert usage(instance) == (1, 1, 1, 1)
    assert store(provider).guest(instance.guest_name) is not None
    assert f"guest {instance.guest_name} may remain on the provider" in task.error_message
    # Reconciliation: the guest exists, the create never completed -> error, kept, and
    # still flagged: the guest may stay on the host until a delete removes it.
    clear(provider)
    assert reconcile_instance(instance.pk) is True
    instance = fresh(instance)
    assert (instance.status, instance.needs_reconcile, instance.holds_resources) == ("error", True, True)
    # The owner deletes it: now it is verifiably gone and everything comes back.
    services.request_operation(alice, instance.pk, "delete")
    run(provider)
    assert fresh(instance).status == "deleted" and usage(instance) == (0, 0, 0, 0)
    assert not set(port_statuses(instance)) & {"pending", "active", "deleting"}


def test_force_stopped_create_is_settled_by_reconciliation(alice, provider, interrupt):
    interrupt("create", "force_stop", at=2)
    instance, task = services.create_instance(alice, provider=provider, image="debian/12")
    run(provider)
    task, instance = fresh(task), fresh(instance)
    assert (task.status, task.error_code) == ("cancelled", "force_stopped")
    # Force-stop cannot know what the provider holds: keep the reservation, reconcile.
    assert instance.status == "unknown" and instance.needs_reconcile and usage(instance) == (1, 1, 1, 1)
    # The worker, fenced off, still removed its half-built guest.
    assert store(provider).guest(instance.guest_name) is None
    assert reconcile_instance(instance.pk) is True
    instance = fresh(instance)
    assert instance.status == "failed" and usage(instance) == (0, 0, 0, 0)
    assert set(port_statuses(instance)) == {"deleted"}


def test_create_beyond_quota_or_capacity_is_refused_before_anything_runs(alice, bob, provider):
    from tasks.errors import CapacityExceeded, QuotaExceeded
    from tasks.models import Task

    provider.max_containers = 1
    provider.save()
    services.create_instance(alice, provider=provider, image="debian/12")
    with pytest.raises(CapacityExceeded) as err:
        services.create_instance(bob, provider=provider, image="debian/12")
    assert (err.value.code, err.value.http_status, err.value.extra["resource"]) == (
        "capacity_exceeded",
        409,
        "containers",
    )
    with pytest.raises(QuotaExceeded) as err:
        services.create_instance(bob, provider=provider, image="debian/12", instance_type="vm", cpu=999)
    assert err.value.code == "quota_exceeded"
    assert Task.objects.count() == 1
    run(provider)
    assert store(provider).guests()[0]["cpu"] == 1 and len(store(provider).guests()) == 1
