"""Issue 23, the console's pages: what an operator sees on a task, an instance and a
provider page, and what the console's actions leave in Django's admin log."""

from __future__ import annotations

from datetime import UTC, timedelta

from django.contrib.admin.models import LogEntry
from django.urls import reverse
from django.utils import timezone

from tasks.engine import dispatch, transitions
from tasks.models import Instance, Provider, Task, TaskEvent
from tests.admin.conftest import change_url, confirm_action, post_action
from tests.conftest import make_task


def test_a_held_providers_pending_task_has_no_wait_estimate(root_client, running_instance, provider):
    make_task(running_instance, status="running")
    task = make_task(running_instance)
    Provider.objects.filter(pk=provider.pk).update(unreachable_since=timezone.now(), unreachable_error="refused")
    html = root_client.get(change_url("task", task.pk)).content.decode()
    assert "wait unknown while the provider is unreachable" in html
    assert "to wait" not in html


def test_view_site_leads_to_a_page_that_exists(root_client):
    index = root_client.get(reverse("admin:index"))
    site_url = str(index.context["site_url"])
    assert site_url == "/api/v1/docs/" and f'href="{site_url}"' in index.content.decode()
    assert root_client.get(site_url).status_code == 200


def test_the_open_task_page_timeline_grows_live(root_client, running_instance):
    """The page shows the events so far; its script asks for those after the last shown
    one at the badge's cadence and appends them (and the last row's duration)."""
    task = make_task(running_instance)
    first = TaskEvent.objects.create(task=task, to_status="pending", actor="user:alice", at=task.created_at)
    dispatch.admit(task.provider_id)
    task.refresh_from_db()
    page = root_client.get(change_url("task", task.pk))
    html = page.content.decode()
    events_url = reverse("admin:tasks_task_events", args=[task.pk])
    assert f'data-events-url="{events_url}"' in html and f'data-last-id="{first.pk}"' in html
    assert 'data-live="1"' in html
    assert transitions.claim(task.pk, token=task.lease_token, worker="machine-a:3")
    transitions.report_progress(task.pk, token=task.lease_token, progress=40, message="starting guest", step=True)
    body = root_client.get(events_url, {"after": first.pk}).json()
    assert body["rows"].count("<tr") == 2 and "starting guest" in body["rows"]
    assert "worker machine-a/3" in body["rows"]  # one actor style
    assert body["previous_id"] == first.pk and body["previous_duration"]  # its duration is known now
    assert body["final"] is False
    last = body["last_id"]
    transitions.finish(task.pk, "completed", token=task.lease_token, actor="worker:machine-a:3")
    body = root_client.get(events_url, {"after": last}).json()
    assert body["rows"].count("<tr") == 1 and body["final"] is True
    assert root_client.get(events_url, {"after": "x"}).status_code == 400
    # Reloaded: the same rows, each with its duration until the next, and no polling.
    html = root_client.get(change_url("task", task.pk)).content.decode()
    assert html.count('data-role="took"') == 4 and 'data-live="0"' in html
    # Each row's time in the console's zone, to the millisecond, the UTC instant on hover.
    at = timezone.localtime(first.at)
    assert f'title="{first.at.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC">{at:%Y-%m-%d %H:%M:%S}.' in html
    assert "<td>worker machine-a/3</td>" in html or 'title="worker:machine-a:3">worker machine-a/3<' in html


def test_actor_labels_share_one_style():
    from tasks.admin.task_admin import actor_label

    assert actor_label("worker:machine-a:3") == "worker machine-a/3"
    assert actor_label("admin:root") == "admin root"
    assert actor_label("user:alice") == "user alice"
    assert actor_label("system:timeout-sweep") == "system (timeout)"
    assert actor_label("system") == "system"


def test_an_instance_page_action_stays_on_the_page_and_links_the_new_task(root_client, running_instance):
    page_url = change_url("instance", running_instance.pk)
    restart = reverse("admin:tasks_instance_action", args=[running_instance.pk, "restart_instances"])
    assert f'action="{restart}"' in root_client.get(page_url).content.decode()
    response = root_client.post(restart, {"action": "restart_instances"})
    assert response.status_code == 302 and response["Location"] == page_url
    task = Task.objects.get(instance=running_instance)
    page = root_client.get(page_url)
    html = page.content.decode()
    assert "restart queued as task" in html and f'href="{change_url("task", task.pk)}">#{task.pk}</a>' in html
    # Busy now: no action the service would refuse is offered.
    assert "tasks_instance_action" not in html and "/action/" not in html


