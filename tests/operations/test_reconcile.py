"""Reconciliation: instances whose last task ended without a trustworthy result."""

from __future__ import annotations

from providers.base import CancelToken, build_driver, no_progress
from tasks import services
from tasks.engine import dispatch, transitions
from tasks.engine.worker import provider_config
from tasks.models import Instance, PortMapping
from tasks.reconcile import reconcile_instance, reconcile_pending
from tests.operations.conftest import fresh, inject, run, usage


def test_force_stopped_stop_shows_what_the_guest_does(alice, provider, live_instance, interrupt):
    interrupt("stop", "force_stop")
    task = services.request_operation(alice, live_instance.pk, "stop")
    run(provider)
    instance = fresh(live_instance)
    assert fresh(task).error_code == "force_stopped"
    assert (instance.status, instance.needs_reconcile) == ("unknown", True)
    assert reconcile_pending() == 1
    instance = fresh(instance)
    # The guest kept running: the stop never reached it.
    assert (instance.status, instance.needs_reconcile) == ("running", False)
    assert reconcile_pending() == 0  # nothing left to do


def test_no_reconciliation_while_a_task_is_active(alice, provider, live_instance):
    Instance.objects.filter(pk=live_instance.pk).update(needs_reconcile=True, status="unknown")
    task = services.request_operation(alice, live_instance.pk, "stop")
    assert reconcile_instance(live_instance.pk) is False  # the task will tell the truth itself
    run(provider)
    instance = fresh(live_instance)
    assert fresh(task).status == "completed" and instance.status == "stopped" and not instance.needs_reconcile


def test_provider_that_cannot_answer_postpones(alice, provider, live_instance):
    Instance.objects.filter(pk=live_instance.pk).update(needs_reconcile=True, status="unknown")
    inject(provider, fail_ops={"get_state": "retryable"})
    assert reconcile_instance(live_instance.pk) is False
    assert fresh(live_instance).needs_reconcile
    inject(provider, fail_ops={})
    assert reconcile_instance(live_instance.pk) is True and fresh(live_instance).status == "running"


def test_change_between_read_and_write_wins_over_the_stale_answer(alice, provider, live_instance, monkeypatch):
    """Compare-and-set: the provider answer is applied only if nothing changed meanwhile."""
    Instance.objects.filter(pk=live_instance.pk).update(needs_reconcile=True, status="unknown")
    import tasks.reconcile as rec

    real = rec._driver_for

    class Racing:
        def __init__(self, driver):
            self.driver = driver

        def get_state(self, ref):
            state = self.driver.get_state(ref)
            # While we read the provider, a new task was queued for the instance.
            services.request_operation(alice, live_instance.pk, "stop")
            return state

    monkeypatch.setattr(rec, "_driver_for", lambda p: Racing(real(p)))
    assert reconcile_instance(live_instance.pk) is False
    assert fresh(live_instance).status == "unknown"


def test_deleted_guest_of_a_force_stopped_delete_releases_everything(alice, provider, live_instance):
    task = services.request_operation(alice, live_instance.pk, "delete")
    dispatch.admit(provider.pk)
    assert transitions.claim(task.pk, token=fresh(task).lease_token, worker="w1")
    # The worker removed the guest, then an admin force-stopped the task before it could finish.
    build_driver(provider_config(provider)).delete({"name": live_instance.guest_name}, CancelToken(), no_progress)
    assert transitions.force_stop(task.pk, actor="admin:root", reason="stuck")
    instance = fresh(live_instance)
    assert instance.needs_reconcile and usage(instance) == (1, 2, 2, 1)
    # Held while its worker may still be stopping: nobody reads the guest yet.
    assert reconcile_instance(instance.pk) is False
    assert transitions.release_hold(task.pk, token=fresh(task).lease_token)  # the worker reports its exit
    assert reconcile_instance(instance.pk) is True
    instance = fresh(instance)
    assert instance.status == "deleted" and instance.live_name is None and usage(instance) == (0, 0, 0, 0)
    assert not PortMapping.objects.filter(instance=instance, status__in=PortMapping.LIVE_STATUSES).exists()


def test_force_stopped_port_mapping_follows_the_host(alice, provider, live_instance, interrupt):
    seen = interrupt("add_port", "force_stop", at=2)  # tcp mapped on the host, force-stopped before udp
    task, mapping = services.create_port(alice, live_instance.pk, protocol="both", guest_port=80)
    run(provider)
    assert seen["task"] == task.pk and fresh(mapping).status == "pending"
    assert fresh(live_instance).needs_reconcile
    # The worker's undo removed the mapping again: reconciliation finds it missing.
    assert reconcile_instance(live_instance.pk) is True
    assert fresh(mapping).status == "failed"
