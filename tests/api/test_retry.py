"""POST /api/v1/tasks/{id}/retry/ (and the admin API's): a new task with retry_of, or 409."""

from __future__ import annotations

import pytest

from tasks.engine import transitions
from tasks.engine.states import CANCELLED, COMPLETED, FAILED, TIMEOUT, InstanceStatus
from tasks.models import Instance, Task
from tests.api.test_tasks import start
from tests.conftest import make_task


def finished(instance, status, task_type="stop", **fields) -> Task:
    return make_task(instance, task_type=task_type, status=status, timeout_seconds=120, **fields)


@pytest.mark.parametrize("status", [FAILED, TIMEOUT, CANCELLED])
def test_a_failed_timed_out_or_cancelled_task_is_asked_again(as_alice, running_instance, status):
    old = finished(running_instance, status)
    response = as_alice.post(f"/api/v1/tasks/{old.pk}/retry/")
    assert response.status_code == 202, response.json()
    new = response.json()["task"]
    assert new["id"] != old.pk and new["retry_of"] == old.pk
    assert new["task_type"] == "stop" and new["status"] == "pending" and new["attempt"] == 1
    assert new["instance"]["id"] == running_instance.pk and new["timeout_seconds"] == 120
    running_instance.refresh_from_db()
    assert running_instance.active_task_id == new["id"]
    detail = as_alice.get(f"/api/v1/tasks/{new['id']}/").json()
    assert detail["retry_of"] == old.pk
    assert as_alice.get(f"/api/v1/tasks/{old.pk}/").json()["retry_of"] is None


def test_the_retry_runs_and_completes(as_alice, running_instance):
    from tasks.engine.worker import run_admitted_inline

    old = finished(running_instance, FAILED)
    new_id = as_alice.post(f"/api/v1/tasks/{old.pk}/retry/").json()["task"]["id"]
    run_admitted_inline(running_instance.provider_id)
    new = Task.objects.get(pk=new_id)
    assert new.status == COMPLETED and new.retry_of_id == old.pk
    running_instance.refresh_from_db()
    assert running_instance.status == InstanceStatus.STOPPED


def test_completed_or_active_tasks_are_not_retryable(as_alice, running_instance):
    done = finished(running_instance, COMPLETED)
    response = as_alice.post(f"/api/v1/tasks/{done.pk}/retry/")
    assert response.status_code == 409
    assert response.json()["code"] == "not_retryable" and response.json()["status"] == "completed"
    from tasks import services

    active = services.request_operation(running_instance.owner, running_instance.pk, "stop")
    response = as_alice.post(f"/api/v1/tasks/{active.pk}/retry/")
    assert response.status_code == 409 and response.json()["code"] == "not_retryable"


def test_instance_busy_when_another_task_holds_the_instance(as_alice, running_instance):
    from tasks import services

    old = finished(running_instance, FAILED)
    other = services.request_operation(running_instance.owner, running_instance.pk, "restart")
    response = as_alice.post(f"/api/v1/tasks/{old.pk}/retry/")
    assert response.status_code == 409
    assert response.json()["code"] == "instance_busy" and response.json()["active_task"] == other.pk
    assert not Task.objects.filter(retry_of=old).exists()


def test_a_gone_instance_is_not_retryable(as_alice, running_instance):
    old = finished(running_instance, FAILED)
    Instance.objects.filter(pk=running_instance.pk).update(status=InstanceStatus.DELETED)
    response = as_alice.post(f"/api/v1/tasks/{old.pk}/retry/")
    assert response.status_code == 409 and response.json()["code"] == "not_retryable"


def test_instance_state_that_forbids_the_operation(as_alice, running_instance):
    old = finished(running_instance, FAILED, task_type="start")  # the instance is running now
    response = as_alice.post(f"/api/v1/tasks/{old.pk}/retry/")
    assert response.status_code == 409 and response.json()["code"] == "invalid_state"


def test_a_failed_create_that_released_everything_is_not_retryable(as_alice, running_instance):
    old = finished(running_instance, FAILED, task_type="create")
    Instance.objects.filter(pk=running_instance.pk).update(status=InstanceStatus.FAILED, holds_resources=False)
    response = as_alice.post(f"/api/v1/tasks/{old.pk}/retry/")
    assert response.status_code == 409 and response.json()["code"] == "not_retryable"


def test_a_create_that_may_have_left_a_guest_runs_again(as_alice, running_instance):
    """The instance still holds its resources (its guest may exist): the create converges on it."""
    from tasks.engine.worker import run_admitted_inline

    old = finished(running_instance, FAILED, task_type="create", task_data={"image": "debian/12", "cpu": 1})
    Instance.objects.filter(pk=running_instance.pk).update(status=InstanceStatus.UNKNOWN, holds_resources=True)
    response = as_alice.post(f"/api/v1/tasks/{old.pk}/retry/")
    assert response.status_code == 202, response.json()
    new = Task.objects.get(pk=response.json()["task"]["id"])
    assert new.task_type == "create" and new.task_data == {"image": "debian/12", "cpu": 1}
    run_admitted_inline(running_instance.provider_id)
    new.refresh_from_db()
    assert new.status == COMPLETED


def test_someone_elses_task_is_404_and_anonymous_401(as_bob, anon, running_instance):
    old = finished(running_instance, FAILED)
    assert as_bob.post(f"/api/v1/tasks/{old.pk}/retry/").status_code == 404
    assert anon.post(f"/api/v1/tasks/{old.pk}/retry/").status_code == 401
    assert as_bob.post("/api/v1/tasks/999999/retry/").status_code == 404


def test_admin_api_retries_any_users_task(as_root, as_bob, root, running_instance):
    old = finished(running_instance, TIMEOUT)
    assert as_bob.post(f"/api/v1/admin/tasks/{old.pk}/retry/").status_code == 403
    response = as_root.post(f"/api/v1/admin/tasks/{old.pk}/retry/")
    assert response.status_code == 202
    new = Task.objects.get(pk=response.json()["task"]["id"])
    assert new.retry_of_id == old.pk and new.initiator_id == root.pk and new.owner_id == old.owner_id


def test_a_cancelled_running_task_can_be_retried_after_it_ended(as_alice, running_instance):
    from tasks import services

    task = start(services.request_operation(running_instance.owner, running_instance.pk, "restart"))
    assert transitions.finish(task.pk, CANCELLED, token=task.lease_token, actor="worker:test")
    response = as_alice.post(f"/api/v1/tasks/{task.pk}/retry/")
    assert response.status_code == 202 and response.json()["task"]["task_type"] == "restart"
