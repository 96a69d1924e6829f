"""Issue 23, the console's pages: what an operator sees on a task, an instance and a
provider page, and what the console's actions leave in Django's admin log."""

from __future__ import annotations

from django.urls import reverse
from django.utils import timezone

from tasks.engine import dispatch, transitions
from tasks.models import Provider, TaskEvent
from tests.admin.conftest import change_url
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
    assert "<td>worker machine-a/3</td>" in html or 'title="worker:machine-a:3">worker machine-a/3<' in html


def test_actor_labels_share_one_style():
    from tasks.admin.task_admin import actor_label

    assert actor_label("worker:machine-a:3") == "worker machine-a/3"
    assert actor_label("admin:root") == "admin root"
    assert actor_label("user:alice") == "user alice"
    assert actor_label("system:timeout-sweep") == "system (timeout)"
    assert actor_label("system") == "system"
