"""The accounting invariant under a random mix of everything that can happen.

500 requests (creates, starts, stops, restarts, resets, password resets,
deletes, port additions and removals, cancels) by 3 users on 2 small providers,
with injected provider failures, lost responses, verification failures, and
operations cancelled, timed out or force-stopped midway. Afterwards (and every
50 requests on the way) check_accounting finds no difference, and no guest is
left on a provider without an instance that accounts for it.
"""

from __future__ import annotations

import os
import random

import pytest
from django.core.management import call_command

from providers.base import CANCEL_LEASE_LOST, CANCEL_TIMEOUT, CANCEL_USER
from providers.simulated import SimulatedDriver, SimulatedStore
from tasks import accounting, services
from tasks.engine import transitions, worker
from tasks.engine.states import ACTIVE, INSTANCE_GONE, PENDING
from tasks.engine.worker import run_admitted_inline
from tasks.errors import ServiceError
from tasks.models import Instance, PortMapping, Provider, Task, UserQuota
from tasks.reconcile import reconcile_pending

REQUESTS = 500
SEED = int(os.environ.get("ACCOUNTING_SEED", "20261128"))  # explore others with ACCOUNTING_SEED

FAILURE_SETTINGS = [
    {},
    {},
    {"fail_rate": 0.15, "seed": 7},
    {"fail_rate": 0.1, "fail_kind": "permanent", "seed": 3},
    {"fail_rate": 0.1, "fail_kind": "ambiguous", "seed": 5},
    {"fail_ops": {"create": "permanent"}},
    {"fail_ops": {"delete": "permanent"}},
    {"fail_ops": {"set_password": "permanent"}},
    {"fail_ops": {"add_port": "permanent"}},
    {"fail_ops": {"rebuild": "permanent"}},
    {"fail_times": {"delete": 2}},
    {"fail_times": {"start": 4}},
    {"delete_leaves_guest": True},
    {"fail_ops": {"get_state": "retryable"}},
]


def _orphans(provider: Provider) -> list[str]:
    """Guests on the host that no accounted-for instance owns."""
    holding = {i.guest_name for i in Instance.objects.filter(provider=provider, holds_resources=True).only("uuid")}
    return [g["name"] for g in SimulatedStore.for_provider(provider.pk).guests() if g["name"] not in holding]


def _assert_consistent(where: str) -> None:
    diffs = accounting.find_differences()
    assert not diffs, f"{where}: " + "; ".join(map(str, diffs))


