"""What users see of who acted on their tasks, and who may cancel what (issue 18, items 5 and 6)."""

from __future__ import annotations

import json

from tasks import services
from tasks.engine import dispatch, transitions
from tasks.models import Task
from tests.api.conftest import client_for


def start(task: Task) -> Task:
    dispatch.admit(task.provider_id)
    task.refresh_from_db()
    assert transitions.claim(task.pk, token=task.lease_token, worker="vm-host-7:13928")
    task.refresh_from_db()
    return task


def test_users_see_roles_never_staff_names_or_worker_hosts(alice, root, running_instance):
    task = start(services.request_operation(root, running_instance.pk, "restart", admin=True))
    services.cancel_task(root, task.pk, admin=True, reason="host maintenance")
    user_view = client_for(alice).get(f"/api/v1/tasks/{task.pk}/")
    assert user_view.status_code == 200
    actors = [e["actor"] for e in user_view.json()["events"]]
    assert actors == ["operator", "system", "operator"]
    text = json.dumps(user_view.json())
    for leak in ("root", "vm-host-7", "13928", "admin:", "worker:"):
        assert leak not in text, leak
    # The operator's reason is meant for the owner and stays.
    assert user_view.json()["events"][-1]["reason"] == "host maintenance"
    # Admin views show them in full.
    admin_view = client_for(root).get(f"/api/v1/admin/tasks/{task.pk}/").json()
    assert [e["actor"] for e in admin_view["events"]] == ["admin:root", "worker:vm-host-7:13928", "admin:root"]


def test_the_owners_own_actions_are_you(as_alice, alice, running_instance):
    task = start(services.request_operation(alice, running_instance.pk, "restart"))
    as_alice.post(f"/api/v1/tasks/{task.pk}/cancel/", {}, format="json")
    events = as_alice.get(f"/api/v1/tasks/{task.pk}/").json()["events"]
    assert [(e["to_status"], e["actor"]) for e in events] == [
        ("pending", "you"),
        ("running", "system"),
        ("cancelling", "you"),
    ]


def test_a_user_cannot_cancel_what_an_operator_queued(as_alice, alice, root, running_instance):
    for task_type in ("stop", "delete"):
        task = services.request_operation(root, running_instance.pk, task_type, admin=True)
        row = as_alice.get(f"/api/v1/tasks/{task.pk}/").json()
        assert row["can_cancel"] is False
        response = as_alice.post(f"/api/v1/tasks/{task.pk}/cancel/", {}, format="json")
        assert (response.status_code, response.json()["code"]) == (409, "not_cancellable")
        assert "operator" in response.json()["detail"]
        assert Task.objects.get(pk=task.pk).status == "pending"
        # Operators can.
        done = client_for(root).post(f"/api/v1/admin/tasks/{task.pk}/cancel/", {"reason": "mistake"}, format="json")
        assert (done.status_code, done.json()["status"]) == (200, "cancelled")
    # Her own tasks stay hers to cancel.
    own = services.request_operation(alice, running_instance.pk, "stop")
    assert as_alice.post(f"/api/v1/tasks/{own.pk}/cancel/", {}, format="json").json()["status"] == "cancelled"


def test_admin_cancel_of_a_cancelling_task_is_200_and_changes_nothing(as_root, alice, running_instance):
    task = start(services.request_operation(alice, running_instance.pk, "restart"))
    services.cancel_task(alice, task.pk)
    before = list(Task.objects.get(pk=task.pk).events.values_list("id", flat=True))
    response = as_root.post(f"/api/v1/admin/tasks/{task.pk}/cancel/", {"reason": "also"}, format="json")
    assert response.status_code == 200
    body = response.json()
    assert (body["status"], body["error_code"]) == ("cancelling", "cancelled_by_user")
    assert list(Task.objects.get(pk=task.pk).events.values_list("id", flat=True)) == before
    # Terminal is still a conflict.
    transitions.finish(task.pk, "cancelled", token=task.lease_token, actor="worker:x")
    again = as_root.post(f"/api/v1/admin/tasks/{task.pk}/cancel/", {"reason": "late"}, format="json")
    assert (again.status_code, again.json()["code"]) == (409, "not_cancellable")
