"""Words, dates and times across the console: plain labels, "View" titles on read-only
pages, one date format, the console's time zone with UTC on hover, django-q2's pages
out of the way, and the health strip of the dashboard."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.contrib import admin
from django.utils import timezone
from django_q.models import Failure, OrmQ, Schedule, Success

from tasks.admin.common import exact_time
from tasks.models import Instance, Provider, Task, TaskEvent, Worker
from tests.admin.conftest import change_url, changelist
from tests.conftest import make_task

DASHBOARD = "/admin/tasks/task/dashboard/"


def test_labels_in_plain_words():
    assert Instance._meta.get_field("ssh_port").verbose_name == "SSH port"
    assert Instance._meta.get_field("bandwidth_mbps").verbose_name == "Bandwidth (Mbit/s)"
    assert Provider._meta.get_field("cpu_total").verbose_name == "CPU total"
    assert Provider._meta.get_field("memory_total_mb").verbose_name == "Memory total (MB)"


def test_instance_name_has_no_provider_suffix(root_client, running_instance):
    assert str(running_instance) == running_instance.name
    task = make_task(running_instance)
    html = root_client.get(change_url("task", task.pk)).content.decode()
    assert f"{running_instance.name} (" not in html


@pytest.mark.parametrize("model", ["task", "taskevent", "worker"])
def test_read_only_pages_say_view(root_client, running_instance, model):
    task = make_task(running_instance)
    objects = {
        "task": task,
        "taskevent": TaskEvent.objects.create(task=task, kind="step", to_status="pending", at=timezone.now()),
        "worker": Worker.objects.create(name="n1:1", node="n1", host="h", pid=1, queue=f"provider-{task.provider_id}"),
    }
    html = root_client.get(change_url(model, objects[model].pk)).content.decode()
    assert "<h1>View " in html and "<h1>Change " not in html


def test_read_only_lists_are_titled_by_their_rows(operator_client):
    html = operator_client.get(changelist("task")).content.decode()
    assert "<h1>Tasks</h1>" in html and "to change" not in html


def test_django_q_pages_are_out_of_the_console(root_client):
    for model in (Schedule, Success, Failure, OrmQ):
        assert not admin.site.is_registered(model)
    assert "django_q" not in root_client.get("/admin/").content.decode()


def test_times_in_the_console_zone_with_utc_on_hover(root_client, running_instance, settings):
    settings.CONSOLE_TIME_ZONE = "Asia/Shanghai"
    moment = datetime(2026, 3, 1, 12, 0, 5, tzinfo=UTC)
    task = make_task(running_instance, created_at=moment)
    html = root_client.get(change_url("task", task.pk)).content.decode()
    assert "2026-03-01 20:00:05.000 CST" in html  # UTC+8
    assert 'title="2026-03-01 12:00:05 UTC"' in html
    listing = root_client.get(changelist("task")).content.decode()
    assert 'title="2026-03-01 12:00:05 UTC"' in listing  # the age column
    # Outside a request the helper speaks the active zone (UTC): the same format.
    assert "2026-03-01 12:00:05.000 UTC" in exact_time(moment)


def test_one_date_format_in_both_languages(root_client, running_instance):
    Task.objects.filter(pk=make_task(running_instance).pk)
    for language in ("en", "zh-hans"):
        root_client.cookies["django_language"] = language
        html = root_client.get(DASHBOARD).content.decode()
        today = timezone.now().strftime("%Y-%m-%d")
        assert today in html, language


# ------------------------------------------------------------------ health strip


def test_health_strip_links_to_filtered_lists(root_client, alice, provider, make_instance, settings):
    settings.STUCK_NO_PROGRESS_MINUTES = 10
    down = Provider.objects.create(name="sim-down", provider_type="simulated", unreachable_since=timezone.now())
    inst = make_instance(alice, provider, needs_reconcile=True)
    make_task(inst, status="running", started_at=timezone.now() - timedelta(minutes=30))  # no step since
    oldest = make_task(make_instance(alice, down), created_at=timezone.now() - timedelta(minutes=42))
    response = root_client.get(DASHBOARD)
    html = response.content.decode()
    items = {item.key: item for item in response.context["health"]}
    assert items["unreachable"].value == "1" and items["unreachable"].url.endswith("/tasks/provider/?reachable=no")
    assert items["stuck"].value == "1" and items["stuck"].url.endswith("?stuck=yes")
    assert items["oldest-pending"].value.startswith("42 min") and str(oldest.pk) in items["oldest-pending"].title
    assert items["reconcile"].value == "1" and items["reconcile"].url.endswith("?needs_reconcile__exact=1")
    assert 'id="tc-health-stuck"' in html
    # Each link lands on a list showing exactly that.
    assert [p.pk for p in root_client.get(items["unreachable"].url).context["cl"].result_list] == [down.pk]
    assert len(root_client.get(items["stuck"].url).context["cl"].result_list) == 1
    assert [i.pk for i in root_client.get(items["reconcile"].url).context["cl"].result_list] == [inst.pk]
    pending = root_client.get(items["oldest-pending"].url).context["cl"].result_list
    assert pending[0].pk == oldest.pk


def test_dashboard_tiles_queues_and_workers_by_provider_name(root_client, provider, running_instance):
    Worker.objects.create(
        name="n1:7",
        node="n1",
        host="h",
        pid=7,
        queue=f"provider-{provider.pk}",
        last_heartbeat=timezone.now() - timedelta(seconds=12),
    )
    html = root_client.get(DASHBOARD).content.decode()
    assert "?state=problem&amp;finished=1h" in html  # the 1 h error rate: the last hour's failures
    assert '<span class="tc-tile__label">tasks</span>' not in html  # no total-tasks tile
    workers = html.split('id="tc-workers"')[1]
    assert f'title="provider-{provider.pk}">{provider.name}</td>' in workers
    assert "12 s ago" in workers