@pytest.mark.django_db
def test_random_mix_keeps_quotas_capacity_and_ports_exact(django_user_model, settings, monkeypatch):
    settings.SIMULATED_SPEED = 0.0002
    settings.TASK_RETRY_BASE_SECONDS = 0.001
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    rng = random.Random(SEED)
    users = [django_user_model.objects.create_user(f"user{i}", password="pw") for i in range(3)]
    for user in users:
        UserQuota.objects.create(user=user, max_instances=5, max_cpu=8, max_memory_mb=8192, max_disk_mb=80_000)
    providers = [
        Provider.objects.create(
            name=f"sim-{n}",
            cpu_total=12,
            memory_total_mb=12_288,
            max_containers=6,
            max_vms=2,
            port_range_start=30000,
            port_range_end=30060,
            default_port_block=3,
        )
        for n in ("a", "b")
    ]
    interrupts = {"cancel": 0, "timeout": 0, "force_stop": 0}

    def hook(op, guest, token):
        # Now and then, interrupt the running task at this provider step.
        task_id = next((tid for tid, tok in worker._current.items() if tok is token), None)
        if task_id is None or rng.random() > 0.04:
            return  # an undo's own token, or most of the time: carry on
        how = rng.choice(["cancel", "timeout", "force_stop"])
        task = Task.objects.get(pk=task_id)
        if how == "cancel":
            try:
                services.cancel_task(task.owner, task_id)
            except ServiceError:
                return  # a running delete: users cannot cancel it
            token.cancel(CANCEL_USER)
        elif how == "timeout":
            token.cancel(CANCEL_TIMEOUT)
        else:
            transitions.force_stop(task_id, actor="admin:test", reason="random")
            token.cancel(CANCEL_LEASE_LOST)
        interrupts[how] += 1

    monkeypatch.setattr(SimulatedDriver, "step_hook", hook)

    def live_instances():
        return list(Instance.objects.exclude(status__in=INSTANCE_GONE).order_by("pk"))

    def run_all():
        for p in providers:
            run_admitted_inline(p.pk)

    kinds = (
        ["create"] * 6
        + ["start", "stop", "restart", "reset", "reset-password", "delete"] * 2
        + ["create-port"] * 3
        + ["delete-port"] * 2
        + ["cancel", "inject", "run", "run", "run"]
    )
    counts: dict[str, int] = {}
    refused = 0
    requests = 0
    while requests < REQUESTS:
        kind = rng.choice(kinds)
        if kind == "run":
            run_all()
            if rng.random() < 0.3:
                reconcile_pending()
            continue
        if kind == "inject":
            provider = rng.choice(providers)
            provider.connection = dict(rng.choice(FAILURE_SETTINGS))
            provider.save(update_fields=["connection"])
            counts["inject"] = counts.get("inject", 0) + 1
            continue
        requests += 1
        counts[kind] = counts.get(kind, 0) + 1
        user = rng.choice(users)
        try:
            if kind == "create":
                services.create_instance(
                    user,
                    provider=rng.choice(providers),
                    image="debian/12",
                    instance_type=rng.choice(["container", "container", "vm"]),
                    cpu=rng.randint(1, 3),
                    memory_mb=rng.choice([512, 1024, 2048]),
                    disk_mb=rng.choice([5120, 10240]),
                )
            elif kind == "cancel":
                pending = list(Task.objects.filter(status=PENDING).values_list("pk", "owner_id"))
                if pending:
                    task_id, owner_id = rng.choice(pending)
                    services.cancel_task(next(u for u in users if u.pk == owner_id), task_id)
            else:
                mine = [i for i in live_instances() if i.owner_id == user.pk]
                if not mine:
                    refused += 1
                    continue
                instance = rng.choice(mine)
                if kind == "create-port":
                    services.create_port(
                        user,
                        instance.pk,
                        protocol=rng.choice(["tcp", "udp", "both"]),
                        guest_port=rng.randint(1, 60000),
                        host_port=rng.choice([None, None, rng.randint(30000, 30060)]),
                        count=rng.choice([1, 1, 2, 5]),
                    )
                elif kind == "delete-port":
                    ports = list(instance.port_mappings.filter(status__in=["active", "failed"]))
                    if not ports:
                        refused += 1
                        continue
                    services.delete_port(user, instance.pk, rng.choice(ports).pk)
                else:
                    services.request_operation(user, instance.pk, kind)
        except ServiceError:
            refused += 1  # quota/capacity exceeded, busy, invalid state, port conflict: all legitimate
        if requests % 50 == 0:
            _assert_consistent(f"after {requests} requests")
            for p in providers:
                for mapping in PortMapping.objects.filter(provider=p, status__in=PortMapping.LIVE_STATUSES):
                    assert mapping.instance.status not in INSTANCE_GONE

    # Let everything settle with a healthy provider, then reconcile what needs it.
    for provider in providers:
        provider.connection = {}
        provider.save(update_fields=["connection"])
    monkeypatch.setattr(SimulatedDriver, "step_hook", None)
    run_all()
    reconcile_pending(limit=1000)
    assert not Task.objects.filter(status__in=ACTIVE).exists()
    # Still flagged after reconciliation: only the guests of creates that never completed
    # (an undo that could not remove them, a create cancelled after it started). They
    # stay on the host, flagged for operators, until a delete settles them: delete them.
    flagged = list(Instance.objects.filter(needs_reconcile=True))
    for instance in flagged:
        assert not Task.objects.filter(instance=instance, task_type="create", status="completed").exists(), instance
        host = {g["name"] for g in SimulatedStore.for_provider(instance.provider_id).guests()}
        assert instance.guest_name in host, f"{instance} is flagged but its guest is gone"
        services.request_operation(instance.owner, instance.pk, "delete")
    run_all()
    reconcile_pending(limit=1000)
    assert not Instance.objects.filter(needs_reconcile=True).exists()
    _assert_consistent("at the end")
    call_command("check_accounting")  # exits 0: no difference
    for provider in providers:
        assert _orphans(provider) == [], f"guests left behind on {provider.name}"
        # Every instance the panel shows as running or stopped is exactly that on the host.
        host = {g["name"]: g["status"] for g in SimulatedStore.for_provider(provider.pk).guests()}
        for instance in Instance.objects.filter(provider=provider, status__in=["running", "stopped"]):
            assert host.get(instance.guest_name) == instance.status, instance
    # The mix really exercised the paths it claims to.
    finished = dict(
        (status, Task.objects.filter(status=status).count())
        for status in ("completed", "failed", "cancelled", "timeout")
    )
    assert all(finished.values()), finished
    assert all(interrupts.values()), interrupts
    assert refused and counts["create"] > 50, counts
    assert Instance.objects.filter(status="deleted").exists() and Instance.objects.filter(status="failed").exists()
