"""delete: release quota, capacity and ports only once the guest is verifiably gone."""

from __future__ import annotations

import pytest

from tasks import services
from tests.operations.conftest import fresh, inject, port_statuses, run, store, usage


def _delete(user, instance, **kwargs):
    return services.request_operation(user, instance.pk, "delete", **kwargs)


def test_delete_removes_the_guest_then_releases_everything(alice, provider, live_instance):
    assert usage(live_instance) == (1, 2, 2, 1)
    task = _delete(alice, live_instance)
    run(provider)
    task, instance = fresh(task), fresh(live_instance)
    assert (task.status, task.progress) == ("completed", 100)
    assert instance.status == "deleted" and instance.live_name is None and instance.deleted_at is not None
    assert usage(instance) == (0, 0, 0, 0) and not instance.holds_resources
    assert set(port_statuses(instance)) == {"deleted"}
    assert store(provider).guest(instance.guest_name) is None and store(provider).ports() == []
    # Its name and ports are free for the next instance.
    again, _ = services.create_instance(alice, provider=provider, image="debian/12", name=instance.name)
    run(provider)
    assert fresh(again).status == "running" and fresh(again).ssh_port == instance.ssh_port


def test_retryable_errors_are_retried_with_backoff_2_4_8(alice, provider, live_instance, settings):
    settings.TASK_RETRY_BASE_SECONDS = 0.05
    inject(provider, fail_times={"delete": 3})
    task = _delete(alice, live_instance)
    run(provider)
    task = fresh(task)
    assert task.status == "completed" and fresh(live_instance).status == "deleted"
    calls = store(provider).executions("delete", live_instance.guest_name)
    assert [c["outcome"] for c in calls] == ["failed:retryable"] * 3 + ["applied"]
    gaps = [round(b["at"] - a["at"], 2) for a, b in zip(calls, calls[1:], strict=False)]
    # Waits of base x 1, 2, 4 (2 s, 4 s, 8 s with the default base of 2 s).
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1 and gaps[2] >= 0.2, gaps


def test_retries_exhausted_fail_and_keep_everything(alice, provider, live_instance):
    inject(provider, fail_times={"delete": 4})
    task = _delete(alice, live_instance)
    run(provider)
    task, instance = fresh(task), fresh(live_instance)
    assert (task.status, task.error_code) == ("failed", "provider_error")
    assert len(store(provider).executions("delete", instance.guest_name)) == 4  # 1 + 3 retries
    assert instance.status == "error" and instance.holds_resources and usage(instance) == (1, 2, 2, 1)
    assert set(port_statuses(instance)) == {"active"}


@pytest.mark.parametrize(
    "knobs",
    [
        {"delete_leaves_guest": True},  # the provider says "deleted" but the guest is still there
        {"fail_ops": {"get_state": "retryable"}},  # the provider cannot be read afterwards
    ],
    ids=["guest-left", "unreadable"],
)
def test_delete_that_cannot_verify_removal_fails_and_releases_nothing(alice, provider, live_instance, knobs):
    inject(provider, **knobs)
    task = _delete(alice, live_instance)
    run(provider)
    task, instance = fresh(task), fresh(live_instance)
    assert (task.status, task.error_code) == ("failed", "verify_failed")
    assert instance.status == "error" and instance.live_name == instance.name and instance.deleted_at is None
    assert instance.holds_resources and usage(instance) == (1, 2, 2, 1)
    assert set(port_statuses(instance)) == {"active"}


def test_permanent_failure_keeps_the_instance_marked_error(alice, provider, live_instance):
    inject(provider, fail_ops={"delete": "permanent"})
    task = _delete(alice, live_instance)
    run(provider)
    instance = fresh(live_instance)
    assert fresh(task).status == "failed" and instance.status == "error" and usage(instance) == (1, 2, 2, 1)
    assert store(provider).guest(instance.guest_name) is not None


def test_admin_cancel_before_removal_keeps_the_instance(alice, provider, live_instance, interrupt):
    interrupt("delete", "cancel", at=2)  # after the guest was stopped, before it is removed
    task = _delete(alice, live_instance)
    run(provider)
    task, instance = fresh(task), fresh(live_instance)
    assert (task.status, task.error_code) == ("cancelled", "cancelled_by_admin")
    assert instance.status == "stopped" == store(provider).guest(instance.guest_name)["status"]
    assert usage(instance) == (1, 2, 2, 1) and set(port_statuses(instance)) == {"active"}


def test_timeout_keeps_the_instance_with_its_true_state(alice, provider, live_instance):
    inject(provider, hang_ops=["delete"])
    task = _delete(alice, live_instance, timeout_seconds=1)
    run(provider)
    task, instance = fresh(task), fresh(live_instance)
    assert (task.status, task.error_code) == ("timeout", "timeout")
    assert instance.status == "running" and usage(instance) == (1, 2, 2, 1)


def test_delete_of_a_failed_create_completes(alice, provider):
    inject(provider, fail_ops={"create": "permanent"})
    instance, _ = services.create_instance(alice, provider=provider, image="debian/12")
    run(provider)
    assert fresh(instance).status == "failed"
    task = _delete(alice, instance)
    run(provider)
    assert fresh(task).status == "completed" and fresh(instance).status == "deleted"
    assert usage(instance) == (0, 0, 0, 0)
