"""The task list, its filters and search, the detail page, cancel and force-stop."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.urls import reverse
from django.utils import timezone

from tasks.engine import dispatch, transitions
from tasks.engine.states import ErrorCode
from tasks.models import Task, TaskEvent
from tests.admin.conftest import change_url, changelist, confirm_action, messages_of, post_action, report
from tests.conftest import make_task


@pytest.fixture
def tasks_on_two_providers(alice, bob, provider, make_instance):
    from tasks.models import Provider

    other = Provider.objects.create(name="sim-b", provider_type="simulated")
    web = make_instance(alice, provider, name="web-1")
    db_vm = make_instance(bob, other, name="db-vm", instance_type="vm")
    return {
        "pending": make_task(web, task_type="start"),
        "running": make_task(
            db_vm,
            task_type="stop",
            status="running",
            progress=40,
            status_message="stopping",
            started_at=timezone.now() - timedelta(seconds=65),
        ),
        "failed": make_task(web, task_type="restart", status="failed", error_code=ErrorCode.PROVIDER_ERROR),
        "old": make_task(db_vm, task_type="reset", status="completed", created_at=timezone.now() - timedelta(days=40)),
    }


def listed_ids(response) -> set[int]:
    return {obj.pk for obj in response.context["cl"].result_list}


# ------------------------------------------------------------------------ list


def test_list_shows_badges_bars_and_who(root_client, tasks_on_two_providers):
    running = tasks_on_two_providers["running"]
    response = root_client.get(changelist("task"))
    assert response.status_code == 200
    html = response.content.decode()
    assert f'class="tc-badge tc-badge--running" data-task-id="{running.pk}"' in html
    assert f'data-task-id="{running.pk}" data-role="progress"' in html and "40%" in html and "stopping" in html
    for text in ("sim-a", "sim-b", "web-1", "db-vm", "alice", "bob", "ago", "so far"):
        assert text in html
    assert "tasks/progress.js" in html  # the live refresh is on the page
    assert listed_ids(response) == {t.pk for t in tasks_on_two_providers.values()}


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("status__exact=running", {"running"}),
        ("state=active", {"pending", "running"}),
        ("state=finished", {"failed", "old"}),
        ("state=problem", {"failed"}),
        ("task_type__exact=restart", {"failed"}),
        ("instance_type=vm", {"running", "old"}),
    ],
)
def test_filters(root_client, tasks_on_two_providers, query, expected):
    response = root_client.get(f"{changelist('task')}?{query}")
    assert listed_ids(response) == {tasks_on_two_providers[k].pk for k in expected}


def test_filter_by_provider_and_date(root_client, tasks_on_two_providers):
    other = tasks_on_two_providers["running"].provider
    response = root_client.get(f"{changelist('task')}?provider__id__exact={other.pk}")
    assert listed_ids(response) == {tasks_on_two_providers["running"].pk, tasks_on_two_providers["old"].pk}
    # the "Past 7 days" choice of the date filter
    today = timezone.localtime().replace(hour=0, minute=0, second=0, microsecond=0)
    since, until = today - timedelta(days=7), today + timedelta(days=1)
    response = root_client.get(changelist("task"), {"created_at__gte": str(since), "created_at__lt": str(until)})
    assert tasks_on_two_providers["old"].pk not in listed_ids(response)
    assert len(listed_ids(response)) == 3


@pytest.mark.parametrize(
    ("term", "expected"),
    [("bob", {"running", "old"}), ("web-1", {"pending", "failed"}), ("DB-V", {"running", "old"})],
)
def test_search_by_username_and_instance_name(root_client, tasks_on_two_providers, term, expected):
    response = root_client.get(changelist("task"), {"q": term})
    assert listed_ids(response) == {tasks_on_two_providers[k].pk for k in expected}


def test_search_by_uuid_and_id(root_client, tasks_on_two_providers):
    task = tasks_on_two_providers["failed"]
    assert listed_ids(root_client.get(changelist("task"), {"q": str(task.uuid)})) == {task.pk}
    assert listed_ids(root_client.get(changelist("task"), {"q": task.uuid.hex.upper()})) == {task.pk}
    assert listed_ids(root_client.get(changelist("task"), {"q": f"#{task.pk}"})) == {task.pk}
    assert listed_ids(root_client.get(changelist("task"), {"q": "no-such-thing"})) == set()


# ------------------------------------------------------------------------ detail


def test_detail_shows_timeline_error_lease_and_redacted_data(root_client, running_instance):
    task = make_task(
        running_instance,
        task_type="reset-password",
        task_data={"image": "debian/12", "root_password": "hunter2", "nested": [{"API_Key": "k-123"}], "tokens": 3},
    )
    # the real path: admitted, claimed by a worker, a step, then a failure
    dispatch.admit(task.provider_id)
    task.refresh_from_db()
    assert transitions.claim(task.pk, token=task.lease_token, worker="node-1:42")
    transitions.report_progress(task.pk, token=task.lease_token, progress=30, message="resetting password", step=True)
    transitions.finish(
        task.pk,
        "failed",
        token=task.lease_token,
        actor="worker:node-1:42",
        error_code=ErrorCode.PROVIDER_ERROR,
        error_message="guest agent not responding",
    )
    response = root_client.get(change_url("task", task.pk))
    assert response.status_code == 200
    html = response.content.decode()
    # the timeline: every transition and the step, in order
    body = html[html.index('id="timeline"') :]
    assert body.index("pending</span>") < body.index("resetting password") < body.index("failed</span>")
    assert "worker:node-1:42" in body
    # the error and the lease
    assert "guest agent not responding" in html and "provider_error" in html
    assert "node-1:42" in html and "the task has finished" in html
    # task data with secrets redacted, other values shown
    assert "debian/12" in html
    assert "hunter2" not in html and "k-123" not in html and "redacted" in html
    # read-only: no save button, no cancel on a finished task
    assert 'name="_save"' not in html and "Cancel task" not in html


def test_detail_shows_queue_position_of_a_pending_task(root_client, running_instance):
    task = make_task(running_instance)
    html = root_client.get(change_url("task", task.pk)).content.decode()
    assert "waiting for admission; position 0" in html


def test_detail_is_read_only_and_tasks_cannot_be_added(root_client, running_instance):
    task = make_task(running_instance, status="running", progress=10)
    response = root_client.post(change_url("task", task.pk), {"progress": 99, "status": "completed"})
    assert response.status_code == 403
    task.refresh_from_db()
    assert (task.status, task.progress) == ("running", 10)
    assert root_client.get(changelist("task") + "add/").status_code == 403


def test_only_finished_tasks_can_be_deleted(root_client, running_instance):
    active = make_task(running_instance, status="running")
    done = make_task(running_instance, status="completed")
    assert root_client.post(reverse("admin:tasks_task_delete", args=[active.pk]), {"post": "yes"}).status_code == 403
    response = post_action(root_client, "task", "delete_finished", [active.pk, done.pk])
    assert report(response) == (1, 1)
    assert list(Task.objects.values_list("pk", flat=True)) == [active.pk]


# ------------------------------------------------------------------------ cancel


def test_cancel_asks_for_a_reason_first(root_client, running_instance):
    task = make_task(running_instance)
    response = post_action(root_client, "task", "cancel_selected", [task.pk])
    assert response.status_code == 200
    assert response.templates[0].name == "admin/tasks/confirm_action.html"
    assert 'name="reason"' in response.content.decode()
    # no reason: the page comes back with the error, nothing changes
    response = confirm_action(root_client, "task", "cancel_selected", [task.pk], reason="  ")
    assert "This field is required" in response.content.decode()
    task.refresh_from_db()
    assert task.status == "pending"


def test_cancel_pending_and_running_tasks_with_a_reason(root_client, alice, provider, make_instance):
    pending = make_task(make_instance(alice, provider))
    running = make_task(make_instance(alice, provider), status="running")
    response = confirm_action(
        root_client, "task", "cancel_selected", [pending.pk, running.pk], reason="maintenance window"
    )
    assert report(response) == (2, 0)
    pending.refresh_from_db()
    running.refresh_from_db()
    assert (pending.status, pending.error_code, pending.cancel_reason) == (
        "cancelled",
        "cancelled_by_admin",
        "maintenance window",
    )
    assert running.status == "cancelling"  # the worker stops it at its next safe point
    event = TaskEvent.objects.filter(task=running).last()
    assert (event.to_status, event.actor, event.reason) == ("cancelling", "admin:root", "maintenance window")


def test_cancel_of_a_task_that_finished_meanwhile_is_a_skip(root_client, running_instance):
    task = make_task(running_instance, status="running")
    # The operator saw it running; it completed before the confirmation arrived.
    assert transitions.finish(task.pk, "completed", token=None, actor="worker:w")
    events = TaskEvent.objects.filter(task=task).count()
    response = confirm_action(root_client, "task", "cancel_selected", [task.pk], reason="too slow")
    assert report(response) == (0, 1)
    assert "can no longer be cancelled" in " ".join(messages_of(response)) or "cannot be cancelled" in " ".join(
        messages_of(response)
    )
    task.refresh_from_db()
    assert (task.status, task.cancel_reason, task.error_code) == ("completed", "", "")
    assert TaskEvent.objects.filter(task=task).count() == events


def test_cancel_losing_the_race_inside_the_service_is_a_skip(root_client, running_instance, monkeypatch):
    task = make_task(running_instance, status="running")
    original = transitions.request_cancel

    def finish_first(task_id, **kwargs):
        # The worker's final write lands between the service's check and its update.
        transitions.finish(task_id, "completed", token=None, actor="worker:w")
        return original(task_id, **kwargs)

    monkeypatch.setattr(transitions, "request_cancel", finish_first)
    response = confirm_action(root_client, "task", "cancel_selected", [task.pk], reason="stop it")
    assert report(response) == (0, 1)
    task.refresh_from_db()
    assert task.status == "completed" and task.cancel_reason == ""


def test_cancel_from_the_task_page(root_client, running_instance):
    task = make_task(running_instance)
    url = change_url("task", task.pk)
    cancel_url = reverse("admin:tasks_task_cancel", args=[task.pk])
    assert cancel_url in root_client.get(url).content.decode()
    page = root_client.get(cancel_url)
    assert page.status_code == 200 and 'name="reason"' in page.content.decode()
    response = root_client.post(
        cancel_url,
        {"action": "cancel_selected", "_selected_action": [task.pk], "confirm": "cancel_selected", "reason": "dup"},
    )
    assert response.status_code == 302 and response["Location"] == url
    task.refresh_from_db()
    assert task.status == "cancelled"


# ------------------------------------------------------------------------ force-stop


def test_force_stop_ends_a_running_task_at_once(root_client, running_instance):
    task = make_task(running_instance, status="running", lease_token="t" * 32)
    running_instance.active_task = task
    running_instance.save()
    response = post_action(root_client, "task", "force_stop_selected", [task.pk])
    assert "Force-stop tasks" in response.content.decode() and "Dangerous" in response.content.decode()
    response = confirm_action(root_client, "task", "force_stop_selected", [task.pk], reason="worker hung")
    assert report(response) == (1, 0)
    task.refresh_from_db()
    running_instance.refresh_from_db()
    assert (task.status, task.error_code, task.cancel_reason, task.lease_token) == (
        "cancelled",
        "force_stopped",
        "worker hung",
        "",
    )
    assert running_instance.active_task_id is None and running_instance.needs_reconcile


def test_force_stop_of_a_finished_task_is_a_skip(root_client, running_instance):
    task = make_task(running_instance, status="running")
    transitions.finish(task.pk, "failed", token=None, actor="worker:w", error_code=ErrorCode.PROVIDER_ERROR)
    response = confirm_action(root_client, "task", "force_stop_selected", [task.pk], reason="late")
    assert report(response) == (0, 1)
    task.refresh_from_db()
    assert (task.status, task.error_code) == ("failed", "provider_error")


def test_staff_without_the_permission_cannot_force_stop(operator_client, running_instance):
    task = make_task(running_instance, status="running")
    page = operator_client.get(changelist("task")).content.decode()
    assert "cancel_selected" in page and "force_stop_selected" not in page
    response = confirm_action(operator_client, "task", "force_stop_selected", [task.pk], reason="try anyway")
    assert "No action selected" in " ".join(messages_of(response))
    force_stop_url = reverse("admin:tasks_task_force_stop", args=[task.pk])
    assert operator_client.get(force_stop_url).status_code == 403
    assert operator_client.post(force_stop_url, {"reason": "x", "confirm": "force_stop_selected"}).status_code == 403
    assert "Force-stop" not in operator_client.get(change_url("task", task.pk)).content.decode()
    task.refresh_from_db()
    assert task.status == "running"


def test_the_force_stop_permission_can_be_granted(operator_client, operator, running_instance):
    perm = Permission.objects.get(content_type__app_label="tasks", codename="force_stop_task")
    operator.user_permissions.add(perm)
    task = make_task(running_instance, status="running")
    response = confirm_action(operator_client, "task", "force_stop_selected", [task.pk], reason="stuck")
    assert report(response) == (1, 0)
    task.refresh_from_db()
    assert task.status == "cancelled" and task.events.last().actor == "admin:operator"


# ------------------------------------------------------------------------ who may enter


def test_non_staff_cannot_reach_the_console(client, alice, running_instance):
    task = make_task(running_instance)
    client.force_login(alice)
    for url in (changelist("task"), change_url("task", task.pk), changelist("task") + "dashboard/"):
        response = client.get(url)
        assert response.status_code == 302 and "/admin/login/" in response["Location"]
    response = confirm_action(client, "task", "cancel_selected", [task.pk], reason="mine")
    task.refresh_from_db()
    assert task.status == "pending"


# ------------------------------------------------------------------------ counting at scale


@pytest.mark.parametrize(
    ("query", "expected", "aggregated"),
    [
        ({}, 4, True),
        ({"status__exact": "running"}, 1, True),
        ({"state": "finished"}, 2, True),
        ({"state": "active", "task_type__exact": "start"}, 1, True),
        ({"state": "problem", "status__exact": "running"}, 0, False),  # known empty
        ({"q": "bob"}, 2, False),  # search: counted by the database
    ],
)
def test_list_counts_from_the_stats_aggregate(
    root_client, tasks_on_two_providers, monkeypatch, query, expected, aggregated
):
    from tasks import stats

    monkeypatch.setattr(stats, "SMALL_TABLE", 0)  # as if the table had a million rows
    calls = []
    real = stats.count_tasks
    monkeypatch.setattr(stats, "count_tasks", lambda *a: calls.append(a) or real(*a))
    response = root_client.get(changelist("task"), query)
    assert response.context["cl"].result_count == expected == len(response.context["cl"].result_list)
    assert bool(calls) == aggregated


def test_a_stopping_hold_is_shown_on_the_task_and_its_provider(root_client, alice, provider, make_instance):
    """A force-stopped task whose worker may still be inside a provider call: its slot and
    instance are held, and the console says so (issue 22)."""
    from tasks import services

    task = services.request_operation(alice, make_instance(alice, provider).pk, "stop")
    dispatch.admit(provider.pk)
    task.refresh_from_db()
    assert transitions.claim(task.pk, token=task.lease_token, worker="w1")
    assert transitions.force_stop(task.pk, actor="admin:root", reason="stuck")
    page = root_client.get(change_url("task", task.pk)).content.decode()
    assert ">stopping</span>" in page and "the provider slot and the instance stay held" in page
    listing = root_client.get(changelist("task")).content.decode()
    assert ">stopping</span>" in listing
    assert "1 stopping" in root_client.get(changelist("provider")).content.decode()
    transitions.release_hold(task.pk, token=task.lease_token)
    assert ">stopping</span>" not in root_client.get(change_url("task", task.pk)).content.decode()
