"""The user task endpoints: representation, timeline, cancel, the once-only password."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from tasks import crypto, services
from tasks.engine import dispatch, transitions
from tasks.models import Task, TaskSecret
from tests.conftest import make_task

TASK_FIELDS = {
    "id",
    "uuid",
    "task_type",
    "status",
    "progress",
    "status_message",
    "error_code",
    "error_message",
    "cancel_reason",
    "provider",
    "instance",
    "user",
    "initiator",
    "created_at",
    "started_at",
    "completed_at",
    "timeout_seconds",
    "remaining_seconds",
    "can_cancel",
    "queue_position",
    "estimated_wait_seconds",
    "blocked_reason",
    "attempt",
    "retry_of",
}


def start(task: Task) -> Task:
    """Admit and claim a pending task the way a worker does."""
    dispatch.admit(task.provider_id)
    task.refresh_from_db()
    assert transitions.claim(task.pk, token=task.lease_token, worker="test:1")
    task.refresh_from_db()
    return task


def test_list_rows_have_exactly_the_documented_fields(as_alice, running_instance):
    task = services.request_operation(running_instance.owner, running_instance.pk, "stop", timeout_seconds=120)
    row = as_alice.get("/api/v1/tasks/").json()["results"][0]
    assert set(row) == TASK_FIELDS
    assert row["id"] == task.pk and row["uuid"] == str(task.uuid)
    assert row["provider"] == {"id": running_instance.provider_id, "name": "sim-a", "type": "simulated"}
    assert row["instance"] == {"id": running_instance.pk, "name": running_instance.name, "instance_type": "container"}
    assert row["user"] == {"id": running_instance.owner_id, "username": "alice"}
    assert row["initiator"] == {"id": running_instance.owner_id, "username": "alice"}
    assert row["timeout_seconds"] == 120
    assert row["created_at"].endswith("Z")


def test_detail_shows_the_timeline_in_order(as_alice, alice, running_instance):
    task = services.request_operation(alice, running_instance.pk, "stop")
    task = start(task)
    transitions.report_progress(task.pk, token=task.lease_token, progress=50, message="stopping guest", step=True)
    transitions.finish(task.pk, "completed", token=task.lease_token, actor="worker:test:1")
    body = as_alice.get(f"/api/v1/tasks/{task.pk}/").json()
    assert set(body) == TASK_FIELDS | {"events"}
    assert [(e["from_status"], e["to_status"]) for e in body["events"]] == [
        ("", "pending"),
        ("pending", "running"),
        ("running", "running"),
        ("running", "completed"),
    ]
    assert body["events"][2]["message"] == "stopping guest" and body["events"][2]["progress"] == 50
    assert {"actor", "reason", "progress", "message", "at"} <= set(body["events"][0])
    assert body["status"] == "completed" and body["progress"] == 100
    assert body["can_cancel"] is False
    assert body["queue_position"] is None and body["blocked_reason"] is None and body["remaining_seconds"] is None


def test_default_timeout_is_shown_when_none_was_given(as_alice, alice, running_instance):
    task = services.request_operation(alice, running_instance.pk, "restart")
    assert as_alice.get(f"/api/v1/tasks/{task.pk}/").json()["timeout_seconds"] == 600


def test_running_task_shows_time_left(as_alice, alice, running_instance):
    task = start(services.request_operation(alice, running_instance.pk, "stop", timeout_seconds=300))
    Task.objects.filter(pk=task.pk).update(started_at=timezone.now() - timedelta(seconds=100))
    body = as_alice.get(f"/api/v1/tasks/{task.pk}/").json()
    assert body["status"] == "running"
    assert 195 <= body["remaining_seconds"] <= 200
    assert body["queue_position"] is None and body["estimated_wait_seconds"] is None


def test_pending_tasks_say_why_they_wait(as_alice, alice, provider, make_instance):
    first = make_instance(alice, provider, name="one")
    second = make_instance(alice, provider, name="two")
    running = start(services.request_operation(alice, first.pk, "stop"))
    waiting = services.request_operation(alice, second.pk, "stop")
    body = as_alice.get(f"/api/v1/tasks/{waiting.pk}/").json()
    assert body["queue_position"] == 0
    assert body["blocked_reason"] == "provider at its limit 1/1"
    assert body["estimated_wait_seconds"] > 0
    # The list answers the same as the detail view and as dispatch.queue_info.
    rows = {r["id"]: r for r in as_alice.get("/api/v1/tasks/").json()["results"]}
    info = dispatch.queue_info(Task.objects.get(pk=waiting.pk))
    for key in ("queue_position", "blocked_reason", "estimated_wait_seconds"):
        assert rows[waiting.pk][key] == body[key] == info[key]
    assert rows[running.pk]["queue_position"] is None


def test_list_queue_figures_match_queue_info_for_a_backlog(as_alice, alice, provider, make_instance):
    provider.enabled = False
    provider.save()
    tasks = [services.request_operation(alice, make_instance(alice, provider).pk, "stop") for _ in range(4)]
    rows = {r["id"]: r for r in as_alice.get("/api/v1/tasks/").json()["results"]}
    for position, task in enumerate(tasks):
        info = dispatch.queue_info(Task.objects.get(pk=task.pk))
        assert info["queue_position"] == position
        assert {k: rows[task.pk][k] for k in info} == info
        assert rows[task.pk]["blocked_reason"] == "provider disabled"


def test_list_query_count_does_not_grow_with_terminal_rows(
    as_alice, alice, running_instance, django_assert_max_num_queries
):
    for _ in range(30):
        make_task(running_instance, status="completed", completed_at=timezone.now())
    with django_assert_max_num_queries(6):
        response = as_alice.get("/api/v1/tasks/?page_size=30")
    assert len(response.json()["results"]) == 30


def test_cancel_pending_then_again_is_409(as_alice, alice, running_instance):
    task = services.request_operation(alice, running_instance.pk, "stop")
    response = as_alice.post(f"/api/v1/tasks/{task.pk}/cancel/", {"reason": "changed my mind"}, format="json")
    assert response.status_code == 200
    body = response.json()
    assert (body["status"], body["error_code"], body["cancel_reason"]) == (
        "cancelled",
        "cancelled_by_user",
        "changed my mind",
    )
    assert body["events"][-1]["to_status"] == "cancelled"
    again = as_alice.post(f"/api/v1/tasks/{task.pk}/cancel/")
    assert again.status_code == 409
    assert again.json()["code"] == "not_cancellable"
    assert again.json()["status"] == "cancelled"


def test_cancel_running_goes_cancelling(as_alice, alice, running_instance):
    task = start(services.request_operation(alice, running_instance.pk, "restart"))
    body = as_alice.post(f"/api/v1/tasks/{task.pk}/cancel/").json()
    assert body["status"] == "cancelling"
    assert body["can_cancel"] is False


def test_a_running_delete_cannot_be_cancelled_by_its_owner(as_alice, alice, running_instance):
    task = start(services.request_operation(alice, running_instance.pk, "delete"))
    assert as_alice.get(f"/api/v1/tasks/{task.pk}/").json()["can_cancel"] is False
    response = as_alice.post(f"/api/v1/tasks/{task.pk}/cancel/")
    assert response.status_code == 409
    assert response.json()["code"] == "not_cancellable"
    assert Task.objects.get(pk=task.pk).status == "running"


def test_cancel_with_a_bad_body_is_400(as_alice, alice, running_instance):
    task = services.request_operation(alice, running_instance.pk, "stop")
    response = as_alice.post(f"/api/v1/tasks/{task.pk}/cancel/", {"reason": "x" * 501}, format="json")
    assert response.status_code == 400
    assert response.json()["field"] == "reason"
    assert Task.objects.get(pk=task.pk).status == "pending"


def _completed_with_secret(instance, secret: str | None, **secret_fields) -> Task:
    task = make_task(instance, task_type="reset-password", status="completed", completed_at=timezone.now())
    if secret is not None:
        fields = {"expires_at": timezone.now() + timedelta(hours=1), **secret_fields}
        TaskSecret.objects.create(task=task, ciphertext=crypto.encrypt(secret), **fields)
    return task


def test_password_is_shown_once_to_its_owner(as_alice, as_bob, running_instance):
    task = _completed_with_secret(running_instance, "s3cret-pw")
    assert as_bob.get(f"/api/v1/tasks/{task.pk}/password/").status_code == 404
    first = as_alice.get(f"/api/v1/tasks/{task.pk}/password/")
    assert first.status_code == 200
    assert first.json() == {"password": "s3cret-pw"}
    assert first["Cache-Control"] == "no-store"
    second = as_alice.get(f"/api/v1/tasks/{task.pk}/password/")
    assert second.status_code == 410
    assert second.json()["code"] == "gone"
    # The password is never part of the task itself.
    assert "s3cret-pw" not in as_alice.get(f"/api/v1/tasks/{task.pk}/").content.decode()


def test_password_expired_or_never_produced_is_410(as_alice, running_instance):
    expired = _completed_with_secret(running_instance, "old", expires_at=timezone.now() - timedelta(seconds=1))
    assert as_alice.get(f"/api/v1/tasks/{expired.pk}/password/").status_code == 410
    none = _completed_with_secret(running_instance, None)
    assert as_alice.get(f"/api/v1/tasks/{none.pk}/password/").status_code == 410


def test_password_of_an_unfinished_task_is_409(as_alice, alice, running_instance):
    task = services.request_operation(alice, running_instance.pk, "reset-password")
    response = as_alice.get(f"/api/v1/tasks/{task.pk}/password/")
    assert response.status_code == 409
    assert response.json()["code"] == "invalid_state"


def test_staff_initiated_tasks_do_not_name_the_operator_to_users(as_alice, as_root, root, running_instance):
    task = services.request_operation(root, running_instance.pk, "stop", admin=True)
    assert as_alice.get(f"/api/v1/tasks/{task.pk}/").json()["initiator"] == {"id": None, "username": "staff"}
    assert as_root.get(f"/api/v1/admin/tasks/{task.pk}/").json()["initiator"] == {"id": root.pk, "username": "root"}


@pytest.mark.parametrize("path", ["abc", "0", "-1", "99999999999999999999999", "1.5"])
def test_odd_ids_in_the_path_are_404(as_alice, path):
    for url in (f"/api/v1/tasks/{path}/", f"/api/v1/tasks/{path}/cancel/", f"/api/v1/instances/{path}/stop/"):
        response = as_alice.post(url) if url.endswith(("cancel/", "stop/")) else as_alice.get(url)
        assert response.status_code == 404, url
        assert response.json()["code"] == "not_found"


def test_unknown_api_path_is_json_404(as_alice):
    response = as_alice.get("/api/v1/nothing-here/")
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


def test_wrong_method_is_json_405(as_alice, alice, running_instance):
    task = services.request_operation(alice, running_instance.pk, "stop")
    response = as_alice.put(f"/api/v1/tasks/{task.pk}/", {}, format="json")
    assert response.status_code == 405
    assert response.json()["code"] == "method_not_allowed"


def test_queue_figures_of_a_mixed_page_cost_a_fixed_number_of_queries(
    as_root, alice, provider, provider_b, make_instance, django_assert_max_num_queries
):
    for target in (provider, provider_b, provider, provider_b, provider, provider_b, provider, provider):
        services.request_operation(alice, make_instance(alice, target).pk, "stop")
    dispatch.admit(provider.pk)  # one of sim-a's is admitted, waiting for a worker
    dispatch.admit(provider_b.pk)  # three of sim-b's
    # token, count, ids, rows, slots, positions, and one average duration per provider
    with django_assert_max_num_queries(10):
        rows = as_root.get("/api/v1/admin/tasks/").json()["results"]
    assert len(rows) == 8
    for row in rows:
        info = dispatch.queue_info(Task.objects.get(pk=row["id"]))
        assert {k: row[k] for k in info} == info, row["id"]
    assert sorted(r["queue_position"] for r in rows) == [0, 0, 0, 0, 0, 1, 2, 3]