def test_instance_delete_from_the_page_asks_a_reason_recorded_on_the_timeline(root_client, running_instance):
    delete = reverse("admin:tasks_instance_action", args=[running_instance.pk, "delete_instances"])
    page = root_client.post(delete, {"action": "delete_instances", "_selected_action": [running_instance.pk]})
    assert page.status_code == 200 and 'name="reason"' in page.content.decode()
    data = {"action": "delete_instances", "_selected_action": [running_instance.pk], "confirm": "delete_instances"}
    response = root_client.post(delete, {**data, "reason": "customer left"})
    assert response.status_code == 302 and response["Location"] == change_url("instance", running_instance.pk)
    task = Task.objects.get(instance=running_instance, task_type="delete")
    html = root_client.get(change_url("task", task.pk)).content.decode()
    assert "customer left" in html[html.index('id="timeline"') :]


def test_cancel_and_force_stop_confirmations_show_instance_owner_and_runtime(root_client, running_instance):
    task = make_task(running_instance, status="running", started_at=timezone.now() - timedelta(seconds=185))
    for name in ("cancel", "force_stop"):
        html = root_client.get(reverse(f"admin:tasks_task_{name}", args=[task.pk])).content.decode()
        assert (
            f"instance {running_instance.name}" in html and "owner alice" in html and "running for 3 min 05 s" in html
        )


def test_console_actions_are_in_the_admin_log(root_client, root, running_instance, provider, monkeypatch):
    task = make_task(running_instance, status="running", lease_token="t" * 32)
    Instance.objects.filter(pk=running_instance.pk).update(active_task=task)
    confirm_action(root_client, "task", "cancel_selected", [task.pk], reason="user asked")
    force = make_task(running_instance, task_type="stop", status="running", lease_token="u" * 32)
    confirm_action(root_client, "task", "force_stop_selected", [force.pk], reason="hung")
    Instance.objects.filter(pk=running_instance.pk).update(active_task=None)
    root_client.post(
        reverse("admin:tasks_instance_action", args=[running_instance.pk, "stop_instances"]),
        {"action": "stop_instances"},
    )
    Provider.objects.filter(pk=provider.pk).update(unreachable_since=timezone.now())
    post_action(root_client, "provider", "check_connectivity", [provider.pk])
    entries = {(e.content_type.model, e.object_id, e.get_change_message()) for e in LogEntry.objects.all()}
    stop = Task.objects.get(instance=running_instance, task_type="stop", status="pending")
    assert ("task", str(task.pk), "Cancel requested: user asked") in entries
    assert ("task", str(force.pk), "Force-stopped: hung") in entries
    assert ("instance", str(running_instance.pk), f"stop queued as task #{stop.pk}") in entries
    assert any(model == "provider" and "answers" in message for model, _pk, message in entries)
    # The object's History page and the index's Recent actions show them.
    history = root_client.get(reverse("admin:tasks_task_history", args=[force.pk])).content.decode()
    assert "Force-stopped: hung" in history
    assert "Recent actions" in root_client.get(reverse("admin:index")).content.decode()


def test_the_reconciliation_after_a_force_stop_is_on_the_tasks_timeline(root_client, running_instance):
    from tasks import reconcile

    task = make_task(running_instance, status="running", lease_token="t" * 32)
    Instance.objects.filter(pk=running_instance.pk).update(active_task=task)
    confirm_action(root_client, "task", "force_stop_selected", [task.pk], reason="hung")
    Task.objects.filter(pk=task.pk).update(held_until=None)  # its worker reported its exit
    assert reconcile.reconcile_instance(running_instance.pk)
    html = root_client.get(change_url("task", task.pk)).content.decode()
    timeline = html[html.index('id="timeline"') :]
    assert "reconciled with the provider: instance" in timeline and "system (reconcile)" in timeline
