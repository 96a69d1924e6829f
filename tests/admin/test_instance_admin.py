"""Instances in the console: list, filters, search, detail with ports, and the actions."""

from __future__ import annotations

import pytest

from tasks.engine.states import InstanceStatus
from tasks.models import Instance, PortMapping, Task
from tests.admin.conftest import change_url, changelist, confirm_action, messages_of, post_action, report
from tests.conftest import make_task


def listed_ids(response) -> set[int]:
    return {obj.pk for obj in response.context["cl"].result_list}


@pytest.fixture
def fleet(alice, bob, provider, make_instance):
    return {
        "web": make_instance(alice, provider, name="web-1"),
        "db": make_instance(bob, provider, name="db-1", instance_type="vm", status=InstanceStatus.STOPPED),
        "broken": make_instance(alice, provider, name="broken", status=InstanceStatus.ERROR, needs_reconcile=True),
    }


def test_list_shows_status_resources_and_active_task(root_client, fleet):
    task = make_task(fleet["web"], task_type="restart", status="running", progress=55, status_message="rebooting")
    Instance.objects.filter(pk=fleet["web"].pk).update(active_task=task)
    response = root_client.get(changelist("instance"))
    assert response.status_code == 200
    html = response.content.decode()
    assert listed_ids(response) == {i.pk for i in fleet.values()}
    assert "1 CPU · 512 MB RAM · 10 GB disk" in html
    assert f'data-instance-id="{fleet["web"].pk}"' in html
    assert f'data-task-id="{task.pk}" data-role="progress"' in html and "55%" in html and "rebooting" in html


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"status__exact": "stopped"}, {"db"}),
        ({"instance_type__exact": "vm"}, {"db"}),
        ({"needs_reconcile__exact": "1"}, {"broken"}),
        ({"q": "bob"}, {"db"}),
        ({"q": "web"}, {"web"}),
    ],
)
def test_filters_and_search(root_client, fleet, query, expected):
    response = root_client.get(changelist("instance"), query)
    assert listed_ids(response) == {fleet[k].pk for k in expected}


def test_search_by_uuid_and_provider_filter(root_client, fleet, provider):
    web = fleet["web"]
    assert listed_ids(root_client.get(changelist("instance"), {"q": str(web.uuid)})) == {web.pk}
    response = root_client.get(changelist("instance"), {"provider__id__exact": provider.pk})
    assert len(listed_ids(response)) == 3


def test_detail_shows_ports_and_tasks_read_only(root_client, fleet, provider):
    web = fleet["web"]
    PortMapping.objects.create(
        instance=web,
        provider=provider,
        protocol="tcp",
        host_port_start=20022,
        host_port_end=20022,
        guest_port_start=22,
        guest_port_end=22,
        is_ssh=True,
        status="active",
    )
    done = make_task(web, task_type="stop", status="completed")
    response = root_client.get(change_url("instance", web.pk))
    html = response.content.decode()
    assert response.status_code == 200
    assert "20022" in html and "Port mappings" in html
    assert f"#{done.pk}" in html  # recent tasks
    assert 'name="_save"' not in html
    for label in ("Stop", "Restart", "Reset…", "Delete…"):
        assert f">{label}</button>" in html
    assert ">Start</button>" not in html  # it runs: the service would refuse a start
    # read-only: a forged save changes nothing
    response = root_client.post(change_url("instance", web.pk), {"name": "renamed", "cpu": 64})
    assert response.status_code == 403
    web.refresh_from_db()
    assert (web.name, web.cpu) == ("web-1", 1)
    assert root_client.get(changelist("instance") + "add/").status_code == 403


def test_actions_queue_tasks_and_report_skips(root_client, root, fleet):
    busy = make_task(fleet["broken"], task_type="stop", status="running")
    Instance.objects.filter(pk=fleet["broken"].pk).update(active_task=busy)
    response = post_action(root_client, "instance", "start_instances", [i.pk for i in fleet.values()])
    # web is running already (invalid state), broken is busy, db (stopped) starts
    assert report(response) == (1, 2)
    text = " ".join(messages_of(response))
    assert "web-1: cannot start an instance that is running" in text
    assert f"broken: the instance already has an active task ({busy.pk})" in text
    task = Task.objects.get(instance=fleet["db"], task_type="start")
    assert (task.status, task.initiator, task.owner) == ("pending", root, fleet["db"].owner)
    assert task.events.get().actor == "admin:root"
    assert Instance.objects.get(pk=fleet["db"].pk).active_task_id == task.pk


@pytest.mark.parametrize(("action", "task_type"), [("stop_instances", "stop"), ("restart_instances", "restart")])
def test_stop_and_restart(root_client, fleet, action, task_type):
    response = post_action(root_client, "instance", action, [fleet["web"].pk])
    assert report(response) == (1, 0)
    assert Task.objects.get(instance=fleet["web"]).task_type == task_type


@pytest.mark.parametrize(("action", "task_type"), [("delete_instances", "delete"), ("reset_instances", "reset")])
def test_destructive_actions_ask_first(root_client, fleet, action, task_type):
    web = fleet["web"]
    response = post_action(root_client, "instance", action, [web.pk])
    assert response.templates[0].name == "admin/tasks/confirm_action.html"
    assert "web-1" in response.content.decode()
    assert not Task.objects.exists()
    response = confirm_action(root_client, "instance", action, [web.pk])
    assert not Task.objects.exists(), "a reason is required"
    response = confirm_action(root_client, "instance", action, [web.pk], reason="ticket 42")
    assert report(response) == (1, 0)
    task = Task.objects.get(instance=web)
    assert task.task_type == task_type
    assert task.events.get().reason == "ticket 42"  # on the task's timeline


def test_operator_may_act_but_a_viewer_may_not(client, fleet, operator):
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Permission

    viewer = get_user_model().objects.create_user("viewer", password="viewer-pass-123", is_staff=True)
    viewer.user_permissions.set(Permission.objects.filter(codename__in=["view_instance", "view_task"]))
    client.force_login(viewer)
    page = client.get(changelist("instance")).content.decode()
    assert "stop_instances" not in page
    post_action(client, "instance", "stop_instances", [fleet["web"].pk])
    assert not Task.objects.exists()
    client.force_login(operator)
    assert report(post_action(client, "instance", "stop_instances", [fleet["web"].pk])) == (1, 0)
