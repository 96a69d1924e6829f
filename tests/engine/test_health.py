"""Provider health: a host that cannot be reached holds its queue instead of failing its backlog."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from providers.base import UnreachableError
from providers.simulated import SimulatedStore
from tasks import services
from tasks.engine import dispatch, health
from tasks.engine.supervisor import Supervisor
from tasks.engine.worker import execute, run_admitted_inline
from tasks.models import Provider, Task


def set_down(provider: Provider, down: bool) -> None:
    """The simulated host's ``unreachable`` knob: every call is refused to connect."""
    provider.connection = {**provider.connection, "unreachable": down}
    provider.save(update_fields=["connection"])


@pytest.fixture
def backlog(alice, provider, make_instance):
    """Three stops queued on a serial provider (the first admitted)."""
    instances = [make_instance(alice, provider) for _ in range(3)]
    return [services.request_operation(alice, i.pk, "stop") for i in instances]


def run_first(provider: Provider) -> Task:
    task = Task.objects.get(provider=provider, status="pending", admitted_at__isnull=False)
    execute(task.pk, task.lease_token, heartbeat=False)
    task.refresh_from_db()
    return task


def test_a_host_that_is_down_fails_one_task_and_holds_the_rest(provider, backlog, root):
    set_down(provider, True)
    first = run_first(provider)
    assert (first.status, first.error_code) == ("failed", "provider_unreachable")
    assert "cannot connect" in first.error_message
    provider.refresh_from_db()
    assert provider.unreachable_since is not None and "connection refused" in provider.unreachable_error
    assert not provider.accepts_work
    # The finish of the failed task admitted nothing; the others wait, saying why.
    waiting = Task.objects.filter(pk__in=[t.pk for t in backlog[1:]])
    assert set(waiting.values_list("status", "admitted_at")) == {("pending", None)}
    assert dispatch.admit(provider.pk) == []
    info = dispatch.queue_info(waiting.first())
    assert info["blocked_reason"].startswith("provider unreachable since ")
    assert info["blocked_reason"].endswith("; waiting for it to answer")  # not the error: users see it
    assert info["estimated_wait_seconds"] is None  # no honest figure while it is held
    # The API shows it on the task and on the provider.
    as_root = APIClient()
    as_root.force_authenticate(root)
    body = as_root.get(f"/api/v1/admin/tasks/{backlog[1].pk}/").json()
    assert body["blocked_reason"].startswith("provider unreachable since ")
    assert body["estimated_wait_seconds"] is None
    row = as_root.get(f"/api/v1/admin/providers/{provider.pk}/").json()
    assert row["unreachable_since"] is not None and "connection refused" in row["unreachable_error"]
    assert 'cloudhost_provider_reachable{provider="sim-a"} 0.0' in as_root.get("/metrics").content.decode()
    # Nothing more runs while it is held.
    assert run_admitted_inline(provider.pk) == 0


def test_the_queue_resumes_once_a_probe_gets_an_answer(provider, backlog, settings):
    set_down(provider, True)
    run_first(provider)
    provider.refresh_from_db()
    # Down: the probe fails, the mark stays, with the newest error.
    assert health.probe_due(Provider.objects.all(), now=timezone.now() + timedelta(minutes=1)) == {
        provider.pk: "server_info: cannot connect to the simulated host: connection refused"
    }
    provider.refresh_from_db()
    assert provider.unreachable_since is not None
    # Not due again before PROVIDER_PROBE_SECONDS.
    assert health.probe_due(Provider.objects.all()) == {}
    # Back up: the next probe clears the mark and the held tasks run, in order.
    set_down(provider, False)
    later = timezone.now() + timedelta(seconds=settings.PROVIDER_PROBE_SECONDS + 1)
    assert health.probe_due(Provider.objects.all(), now=later) == {provider.pk: None}
    provider.refresh_from_db()
    assert provider.unreachable_since is None and provider.accepts_work
    assert run_admitted_inline(provider.pk) == 2
    assert [Task.objects.get(pk=t.pk).status for t in backlog] == ["failed", "completed", "completed"]


