"""reset and reset-password: rebuild without losing the instance; new passwords shown once."""

from __future__ import annotations

import pytest

from tasks import services
from tasks.errors import Gone
from tasks.models import Instance, TaskSecret
from tests.operations.conftest import fresh, inject, port_statuses, run, store, usage


def test_reset_rebuilds_keeping_row_ports_quota_and_gives_a_new_password(alice, provider, live_instance):
    guest = store(provider).guest(live_instance.guest_name)
    task = services.request_operation(alice, live_instance.pk, "reset")
    run(provider)
    task, instance = fresh(task), fresh(live_instance)
    assert task.status == "completed" and instance.status == "running"
    assert Instance.objects.count() == 1 and instance.name == live_instance.name
    assert usage(instance) == (1, 2, 2, 1) and set(port_statuses(instance)) == {"active"}
    after = store(provider).guest(instance.guest_name)
    assert after["generation"] == guest["generation"] + 1
    assert len(store(provider).ports(instance.guest_name)) == 3  # the mappings survive the rebuild
    password = services.read_password_once(alice, task.pk)
    assert store(provider).password_matches(instance.guest_name, password)


@pytest.mark.parametrize("failing", ["rebuild", "start", "set_password"])
def test_failed_reset_keeps_the_instance_marked_error(alice, provider, live_instance, failing):
    inject(provider, fail_ops={failing: "permanent"})
    task = services.request_operation(alice, live_instance.pk, "reset")
    run(provider)
    task, instance = fresh(task), fresh(live_instance)
    assert (task.status, task.error_code) == ("failed", "provider_error")
    assert instance.status == "error" and instance.holds_resources and usage(instance) == (1, 2, 2, 1)
    assert set(port_statuses(instance)) == {"active"}
    assert not TaskSecret.objects.filter(task=task).exists()
    # A second reset is the way out.
    inject(provider, fail_ops={})
    again = services.request_operation(alice, instance.pk, "reset")
    run(provider)
    assert fresh(again).status == "completed" and fresh(instance).status == "running"


def test_cancel_mid_rebuild_keeps_the_instance_marked_error(alice, provider, live_instance, interrupt):
    interrupt("rebuild", "cancel", at=2)  # during the reinstall
    task = services.request_operation(alice, live_instance.pk, "reset")
    run(provider)
    task, instance = fresh(task), fresh(live_instance)
    assert task.status == "cancelled" and instance.status == "error" and usage(instance) == (1, 2, 2, 1)
    assert store(provider).guest(instance.guest_name)["status"] == "rebuilding"


def test_reset_timeout_keeps_the_instance_marked_error(alice, provider, live_instance):
    inject(provider, hang_ops=["rebuild"])
    task = services.request_operation(alice, live_instance.pk, "reset", timeout_seconds=1)
    run(provider)
    task, instance = fresh(task), fresh(live_instance)
    assert (task.status, task.error_code) == ("timeout", "timeout")
    assert instance.status == "error" and usage(instance) == (1, 2, 2, 1)


def test_reset_password_sets_a_new_password_readable_once(alice, bob, provider, live_instance):
    task = services.request_operation(alice, live_instance.pk, "reset-password")
    run(provider)
    task, instance = fresh(task), fresh(live_instance)
    assert task.status == "completed" and instance.status == "running"
    assert "password" not in str(task.task_data).lower()
    from tasks.errors import NotFound

    with pytest.raises(NotFound):
        services.read_password_once(bob, task.pk)  # not the owner: does not exist for bob
    password = services.read_password_once(alice, task.pk)
    assert store(provider).password_matches(instance.guest_name, password)
    with pytest.raises(Gone):
        services.read_password_once(alice, task.pk)
    assert TaskSecret.objects.get(task=task).ciphertext == ""  # gone from the database too


def test_reset_password_failure_keeps_no_secret_and_the_status(alice, provider, live_instance):
    inject(provider, fail_ops={"set_password": "permanent"})
    task = services.request_operation(alice, live_instance.pk, "reset-password")
    run(provider)
    assert fresh(task).status == "failed" and fresh(live_instance).status == "running"
    assert not TaskSecret.objects.filter(task=task).exists()
    with pytest.raises(Gone):
        services.read_password_once(alice, task.pk)


@pytest.mark.parametrize("how", ["cancel", "timeout"])
def test_reset_password_cancel_or_timeout(alice, provider, live_instance, interrupt, how):
    interrupt("set_password", how)
    task = services.request_operation(alice, live_instance.pk, "reset-password")
    run(provider)
    task = fresh(task)
    assert task.status == {"cancel": "cancelled", "timeout": "timeout"}[how]
    assert fresh(live_instance).status == "running" and not TaskSecret.objects.filter(task=task).exists()


def test_reset_password_real_deadline(alice, provider, live_instance):
    inject(provider, hang_ops=["set_password"])
    task = services.request_operation(alice, live_instance.pk, "reset-password", timeout_seconds=1)
    run(provider)
    assert fresh(task).status == "timeout" and fresh(live_instance).status == "running"
