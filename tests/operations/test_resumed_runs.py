"""A run that stops because its task goes on elsewhere (a shutdown's handback, a lost
lease while recovery resumes it) leaves its work in place for the next attempt;
a failed create whose guest could not be removed stays flagged and names it.

In-process (SQLite); the real-process version, every operation at every step, is
tests/engine/test_convergence.py.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from providers.base import CANCEL_LEASE_LOST, CANCEL_SHUTDOWN
from providers.simulated import SimulatedDriver
from tasks import crypto, services
from tasks.engine import clock, transitions, worker
from tasks.models import Task, TaskEvent, TaskSecret
from tasks.reconcile import reconcile_instance
from tests.operations.conftest import fresh, inject, port_statuses, run, store, usage


@pytest.fixture
def stop_at(monkeypatch):
    """stop_at(op, at, how): at the at-th delay step of ``op`` (first run only), the run stops
    as a draining worker's would ("shutdown") or as a fenced one's whose task recovery
    resumed ("resumed": its lease ran out and it went back to pending)."""

    def arm(op: str, at: int, how: str) -> dict:
        seen = {"n": 0, "task": None}

        def hook(hook_op, guest, token):
            if hook_op != op or seen["task"] is not None:
                return
            seen["n"] += 1
            if seen["n"] != at:
                return
            task_id = next(tid for tid, tok in worker._current.items() if tok is token)
            seen["task"] = task_id
            if how == "shutdown":
                token.cancel(CANCEL_SHUTDOWN)
            else:
                Task.objects.filter(pk=task_id).update(lease_expires_at=clock.now() - timedelta(seconds=1))
                assert transitions.recover_lost(task_id)
                token.cancel(CANCEL_LEASE_LOST)

        monkeypatch.setattr(SimulatedDriver, "step_hook", hook)
        return seen

    return arm


def password_of(task: Task) -> str:
    return crypto.decrypt(TaskSecret.objects.get(task=task).ciphertext)


@pytest.mark.parametrize("how", ["shutdown", "resumed"])
@pytest.mark.parametrize("op,at", [("create", 2), ("start", 1), ("set_password", 1), ("add_port", 2)])
def test_a_create_that_goes_on_elsewhere_is_not_undone_and_the_next_attempt_finishes_it(
    alice, provider, stop_at, op, at, how
):
    seen = stop_at(op, at, how)
    instance, task = services.create_instance(alice, provider=provider, image="debian/12")
    run(provider)  # the first run stops; the task goes back to pending; the second run finishes it
    task, instance = fresh(task), fresh(instance)
    assert seen["task"] == task.pk
    reason = "resumed:handback" if how == "shutdown" else "resumed:worker_lost"
    assert TaskEvent.objects.filter(task=task, reason=reason).count() == 1
    assert (task.status, task.attempt_count) == ("completed", 2)
    sim = store(provider)
    # Nothing was removed in between: the second run found the guest and finished it.
    assert sim.applied("delete", instance.guest_name) == 0
    assert sim.applied("remove_port", instance.guest_name) == 0
    assert [g["name"] for g in sim.guests()] == [instance.guest_name]
    assert sim.guest(instance.guest_name)["status"] == "running"
    assert instance.status == "running" and not instance.needs_reconcile
    assert set(port_statuses(instance)) == {"active"}
    assert len(sim.ports(instance.guest_name)) == 3  # default block: ssh/tcp, then one range for tcp and udp
    assert sim.password_matches(instance.guest_name, password_of(task))
    assert usage(instance) == (1, 1, 1, 1)  # charged once


@pytest.mark.parametrize("how", ["shutdown", "resumed"])
def test_a_port_mapping_that_goes_on_elsewhere_is_not_unmapped(alice, provider, live_instance, stop_at, how):
    seen = stop_at("add_port", 2, how)  # tcp is mapped, udp is being mapped
    task, mapping = services.create_port(alice, live_instance.pk, protocol="both", guest_port=8080)
    run(provider)
    task, mapping = fresh(task), fresh(mapping)
    assert seen["task"] == task.pk and (task.status, task.attempt_count) == ("completed", 2)
    assert store(provider).applied("remove_port", live_instance.guest_name) == 0
    assert mapping.status == "active"
    handles = [p["handle"] for p in store(provider).ports(live_instance.guest_name)]
    assert sorted(handles) == sorted(set(handles))
    assert {"tcp", "udp"} <= {p["protocol"] for p in store(provider).ports(live_instance.guest_name)}


def test_a_force_stopped_create_is_still_undone_by_its_fenced_worker(alice, provider, interrupt):
    # Force-stop ends the task: nobody resumes it, so the fenced run removes its guest.
    interrupt("create", "force_stop", at=2)
    instance, task = services.create_instance(alice, provider=provider, image="debian/12")
    run(provider)
    assert fresh(task).status == "cancelled"
    assert store(provider).guest(instance.guest_name) is None


def test_a_resumed_create_cancelled_while_pending_keeps_its_reservation_until_reconciled(alice, provider, stop_at):
    stop_at("create", 2, "shutdown")
    instance, task = services.create_instance(alice, provider=provider, image="debian/12")
    worker.run_admitted_inline(provider.pk, max_tasks=1)  # the first run only: handed back
    assert fresh(task).status == "pending" and store(provider).guest(instance.guest_name) is not None
    services.cancel_task(alice, task.pk)
    task, instance = fresh(task), fresh(instance)
    assert task.status == "cancelled"
    # Its first attempt made a guest: nothing is released while it may be on the host.
    assert instance.needs_reconcile and instance.holds_resources and usage(instance) == (1, 1, 1, 1)
    assert reconcile_instance(instance.pk)
    instance = fresh(instance)
    assert instance.status == "error" and instance.needs_reconcile  # the half-made guest is still there
    services.request_operation(alice, instance.pk, "delete")
    run(provider)
    instance = fresh(instance)
    assert instance.status == "deleted" and not instance.needs_reconcile and usage(instance) == (0, 0, 0, 0)
    assert store(provider).guest(instance.guest_name) is None


@pytest.mark.parametrize("how", ["fail", "cancel", "timeout"])
def test_a_create_whose_guest_could_not_be_removed_stays_flagged_and_names_the_guest(
    alice, provider, interrupt, how, client
):
    inject(provider, fail_ops={"delete": "permanent"})
    if how == "fail":
        inject(provider, fail_ops={"add_port": "permanent", "delete": "permanent"})
    else:
        interrupt("set_password", how)
    instance, task = services.create_instance(alice, provider=provider, image="debian/12")
    run(provider)
    task, instance = fresh(task), fresh(instance)
    assert task.status == {"fail": "failed", "cancel": "cancelled", "timeout": "timeout"}[how]
    assert "could not be removed again" in task.error_message
    assert f"guest {instance.guest_name} may remain on the provider" in task.error_message
    assert instance.status == "error" and instance.needs_reconcile and instance.holds_resources
    # The sweep's reconciliation finds the guest still there: it stays flagged.
    assert reconcile_instance(instance.pk)
    instance = fresh(instance)
    assert (instance.status, instance.needs_reconcile, instance.holds_resources) == ("error", True, True)
    assert store(provider).guest(instance.guest_name) is not None
    # What the owner sees through the API.
    client.force_login(alice)
    body = client.get(f"/api/v1/instances/{instance.pk}/").json()
    assert body["status"] == "error" and body["needs_reconcile"] is True
    assert "may remain on the provider" in client.get(f"/api/v1/tasks/{task.pk}/").json()["error_message"]
    # Once the guest is verifiably gone (a delete), the flag and the reservation go.
    inject(provider, fail_ops={})
    services.request_operation(alice, instance.pk, "delete")
    run(provider)
    instance = fresh(instance)
    assert (instance.status, instance.needs_reconcile, instance.holds_resources) == ("deleted", False, False)


@pytest.mark.parametrize("how", ["shutdown", "resumed"])
def test_a_resumed_reset_does_not_reinstall_again(alice, provider, live_instance, stop_at, how):
    """The reinstall finished, then the run stopped (at the start that follows it): the next
    attempt skips the reinstall (Task.checkpoints), finishes the rest, and shows the last password."""
    seen = stop_at("start", 1, how)
    task = services.request_operation(alice, live_instance.pk, "reset")
    run(provider)
    task, instance = fresh(task), fresh(live_instance)
    assert seen["task"] == task.pk and (task.status, task.attempt_count) == ("completed", 2)
    sim = store(provider)
    assert sim.applied("rebuild", instance.guest_name) == 1, "reinstalled once"
    assert "rebuild" in task.checkpoints
    steps = list(TaskEvent.objects.filter(task=task, kind="step").values_list("message", flat=True))
    assert "reinstalling from the image: done by an earlier attempt" in steps
    assert instance.status == "running" and sim.guest(instance.guest_name)["status"] == "running"
    assert sim.password_matches(instance.guest_name, password_of(task))


def test_a_resumed_restart_does_not_reboot_again(alice, provider, live_instance, monkeypatch):
    """Lost right after the reboot returned: the resumed attempt reads the state and ends."""
    from tasks.operations.steps import Steps

    original = Steps.step
    lost = {}

    def step(self, percent, message):
        if message == "reading the guest's state" and not lost:
            lost["task"] = self.task_id
            Task.objects.filter(pk=self.task_id).update(lease_expires_at=clock.now() - timedelta(seconds=1))
            assert transitions.recover_lost(self.task_id)
            self.ctx.cancel.cancel(CANCEL_LEASE_LOST)
        return original(self, percent, message)

    monkeypatch.setattr(Steps, "step", step)
    task = services.request_operation(alice, live_instance.pk, "restart")
    run(provider)
    task = fresh(task)
    assert lost["task"] == task.pk and (task.status, task.attempt_count) == ("completed", 2)
    assert store(provider).applied("restart", live_instance.guest_name) == 1, "rebooted once"
