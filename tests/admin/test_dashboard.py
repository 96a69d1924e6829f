"""The dashboard (figures and charts), the index link, and the progress JSON view."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from django.contrib.auth import get_user_model
from django.urls import reverse
from django.utils import timezone

from tasks.admin import views as admin_views
from tasks.models import Task, Worker
from tests.conftest import make_task

DASHBOARD = "/admin/tasks/task/dashboard/"
PROGRESS = "/admin/tasks/task/progress/"


def finished(instance, status: str, completed_at: datetime, seconds: float = 5, task_type: str = "start") -> Task:
    task = make_task(instance, task_type=task_type, created_at=completed_at - timedelta(seconds=seconds + 1))
    Task.objects.filter(pk=task.pk).update(
        status=status, started_at=completed_at - timedelta(seconds=seconds), completed_at=completed_at
    )
    return task


def test_routes_are_where_the_docs_say():
    assert reverse("admin:tasks_task_dashboard") == DASHBOARD
    assert reverse("admin:tasks_task_progress") == PROGRESS


def test_throughput_buckets_and_error_rate(running_instance):
    now = datetime(2026, 3, 1, 12, 3, tzinfo=UTC)
    finished(running_instance, "completed", datetime(2026, 3, 1, 11, 57, 10, tzinfo=UTC))
    finished(running_instance, "completed", datetime(2026, 3, 1, 11, 58, tzinfo=UTC))
    finished(running_instance, "failed", datetime(2026, 3, 1, 11, 59, 59, tzinfo=UTC))
    finished(running_instance, "timeout", datetime(2026, 3, 1, 11, 51, tzinfo=UTC))
    finished(running_instance, "cancelled", datetime(2026, 3, 1, 12, 1, tzinfo=UTC))
    finished(running_instance, "completed", datetime(2026, 3, 1, 5, 0, tzinfo=UTC))  # outside the 6 h
    series = admin_views.throughput(now)
    assert len(series) == 72
    assert series[0]["start"] == datetime(2026, 3, 1, 6, 5, tzinfo=UTC)
    assert series[-1]["start"] == datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    by_start = {b["start"].strftime("%H:%M"): b for b in series}
    assert (by_start["11:55"]["completed"], by_start["11:55"]["failed"], by_start["11:55"]["error_rate"]) == (
        2,
        1,
        33.3,
    )
    assert (by_start["11:50"]["timeout"], by_start["11:50"]["error_rate"]) == (1, 100.0)
    assert (by_start["12:00"]["cancelled"], by_start["12:00"]["error_rate"]) == (1, 0.0)
    assert by_start["11:45"]["error_rate"] is None  # nothing finished: a gap, not 0 %
    assert sum(b["finished"] for b in series) == 5
    assert sum(b["created"] for b in series) == 5


def test_durations_per_type(running_instance):
    now = timezone.now()
    for seconds in (10, 20, 30, 40, 100):
        finished(running_instance, "completed", now - timedelta(minutes=5), seconds=seconds, task_type="restart")
    finished(running_instance, "failed", now - timedelta(minutes=5), seconds=999, task_type="restart")
    finished(running_instance, "completed", now - timedelta(days=3), seconds=999, task_type="restart")
    (restart,) = admin_views.durations(now)
    assert restart["task_type"] == "restart" and restart["count"] == 5
    assert restart["avg"] == pytest.approx(40) and restart["p50"] == pytest.approx(30) and restart["max"] == 100


def test_provider_queues(alice, provider, make_instance):
    make_task(make_instance(alice, provider), status="running")
    make_task(make_instance(alice, provider), admitted_at=timezone.now())
    make_task(make_instance(alice, provider))
    (queue,) = admin_views.provider_queues()
    assert (queue.name, queue.running, queue.pending, queue.admitted, queue.limit) == ("sim-a", 1, 2, 1, 1)


def test_dashboard_page(root_client, alice, provider, make_instance):
    instance = make_instance(alice, provider)
    running = make_task(instance, task_type="restart", status="running", progress=70)
    finished(make_instance(alice, provider), "completed", timezone.now() - timedelta(minutes=3), seconds=12)
    finished(make_instance(alice, provider), "failed", timezone.now() - timedelta(minutes=2))
    Worker.objects.create(name="node-a:11", node="node-a", host="a", pid=11, queue="provider-1", current_task=running)
    Worker.objects.create(
        name="node-b:12",
        node="node-b",
        host="b",
        pid=12,
        queue="provider-1",
        last_heartbeat=timezone.now() - timedelta(hours=2),
    )
    response = root_client.get(DASHBOARD)
    assert response.status_code == 200
    html = response.content.decode()
    assert html.count('<svg class="tc-chart"') == 5  # status, queues, throughput, error rate, durations
    ctx = response.context
    assert ctx["counts"]["running"] == 1 and ctx["counts"]["completed"] == 1 and ctx["counts"]["timeout"] == 0
    assert ctx["error_rate_1h"] == 50.0
    assert "sim-a" in html and "1/1 · 0 pending" in html
    assert "node-a:11" in html and "node-b:12" not in html  # live workers only
    assert f'data-task-id="{running.pk}" data-role="progress"' in html and "tasks/dashboard.js" in html


def test_empty_dashboard_renders(root_client):
    response = root_client.get(DASHBOARD)
    assert response.status_code == 200
    assert "Nothing is running or queued" in response.content.decode()


def test_index_links_to_the_dashboard(root_client):
    assert DASHBOARD in root_client.get("/admin/").content.decode()


def test_dashboard_needs_task_view_permission(client, db):
    staff = get_user_model().objects.create_user("nobody", password="nobody-pass-123", is_staff=True)
    client.force_login(staff)
    assert client.get(DASHBOARD).status_code == 403
    assert DASHBOARD not in client.get("/admin/").content.decode()


# --------------------------------------------------------------------- progress JSON


def test_progress_json(root_client, running_instance):
    a = make_task(running_instance, status="running", progress=35, status_message="copying")
    b = make_task(running_instance, task_type="stop", status="completed", progress=100)
    response = root_client.get(PROGRESS, {"ids": f"{a.pk},{b.pk},99999"})
    assert response.status_code == 200 and response["Cache-Control"].startswith("max-age=0")
    data = json.loads(response.content)
    assert data[str(a.pk)] == {
        "status": "running",
        "status_display": "Running",
        "progress": 35,
        "status_message": "copying",
        "final": False,
        "instance_id": running_instance.pk,
        "instance_status": "running",
        "instance_status_display": "Running",
    }
    assert data[str(b.pk)]["final"] is True and "99999" not in data
    # The labels and the step message in the reader's language; the codes stay.
    Task.objects.filter(pk=a.pk).update(status_message="creating the guest")
    zh = json.loads(root_client.get(PROGRESS, {"ids": a.pk}, HTTP_ACCEPT_LANGUAGE="zh-hans").content)[str(a.pk)]
    assert (zh["status"], zh["status_display"], zh["status_message"]) == ("running", "运行中", "创建实例")
    assert (zh["instance_status"], zh["instance_status_display"]) == ("running", "运行中")


@pytest.mark.parametrize("ids", ["", "1,x", "-1", "0", "9" * 25, ",".join(str(i) for i in range(1, 202))])
def test_progress_json_rejects_bad_ids(root_client, ids):
    response = root_client.get(PROGRESS, {"ids": ids})
    assert response.status_code == 400 and json.loads(response.content)["field"] == "ids"


def test_progress_json_is_staff_only(client, alice, running_instance):
    task = make_task(running_instance)
    assert client.get(PROGRESS, {"ids": task.pk}).status_code == 403  # anonymous
    client.force_login(alice)
    response = client.get(PROGRESS, {"ids": task.pk})
    assert response.status_code == 403 and json.loads(response.content)["code"] == "forbidden"
    staff = get_user_model().objects.create_user("nobody", password="nobody-pass-123", is_staff=True)
    client.force_login(staff)
    assert client.get(PROGRESS, {"ids": task.pk}).status_code == 403  # staff, but may not view tasks


def test_dashboard_agrees_with_the_stats_api_and_has_a_fallback(
    root_client, alice, provider, make_instance, monkeypatch
):
    from tasks.stats import task_stats

    for status in ("completed", "completed", "failed"):
        finished(make_instance(alice, provider), status, timezone.now() - timedelta(minutes=1), seconds=8)
    make_task(make_instance(alice, provider), status="running")
    response = root_client.get(DASHBOARD)
    assert response.context["from_stats_api"] is True
    assert response.context["counts"] == task_stats()["by_status"]
    assert response.context["error_rate_1h"] == 33.3 and response.context["utilization"] == 100.0
    # Without tasks.stats (or when it fails) the dashboard computes the same figures itself.
    monkeypatch.setattr(admin_views, "external_stats", lambda now=None: None)
    fallback = root_client.get(DASHBOARD)
    assert fallback.context["from_stats_api"] is False
    assert fallback.context["counts"] == response.context["counts"]
    assert fallback.context["error_rate_1h"] == 33.3
    assert "<th>max</th>" in fallback.content.decode()


def test_dashboard_marks_a_held_provider(root_client, provider):
    from tasks.engine import health

    assert ">unreachable</span>" not in root_client.get(DASHBOARD).content.decode()
    health.mark_unreachable(provider.pk, "cannot connect")
    assert ">unreachable</span>" in root_client.get(DASHBOARD).content.decode()
