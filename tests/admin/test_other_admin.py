"""Quotas, workers, the event log, and adding a provider."""

from __future__ import annotations

from datetime import timedelta

from django.urls import reverse
from django.utils import timezone

from tasks import resources
from tasks.models import Provider, TaskEvent, UserQuota, Worker
from tests.admin.conftest import change_url, changelist, post_action, report
from tests.conftest import make_task


def test_quota_save_keeps_the_live_counters(root_client, alice):
    quota = resources.ensure_quota(alice)
    # A create reserved resources while the operator had the form open.
    UserQuota.objects.filter(pk=quota.pk).update(used_instances=3, used_cpu=5)
    data = {
        "user": alice.pk,
        "max_instances": 20,
        "max_cpu": quota.max_cpu,
        "max_memory_mb": quota.max_memory_mb,
        "max_disk_mb": quota.max_disk_mb,
        "max_ports": 80,
    }
    page = root_client.get(change_url("userquota", quota.pk))
    assert b"0 / 50" in page.content  # host ports in use of max ports
    assert root_client.post(change_url("userquota", quota.pk), data).status_code == 302
    quota.refresh_from_db()
    assert (quota.max_instances, quota.used_instances, quota.used_cpu, quota.max_ports) == (20, 3, 5, 80)


def test_workers_list_and_only_stale_rows_can_be_deleted(root_client, running_instance):
    task = make_task(running_instance, status="running")
    live = Worker.objects.create(name="n1:1", node="n1", host="h", pid=1, queue="provider-1", current_task=task)
    stale = Worker.objects.create(
        name="n2:2", node="n2", host="h", pid=2, queue="provider-1", last_heartbeat=timezone.now() - timedelta(hours=1)
    )
    html = root_client.get(changelist("worker")).content.decode()
    assert "n1:1" in html and f"#{task.pk} start" in html and "idle" in html
    alive = root_client.get(changelist("worker"), {"alive": "yes"})
    assert [w.pk for w in alive.context["cl"].result_list] == [live.pk]
    assert root_client.post(reverse("admin:tasks_worker_delete", args=[live.pk]), {"post": "yes"}).status_code == 403
    assert root_client.post(reverse("admin:tasks_worker_delete", args=[stale.pk]), {"post": "yes"}).status_code == 302
    assert list(Worker.objects.values_list("name", flat=True)) == ["n1:1"]
    Worker.objects.create(
        name="n3:3", node="n3", host="h", pid=3, queue="q", last_heartbeat=timezone.now() - timedelta(hours=1)
    )
    response = post_action(root_client, "worker", "delete_stale", Worker.objects.values_list("pk", flat=True))
    assert report(response) == (1, 1)
    assert list(Worker.objects.values_list("name", flat=True)) == ["n1:1"]


def test_worker_state_is_running_idle_or_stale_and_an_idle_one_is_not_deletable(root_client, running_instance):
    task = make_task(running_instance, status="running", worker="n1:1")
    done = make_task(running_instance, task_type="stop", status="completed", worker="n2:2")
    Worker.objects.create(name="n1:1", node="n1", host="h", pid=1, queue="q", current_task=task)
    # Idle for ten minutes: its supervisor kept its heartbeat fresh (refresh_workers).
    idle = Worker.objects.create(
        name="n2:2",
        node="n2",
        host="h",
        pid=2,
        queue="q",
        current_task=done,
        started_at=timezone.now() - timedelta(minutes=10),
    )
    Worker.objects.create(
        name="n3:3", node="n3", host="h", pid=3, queue="q", last_heartbeat=timezone.now() - timedelta(hours=1)
    )
    html = root_client.get(changelist("worker")).content.decode()
    assert f"running task #{task.pk}" in html
    assert html.count(">idle<") == 1 and html.count(">stale<") == 1
    assert root_client.post(reverse("admin:tasks_worker_delete", args=[idle.pk]), {"post": "yes"}).status_code == 403
    response = post_action(root_client, "worker", "delete_stale", Worker.objects.values_list("pk", flat=True))
    assert report(response) == (1, 2)
    assert sorted(Worker.objects.values_list("name", flat=True)) == ["n1:1", "n2:2"]


def test_event_log_is_read_only_and_searchable(root_client, running_instance):
    task = make_task(running_instance)
    event = TaskEvent.objects.create(task=task, to_status="pending", actor="admin:root", reason="why not")
    # searched by its task (id or uuid): the (task, at, id) index
    for term in (str(task.pk), str(task.uuid)):
        response = root_client.get(changelist("taskevent"), {"q": term})
        assert [e.pk for e in response.context["cl"].result_list] == [event.pk]
    assert root_client.post(change_url("taskevent", event.pk), {"reason": "rewritten"}).status_code == 403
    assert root_client.get(changelist("taskevent") + "add/").status_code == 403
    event.refresh_from_db()
    assert event.reason == "why not"


def test_add_a_provider_with_secrets(root_client):
    data = {
        "name": "pve-1",
        "provider_type": "proxmox",
        "enabled": "on",
        "connection": '{"endpoint": "https://pve:8006", "node": "pve"}',
        "new_secrets": '{"token_secret": "s3cr3t-value"}',
        "max_concurrent_tasks": 1,
        "task_poll_interval": 5,
        "cpu_total": 16,
        "memory_total_mb": 65536,
        "disk_total_mb": 1048576,
        "max_containers": 10,
        "max_vms": 10,
        "port_range_start": 20000,
        "port_range_end": 20999,
        "default_port_block": 3,
    }
    assert root_client.post(changelist("provider") + "add/", data).status_code == 302
    provider = Provider.objects.get(name="pve-1")
    assert provider.get_secrets() == {"token_secret": "s3cr3t-value"}
    assert provider.connection == {"endpoint": "https://pve:8006", "node": "pve"}
    assert "s3cr3t-value" not in root_client.get(change_url("provider", provider.pk)).content.decode()


def test_busy_host_ports_are_listed_searchable_and_can_be_freed(root_client, provider):
    from tasks import ports
    from tasks.models import BusyHostPort

    ports.record_busy(provider.pk, [20002, 20007], "listen tcp 0.0.0.0:20002: bind: address already in use")
    response = root_client.get(changelist("busyhostport"), {"q": "20007"})
    assert [b.port for b in response.context["cl"].result_list] == [20007]
    assert list(root_client.get(changelist("busyhostport"), {"q": "ssh"}).context["cl"].result_list) == []
    html = root_client.get(changelist("busyhostport")).content.decode()
    assert "address already in use" in html and "20002" in html
    assert root_client.get(changelist("busyhostport") + "add/").status_code == 403
    # Freed on the host: deleting the row makes the port eligible again at once.
    assert ports.find_free(provider, "tcp", 1) == 20000 and ports.find_free(provider, "tcp", 3) == 20003
    busy = BusyHostPort.objects.get(port=20002)
    post_action(root_client, "busyhostport", "delete_selected", [busy.pk], post="yes")
    assert list(BusyHostPort.objects.values_list("port", flat=True)) == [20007]
    assert ports.find_free(provider, "tcp", 3) == 20000
