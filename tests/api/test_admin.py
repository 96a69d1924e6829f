"""Admin endpoints: task detail with redacted data, cancel and force-stop with a reason,
provider limits that apply at once, live workers, actions on anyone's instance."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from tasks import services
from tasks.engine import dispatch, transitions
from tasks.models import Instance, Provider, Task, Worker
from tests.conftest import make_task


def start(task: Task) -> Task:
    dispatch.admit(task.provider_id)
    task.refresh_from_db()
    assert transitions.claim(task.pk, token=task.lease_token, worker="test:1")
    task.refresh_from_db()
    return task


def test_admin_detail_redacts_secrets_in_task_data(as_root, running_instance):
    task = make_task(
        running_instance,
        task_data={
            "image": "debian/12",
            "root_password": "hunter2",
            "API_KEY": "abc",
            "nested": {"auth_token": "t0k", "ports": [{"secret": "s", "port": 22}]},
            "keys": ["ssh-ed25519 AAAA"],
        },
    )
    body = as_root.get(f"/api/v1/admin/tasks/{task.pk}/").json()
    assert body["task_data"] == {
        "image": "debian/12",
        "root_password": "[redacted]",
        "API_KEY": "[redacted]",
        "nested": {"auth_token": "[redacted]", "ports": [{"secret": "[redacted]", "port": 22}]},
        "keys": "[redacted]",
    }
    raw = as_root.get(f"/api/v1/admin/tasks/{task.pk}/").content.decode()
    assert "hunter2" not in raw and "t0k" not in raw
    assert {"events", "admitted_at", "lease_expires_at", "worker", "can_force_stop"} <= set(body)
    # Users never get task data at all.
    assert "task_data" not in as_root.get("/api/v1/admin/tasks/").json()["results"][0]


def test_admin_cancel_of_another_users_task_needs_a_reason(as_root, alice, running_instance):
    task = services.request_operation(alice, running_instance.pk, "stop")
    missing = as_root.post(f"/api/v1/admin/tasks/{task.pk}/cancel/", {}, format="json")
    assert (missing.status_code, missing.json()["field"]) == (400, "reason")
    done = as_root.post(f"/api/v1/admin/tasks/{task.pk}/cancel/", {"reason": "host maintenance"}, format="json")
    assert done.status_code == 200
    body = done.json()
    assert (body["status"], body["error_code"], body["cancel_reason"]) == (
        "cancelled",
        "cancelled_by_admin",
        "host maintenance",
    )
    assert body["events"][-1]["actor"] == "admin:root"
    again = as_root.post(f"/api/v1/admin/tasks/{task.pk}/cancel/", {"reason": "again"}, format="json")
    assert (again.status_code, again.json()["code"]) == (409, "not_cancellable")


def test_admin_can_cancel_a_running_delete(as_root, alice, running_instance):
    task = start(services.request_operation(alice, running_instance.pk, "delete"))
    row = as_root.get(f"/api/v1/admin/tasks/{task.pk}/").json()
    assert row["can_cancel"] is True and row["can_force_stop"] is True
    body = as_root.post(f"/api/v1/admin/tasks/{task.pk}/cancel/", {"reason": "wrong one"}, format="json").json()
    assert body["status"] == "cancelling"
    assert body["can_cancel"] is False and body["can_force_stop"] is True


def test_force_stop_ends_a_running_task_at_once(as_root, alice, running_instance):
    task = start(services.request_operation(alice, running_instance.pk, "restart"))
    missing = as_root.post(f"/api/v1/admin/tasks/{task.pk}/force-stop/", {"reason": "  "}, format="json")
    assert (missing.status_code, missing.json()["field"]) == (400, "reason")
    response = as_root.post(f"/api/v1/admin/tasks/{task.pk}/force-stop/", {"reason": "worker hung"}, format="json")
    assert response.status_code == 200
    body = response.json()
    assert (body["status"], body["error_code"], body["cancel_reason"]) == ("cancelled", "force_stopped", "worker hung")
    instance = Instance.objects.get(pk=running_instance.pk)
    # Terminal for everyone at once, but its worker may still be inside a provider call:
    # the instance stays held ("stopping") until the worker says it stopped or the lease ends.
    assert instance.active_task_id == task.pk and instance.needs_reconcile is True
    assert Task.objects.get(pk=task.pk).held_until is not None
    again = as_root.post(f"/api/v1/admin/tasks/{task.pk}/force-stop/", {"reason": "again"}, format="json")
    assert (again.status_code, again.json()["code"]) == (409, "not_cancellable")
    from tasks.engine import transitions

    transitions.release_expired_holds(Task.objects.get(pk=task.pk).held_until + timedelta(seconds=1))
    assert Instance.objects.get(pk=running_instance.pk).active_task_id is None


def test_force_stop_of_unknown_task_is_404(as_root):
    response = as_root.post("/api/v1/admin/tasks/424242/force-stop/", {"reason": "x"}, format="json")
    assert (response.status_code, response.json()["code"]) == (404, "not_found")


def test_providers_list_shows_limits_and_load(as_root, alice, provider, make_instance):
    first = start(services.request_operation(alice, make_instance(alice, provider).pk, "stop"))
    services.request_operation(alice, make_instance(alice, provider).pk, "stop")
    rows = as_root.get("/api/v1/admin/providers/").json()["results"]
    assert len(rows) == 1
    row = rows[0]
    assert (row["running"], row["pending"], row["concurrency_limit"]) == (1, 1, 1)
    assert first.status == "running"
    assert "secrets_encrypted" not in row and "connection" not in row


def test_patch_changes_limits_and_admits_waiting_tasks_at_once(
    as_root, alice, provider, make_instance, django_capture_on_commit_callbacks
):
    start(services.request_operation(alice, make_instance(alice, provider).pk, "stop"))
    waiting = [services.request_operation(alice, make_instance(alice, provider).pk, "stop") for _ in range(2)]
    dispatch.admit(provider.pk)
    assert not Task.objects.filter(pk__in=[t.pk for t in waiting], admitted_at__isnull=False).exists()
    with django_capture_on_commit_callbacks(execute=True):
        response = as_root.patch(
            f"/api/v1/admin/providers/{provider.pk}/",
            {"allow_concurrent_tasks": True, "max_concurrent_tasks": 3},
            format="json",
        )
    assert response.status_code == 200, response.content
    assert (response.json()["concurrency_limit"], response.json()["max_concurrent_tasks"]) == (3, 3)
    assert Task.objects.filter(pk__in=[t.pk for t in waiting], admitted_at__isnull=False).count() == 2


def test_patch_reenabling_a_provider_admits_at_once(
    as_root, alice, provider, make_instance, django_capture_on_commit_callbacks
):
    provider.enabled = False
    provider.save()
    task = services.request_operation(alice, make_instance(alice, provider).pk, "stop")
    dispatch.admit(provider.pk)
    assert Task.objects.get(pk=task.pk).admitted_at is None
    with django_capture_on_commit_callbacks(execute=True):
        response = as_root.patch(f"/api/v1/admin/providers/{provider.pk}/", {"enabled": True}, format="json")
    assert response.json()["enabled"] is True
    assert Task.objects.get(pk=task.pk).admitted_at is not None


@pytest.mark.parametrize(
    "body, field",
    [
        ({"max_concurrent_tasks": 0}, "max_concurrent_tasks"),
        # a limit above 1 on a serial provider would be stored and change nothing
        ({"max_concurrent_tasks": 4}, "max_concurrent_tasks"),
        ({"allow_concurrent_tasks": False, "max_concurrent_tasks": 4}, "max_concurrent_tasks"),
        ({"max_concurrent_tasks": 257}, "max_concurrent_tasks"),
        ({"max_concurrent_tasks": "many"}, "max_concurrent_tasks"),
        ({"max_concurrent_tasks": 10**40}, "max_concurrent_tasks"),
        ({"task_poll_interval": 0}, "task_poll_interval"),
        ({"task_poll_interval": 3601}, "task_poll_interval"),
        ({"enabled": "perhaps"}, "enabled"),
        ({"allow_concurrent_tasks": None}, "allow_concurrent_tasks"),
        ({"name": "renamed"}, "name"),
        ({"cpu_used": 0}, "cpu_used"),
    ],
)
def test_patch_rejects_bad_values_naming_the_field(as_root, provider, body, field):
    response = as_root.patch(f"/api/v1/admin/providers/{provider.pk}/", body, format="json")
    assert response.status_code == 400, response.content
    assert response.json()["field"] == field
    fresh = Provider.objects.get(pk=provider.pk)
    assert (fresh.name, fresh.max_concurrent_tasks, fresh.task_poll_interval, fresh.enabled) == ("sim-a", 1, 5, True)


def test_put_on_a_provider_is_405(as_root, provider):
    response = as_root.put(f"/api/v1/admin/providers/{provider.pk}/", {"enabled": False}, format="json")
    assert (response.status_code, response.json()["code"]) == (405, "method_not_allowed")


def test_workers_lists_only_live_ones(as_root, running_instance, settings):
    settings.TASK_HEARTBEAT_SECONDS = 3
    task = make_task(running_instance, status="running")
    now = timezone.now()
    Worker.objects.create(
        name="n1:10", node="n1", host="h1", pid=10, queue="provider-1", last_heartbeat=now, current_task=task
    )
    Worker.objects.create(
        name="n1:11", node="n1", host="h1", pid=11, queue="provider-1", last_heartbeat=now - timedelta(seconds=15)
    )
    Worker.objects.create(
        name="n2:12", node="n2", host="h2", pid=12, queue="provider-2", last_heartbeat=now - timedelta(seconds=60)
    )
    rows = as_root.get("/api/v1/admin/workers/").json()["results"]
    assert [(r["name"], r["current_task"]) for r in rows] == [("n1:10", task.pk), ("n1:11", None)]
    assert {"id", "host", "pid", "queue", "last_heartbeat", "current_task"} <= set(rows[0])


def test_admin_actions_on_anyones_instance(as_root, as_alice, root, running_instance):
    response = as_root.post(f"/api/v1/admin/instances/{running_instance.pk}/stop/", {}, format="json")
    assert response.status_code == 202
    task = response.json()["task"]
    assert task["user"]["username"] == "alice"
    assert Task.objects.get(pk=task["id"]).initiator == root
    busy = as_root.post(f"/api/v1/admin/instances/{running_instance.pk}/restart/", {}, format="json")
    assert (busy.status_code, busy.json()["code"], busy.json()["active_task"]) == (409, "instance_busy", task["id"])
    # The owner sees the task, and that staff started it.
    mine = as_alice.get(f"/api/v1/tasks/{task['id']}/").json()
    assert mine["initiator"]["username"] == "staff"


def test_admin_instance_list_filters_by_owner(as_root, alice, bob, provider, make_instance):
    a = make_instance(alice, provider, name="a")
    b = make_instance(bob, provider, name="b")
    rows = as_root.get(f"/api/v1/admin/instances/?user={bob.pk}").json()["results"]
    assert [r["id"] for r in rows] == [b.pk]
    assert rows[0]["owner"] == {"id": bob.pk, "username": "bob"}
    assert {r["id"] for r in as_root.get("/api/v1/admin/instances/").json()["results"]} == {a.pk, b.pk}
