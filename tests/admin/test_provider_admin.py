"""Providers in the console: live concurrency settings, load against the limit, secrets,
the connectivity check."""

from __future__ import annotations

import pytest

from providers.base import AuthError
from tasks.engine import dispatch
from tasks.models import Provider, Task
from tests.admin.conftest import change_url, changelist, messages_of, post_action
from tests.conftest import make_task


def form_data(provider: Provider, **changes) -> dict:
    """The change form as the browser would post it, with some fields changed."""
    data = {
        "name": provider.name,
        "provider_type": provider.provider_type,
        "enabled": "on" if provider.enabled else "",
        "connection": "{}",
        "new_secrets": "",
        "allow_concurrent_tasks": "on" if provider.allow_concurrent_tasks else "",
        "max_concurrent_tasks": provider.max_concurrent_tasks,
        "enable_task_polling": "on" if provider.enable_task_polling else "",
        "task_poll_interval": provider.task_poll_interval,
        "cpu_total": provider.cpu_total,
        "memory_total_mb": provider.memory_total_mb,
        "disk_total_mb": provider.disk_total_mb,
        "max_containers": provider.max_containers,
        "max_vms": provider.max_vms,
        "port_range_start": provider.port_range_start,
        "port_range_end": provider.port_range_end,
        "default_port_block": provider.default_port_block,
    }
    data.update(changes)
    return {k: v for k, v in data.items() if v != ""}


def test_list_shows_running_and_pending_against_the_limit(root_client, alice, provider, make_instance):
    make_task(make_instance(alice, provider), status="running")
    for _ in range(3):
        make_task(make_instance(alice, provider))
    make_task(make_instance(alice, provider), status="completed")
    html = root_client.get(changelist("provider")).content.decode()
    assert "1 / 1 · 3 pending" in html and "tc-gauge--full" in html


def test_raising_the_limit_applies_at_once(
    root_client, alice, provider, make_instance, django_capture_on_commit_callbacks
):
    tasks = [make_task(make_instance(alice, provider)) for _ in range(3)]
    dispatch.admit(provider.pk)
    assert Task.objects.filter(admitted_at__isnull=False).count() == 1  # serial
    with django_capture_on_commit_callbacks(execute=True):
        response = root_client.post(
            change_url("provider", provider.pk),
            form_data(provider, allow_concurrent_tasks="on", max_concurrent_tasks=3),
        )
    assert response.status_code == 302
    provider.refresh_from_db()
    assert (provider.allow_concurrent_tasks, provider.max_concurrent_tasks, provider.concurrency_limit) == (True, 3, 3)
    # admitted right after the save, without waiting for the sweep
    assert Task.objects.filter(pk__in=[t.pk for t in tasks], admitted_at__isnull=False).count() == 3


def test_limits_are_editable_in_the_list(root_client, provider, django_capture_on_commit_callbacks):
    data = {
        "form-TOTAL_FORMS": "1",
        "form-INITIAL_FORMS": "1",
        "form-0-id": str(provider.pk),
        "form-0-enabled": "on",
        "form-0-allow_concurrent_tasks": "on",
        "form-0-max_concurrent_tasks": "8",
        "form-0-enable_task_polling": "on",
        "form-0-task_poll_interval": "2",
        "_save": "Save",
    }
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = root_client.post(changelist("provider"), data)
    assert response.status_code == 302
    provider.refresh_from_db()
    assert (provider.concurrency_limit, provider.task_poll_interval) == (8, 2)
    assert callbacks  # admission was woken


def test_bad_limits_are_refused_with_the_field(root_client, provider):
    response = root_client.post(change_url("provider", provider.pk), form_data(provider, max_concurrent_tasks=0))
    assert response.status_code == 200
    assert "max_concurrent_tasks" in response.context["adminform"].form.errors
    response = root_client.post(
        change_url("provider", provider.pk), form_data(provider, port_range_start=30000, port_range_end=20000)
    )
    assert "port_range_end" in response.context["adminform"].form.errors
    provider.refresh_from_db()
    assert provider.max_concurrent_tasks == 1


def test_a_save_never_writes_back_stale_capacity_counters(root_client, provider):
    # A create reserved capacity while the operator had the form open.
    Provider.objects.filter(pk=provider.pk).update(cpu_used=6, containers_used=2)
    root_client.post(
        change_url("provider", provider.pk), form_data(provider, allow_concurrent_tasks="on", max_concurrent_tasks=4)
    )
    provider.refresh_from_db()
    assert (provider.max_concurrent_tasks, provider.cpu_used, provider.containers_used) == (4, 6, 2)


