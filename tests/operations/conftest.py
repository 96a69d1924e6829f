"""Helpers for the operation tests: run tasks inline on the simulated provider,
inject failures, and interrupt a running operation at a chosen provider step."""

from __future__ import annotations

import pytest

from providers.base import CANCEL_LEASE_LOST, CANCEL_TIMEOUT, CANCEL_USER, PermanentError
from providers.simulated import SimulatedDriver, SimulatedStore
from tasks import services
from tasks.engine import transitions, worker
from tasks.engine.worker import run_admitted_inline
from tasks.models import Instance, PortMapping, Provider, Task


@pytest.fixture(autouse=True)
def _fast(settings):
    # Delays of a few milliseconds keep every step (and its cancel points) in play;
    # a cheap hasher keeps the personas' set-up out of the way.
    settings.SIMULATED_SPEED = 0.002
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def run(provider: Provider) -> int:
    return run_admitted_inline(provider.pk)


def inject(provider: Provider, **knobs) -> None:
    """Set failure-injection knobs on the provider (read by the next task's driver)."""
    provider.refresh_from_db()
    provider.connection = {**(provider.connection or {}), **knobs}
    provider.save(update_fields=["connection"])


def clear(provider: Provider) -> None:
    provider.refresh_from_db()
    provider.connection = {}
    provider.save(update_fields=["connection"])


def store(provider: Provider) -> SimulatedStore:
    return SimulatedStore.for_provider(provider.pk, provider.connection)


def usage(instance: Instance) -> tuple:
    """(user's used instances/cpu, provider's used cpu/containers): what a reservation changes."""
    quota = instance.owner.quota
    quota.refresh_from_db()
    provider = Provider.objects.get(pk=instance.provider_id)
    return (quota.used_instances, quota.used_cpu, provider.cpu_used, provider.containers_used + provider.vms_used)


def port_statuses(instance: Instance) -> list[str]:
    return list(PortMapping.objects.filter(instance=instance).order_by("pk").values_list("status", flat=True))


def fresh(obj):
    obj.refresh_from_db()
    return obj


@pytest.fixture
def live_instance(alice, provider):
    """A running instance made the real way: create task run to completion."""
    instance, _ = services.create_instance(alice, provider=provider, image="debian/12", cpu=2, memory_mb=1024)
    run(provider)
    instance.refresh_from_db()
    assert instance.status == "running"
    return instance


@pytest.fixture
def stopped_instance(alice, live_instance, provider):
    services.request_operation(alice, live_instance.pk, "stop")
    run(provider)
    live_instance.refresh_from_db()
    assert live_instance.status == "stopped"
    return live_instance


@pytest.fixture
def interrupt(monkeypatch, root):
    """interrupt(op, how, at=1): at the at-th delay step of provider call ``op``, interrupt the task.

    how: "cancel" (the owner's or, for a running delete, an admin's cancel, then
    the token is set as the heartbeat would), "timeout" (the deadline fires),
    "force_stop" (an admin force-stops it; the worker loses its lease), or
    "fail" (the provider call raises a permanent error at that point).
    """

    def arm(op: str, how: str = "cancel", at: int = 1) -> dict:
        seen = {"n": 0, "task": None}

        def hook(hook_op, guest, token):
            if hook_op != op:
                return
            seen["n"] += 1
            if seen["n"] != at:
                return
            task_id = next(tid for tid, tok in worker._current.items() if tok is token)
            seen["task"] = task_id
            task = Task.objects.get(pk=task_id)
            if how == "cancel":
                if task.task_type == "delete":
                    services.cancel_task(root, task_id, admin=True, reason="test")
                else:
                    services.cancel_task(task.owner, task_id)
                token.cancel(CANCEL_USER)
            elif how == "timeout":
                token.cancel(CANCEL_TIMEOUT)
            elif how == "force_stop":
                transitions.force_stop(task_id, actor="admin:root", reason="test")
                token.cancel(CANCEL_LEASE_LOST)
            elif how == "fail":
                raise PermanentError(f"injected failure in {op}")

        monkeypatch.setattr(SimulatedDriver, "step_hook", hook)
        return seen

    return arm