def test_other_provider_errors_do_not_hold_the_queue(provider, backlog):
    provider.connection = {"fail_ops": {"stop": "permanent"}}
    provider.save(update_fields=["connection"])
    first = run_first(provider)
    assert (first.status, first.error_code) == ("failed", "provider_error")
    provider.refresh_from_db()
    assert provider.unreachable_since is None
    # Its finish admitted the next task.
    assert Task.objects.get(pk=backlog[1].pk).admitted_at is not None


def test_a_disabled_provider_is_not_probed(provider):
    health.mark_unreachable(provider.pk, "cannot connect")
    provider.enabled = False
    provider.save(update_fields=["enabled"])
    assert health.probe_due(Provider.objects.all(), now=timezone.now() + timedelta(hours=1)) == {}


def test_one_machine_probes_a_provider_at_a_time(provider, monkeypatch):
    health.mark_unreachable(provider.pk, "cannot connect")
    later = timezone.now() + timedelta(minutes=1)
    # Two machines read the provider as due; the other one claims the probe first.
    seen_due = list(health.due(Provider.objects.all(), later))
    assert [p.pk for p in seen_due] == [provider.pk]
    Provider.objects.filter(pk=provider.pk).update(probed_at=later)
    monkeypatch.setattr(health, "due", lambda queryset, now=None: seen_due)
    probed = []
    monkeypatch.setattr(health, "probe_now", lambda p: probed.append(p.pk))
    assert health.probe_due(Provider.objects.all(), now=later) == {} and probed == []


@pytest.mark.django_db(transaction=True)  # the prober thread writes through its own connection
def test_the_supervisor_probes_held_providers_in_a_thread(provider, settings, monkeypatch):
    settings.PROVIDER_PROBE_SECONDS = 1.0
    health.mark_unreachable(provider.pk, "cannot connect")
    Provider.objects.filter(pk=provider.pk).update(probed_at=timezone.now() - timedelta(seconds=5))
    supervisor = Supervisor(sweep=True, scheduler=False)
    supervisor.sweep()
    assert supervisor.prober is not None
    supervisor.prober.join(10)
    provider.refresh_from_db()
    # The simulated host answers: the mark is gone.
    assert provider.unreachable_since is None


def test_unreachable_is_what_the_drivers_raise_when_nothing_was_sent():
    import requests

    from providers._http import transport_error

    refused = requests.exceptions.ConnectionError(ConnectionRefusedError(111, "Connection refused"))
    assert isinstance(transport_error(refused, "start", mutation=True), UnreachableError)
    after_send = requests.exceptions.ConnectionError("Connection aborted: RemoteDisconnected")
    error = transport_error(after_send, "start", mutation=True)
    assert not isinstance(error, UnreachableError) and error.ambiguous


def test_the_simulated_host_down_changes_nothing(provider, running_instance):
    set_down(provider, True)
    provider.refresh_from_db()
    store = SimulatedStore.for_provider(provider.pk, provider.connection)
    before = store.guest(running_instance.guest_name)
    task = services.request_operation(running_instance.owner, running_instance.pk, "stop")
    dispatch.admit(provider.pk)
    task.refresh_from_db()
    execute(task.pk, task.lease_token, heartbeat=False)
    assert store.guest(running_instance.guest_name) == before
    assert not [e for e in store.executions() if e["applied"]]


def test_instances_of_a_held_provider_wait_for_reconciliation(provider, running_instance, monkeypatch):
    from tasks import reconcile

    Instance = type(running_instance)
    Instance.objects.filter(pk=running_instance.pk).update(needs_reconcile=True)
    health.mark_unreachable(provider.pk, "cannot connect")
    asked = []
    monkeypatch.setattr(reconcile, "reconcile_instance", lambda pk: asked.append(pk) or 1)
    assert reconcile.reconcile_pending() == 0 and asked == []  # no connect timeout inside the sweep
    health.mark_reachable(provider.pk)
    assert reconcile.reconcile_pending() == 1 and asked == [running_instance.pk]