def test_secrets_are_write_only(root_client, provider):
    response = root_client.post(
        change_url("provider", provider.pk), form_data(provider, new_secrets='{"token": "tok-SECRET-1"}')
    )
    assert response.status_code == 302
    provider.refresh_from_db()
    assert provider.get_secrets() == {"token": "tok-SECRET-1"}
    assert "tok-SECRET-1" not in provider.secrets_encrypted
    html = root_client.get(change_url("provider", provider.pk)).content.decode()
    assert "tok-SECRET-1" not in html and "set, encrypted (token)" in html
    # an empty field keeps them; bad JSON is refused without echoing it
    root_client.post(change_url("provider", provider.pk), form_data(provider))
    provider.refresh_from_db()
    assert provider.get_secrets() == {"token": "tok-SECRET-1"}
    response = root_client.post(change_url("provider", provider.pk), form_data(provider, new_secrets="pw-LEAK{"))
    assert "not valid JSON" in response.content.decode() and "pw-LEAK" not in str(
        response.context["adminform"].form.errors
    )
    root_client.post(change_url("provider", provider.pk), form_data(provider, clear_secrets="on"))
    provider.refresh_from_db()
    assert provider.get_secrets() == {}


def test_connectivity_check_reports_version_or_error(root_client, provider, monkeypatch):
    response = post_action(root_client, "provider", "check_connectivity", [provider.pk])
    assert any("sim-a: OK, version simulated-" in m for m in messages_of(response))

    broken = Provider.objects.create(name="lxd-1", provider_type="lxd", connection={"endpoint": "https://x:8443"})

    class Refusing:
        def server_info(self):
            raise AuthError("certificate not trusted", op="server_info")

    import providers.base

    real = providers.base.build_driver
    monkeypatch.setattr(
        providers.base, "build_driver", lambda config: Refusing() if config.name == "lxd-1" else real(config)
    )
    response = post_action(root_client, "provider", "check_connectivity", [provider.pk, broken.pk])
    text = messages_of(response)
    assert any("lxd-1: unreachable or refused (AuthError: certificate not trusted)" in m for m in text)
    assert any("1 reachable, 1 failed" in m for m in text)


@pytest.mark.parametrize("model", ["provider", "userquota", "worker", "taskevent", "portmapping"])
def test_other_lists_render(root_client, model, provider):
    assert root_client.get(changelist(model)).status_code == 200


def test_a_held_provider_shows_why_and_the_check_resumes_its_queue(root_client, provider, alice, make_instance):
    from tasks import services
    from tasks.engine import health
    from tasks.models import Task

    instance = make_instance(alice, provider)
    health.mark_unreachable(provider.pk, "start: cannot connect to the host: connection refused")
    task = services.request_operation(alice, instance.pk, "stop")
    assert Task.objects.get(pk=task.pk).admitted_at is None
    page = root_client.get("/admin/tasks/provider/").content.decode()
    assert "unreachable since" in page and "connection refused" in page
    assert ">Health<" in page and ">Running / limit · pending<" in page  # each column keeps its header
    # The simulated host answers the check: the mark goes and the queue resumes.
    response = post_action(root_client, "provider", "check_connectivity", [provider.pk])
    assert any("sim-a: OK" in m and "Its held queue resumes." in m for m in messages_of(response))
    provider.refresh_from_db()
    assert provider.unreachable_since is None
    assert Task.objects.get(pk=task.pk).admitted_at is not None
    assert "reachable" in root_client.get("/admin/tasks/provider/").content.decode()


def test_a_limit_above_one_on_a_serial_provider_is_refused_on_the_field(root_client, provider):
    response = root_client.post(change_url("provider", provider.pk), form_data(provider, max_concurrent_tasks=4))
    assert response.status_code == 200  # the form again, not "changed successfully"
    assert "max_concurrent_tasks" in response.context["adminform"].form.errors
    assert "allow concurrent tasks" in response.content.decode()
    assert Provider.objects.get(pk=provider.pk).max_concurrent_tasks == 1
    # Ticked with it: one effective limit of 4.
    response = root_client.post(
        change_url("provider", provider.pk), form_data(provider, max_concurrent_tasks=4, allow_concurrent_tasks="on")
    )
    assert response.status_code == 302
    assert Provider.objects.get(pk=provider.pk).concurrency_limit == 4


def test_the_open_provider_page_learns_that_its_queue_resumed(root_client, provider):
    """The provider page's health is live: the page names its health view, which answers
    with what the page should show now (a probe elsewhere resumed the queue)."""
    from tasks.engine import health

    health.mark_unreachable(provider.pk, "start: cannot connect to the host: connection refused")
    page = root_client.get(change_url("provider", provider.pk)).content.decode()
    url = f"/admin/tasks/provider/{provider.pk}/health/"
    assert f'data-health-url="{url}"' in page and "unreachable since" in page
    assert root_client.get(url).json()["held"] is True
    health.mark_reachable(provider.pk)  # a probe of another process got an answer
    answer = root_client.get(url).json()
    assert answer["held"] is False and "reachable" in answer["html"] and "unreachable" not in answer["html"]
    assert root_client.get("/admin/tasks/provider/999999/health/").status_code == 404
