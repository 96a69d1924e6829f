"""Convergence (issue 16): each of the nine operations, interrupted at each of its
provider steps by a graceful shutdown (SIGTERM; the task is handed back) or by
kill -9 of the whole worker tier (the lease runs out; recovery resumes it), is
finished by a second tier, and the simulated host then holds exactly what one
successful run leaves: one guest per instance (none after a delete), one mapping
per port handle of the live mappings, the last password, nothing else; and
`check_accounting` finds no difference (quota, capacity and ports charged once).

Real `run_workers` processes on MariaDB (tests/engine/harness.py). "Each step":
the simulated driver's SIMULATED_HOLDS seam holds the first run at the n-th delay
step of a provider call on a given guest (providers/simulated/driver.py); every
instance of a case is held at its own step in the same tier, all at once.
"""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db import connection

from providers.simulated import SimulatedStore
from tasks import crypto, resources, services
from tasks.engine.states import FINAL
from tasks.engine.worker import run_admitted_inline
from tasks.models import Instance, PortMapping, Provider, Task, TaskEvent, TaskSecret
from tasks.operations.steps import port_specs
from tests.engine.harness import WorkerTier, wait_until

pytestmark = [pytest.mark.mariadb, pytest.mark.processes, pytest.mark.django_db(transaction=True)]

# The delay steps of each operation's first run, as "<driver call>:<n-th delay step of
# that call in the run>" (the default port block of 2 is ssh/tcp and one tcp+udp port:
# three add_port calls; a "both" mapping is two calls, tcp then udp).
STEPS = {
    "create": [
        "create:1",  # downloading the image (nothing on the host yet)
        "create:2",  # unpacking (the guest exists, half built)
        "create:3",  # configuring
        "start:1",
        "set_password:1",
        "add_port:1",
        "add_port:2",
        "add_port:3",
    ],
    "reset": ["rebuild:1", "rebuild:2", "start:1", "set_password:1", "add_port:1", "add_port:2", "add_port:3"],
    "start": ["start:1"],
    "stop": ["stop:1"],
    "restart": ["restart:1", "restart:2"],  # shutting down, booting
    "delete": ["delete:1", "delete:2"],  # stopping, removing
    "reset_password": ["set_password:1"],
    "create_port": ["add_port:1", "add_port:2"],
    "delete_port": ["remove_port:1", "remove_port:2"],
}
GROUPS = {
    "create": ("create",),
    "reset": ("reset",),
    "others": ("start", "stop", "restart", "delete", "reset_password", "create_port", "delete_port"),
}
WITH_PASSWORD = {"create", "reset", "reset_password"}


@pytest.fixture
def node():
    return f"cv{uuid.uuid4().hex[:6]}"


def setup_provider(owner, slots: int) -> Provider:
    provider = Provider.objects.create(
        name=f"conv-{uuid.uuid4().hex[:6]}",
        allow_concurrent_tasks=True,
        max_concurrent_tasks=slots,
        task_poll_interval=1,
        default_port_block=2,
    )
    quota = resources.ensure_quota(owner)
    quota.max_instances = quota.max_cpu = quota.max_ports = 100
    quota.max_memory_mb = quota.max_disk_mb = 10**7
    quota.save()
    return provider


def live_instances(owner, provider: Provider, n: int) -> list[Instance]:
    """Made the real way (create tasks, run in this process): their guests, ports and charges exist."""
    made = [services.create_instance(owner, provider=provider, image="debian/12")[0] for _ in range(n)]
    run_admitted_inline(provider.pk)
    instances = list(Instance.objects.filter(pk__in=[i.pk for i in made]).order_by("pk"))
    assert {i.status for i in instances} <= {"running"}, [i.status for i in instances]
    return instances


def prepare(owner, provider: Provider, ops: tuple[str, ...]) -> list[tuple[str, str, Instance]]:
    """(op, step, instance) for every case of the group, with each instance in the state its op needs."""
    cases = [(op, step) for op in ops for step in STEPS[op]]
    existing = [c for c in cases if c[0] != "create"]
    instances = iter(live_instances(owner, provider, len(existing)) if existing else [])
    out = []
    for op, step in cases:
        if op == "create":
            out.append((op, step, None))
            continue
        instance = next(instances)
        if op == "start":
            services.request_operation(owner, instance.pk, "stop")
        elif op == "delete_port":
            services.create_port(owner, instance.pk, protocol="both", guest_port=8080)
        out.append((op, step, instance))
    run_admitted_inline(provider.pk)
    return out


def queue(owner, provider: Provider, op: str, instance: Instance | None) -> tuple[Task, Instance]:
    if op == "create":
        instance, task = services.create_instance(owner, provider=provider, image="debian/12")
        return task, instance
    if op == "create_port":
        task, _ = services.create_port(owner, instance.pk, protocol="both", guest_port=9090)
        return task, instance
    if op == "delete_port":
        mapping = PortMapping.objects.get(instance=instance, guest_port_start=8080, status="active")
        return services.delete_port(owner, instance.pk, mapping.pk), instance
    return services.request_operation(owner, instance.pk, op.replace("_", "-")), instance


def check_accounting() -> str:
    out = io.StringIO()
    call_command("check_accounting", stdout=out)  # raises CommandError on any difference
    return out.getvalue()


def host_ports(store: SimulatedStore, guest: str) -> list[tuple]:
    return sorted(
        (p["protocol"], p["host_start"], p["host_end"], p["guest_start"], p["guest_end"]) for p in store.ports(guest)
    )


def live_ports(instance: Instance) -> list[tuple]:
    return sorted(
        (s.protocol, s.host_port_start, s.host_port_end, s.guest_port_start, s.guest_port_end)
        for m in PortMapping.objects.filter(instance=instance, status__in=PortMapping.LIVE_STATUSES)
        for s in port_specs(m)
    )


@pytest.mark.parametrize("how", ["sigterm", "kill9"])
@pytest.mark.parametrize("group", list(GROUPS))
def test_every_operation_interrupted_at_every_step_converges(alice, tmp_path, node, group, how):
    ops = GROUPS[group]
    n = sum(len(STEPS[op]) for op in ops)
    provider = setup_provider(alice, n)
    cases = prepare(alice, provider, ops)
    store = SimulatedStore.for_provider(provider.pk, provider.connection)

    # Queue every case with its hold: instance i's first run waits at its own step.
    holds_file = tmp_path / "holds.json"
    queued = []
    holds = {}
    for op, step, instance in cases:
        task, instance = queue(alice, provider, op, instance)
        holds[instance.guest_name] = step
        queued.append((op, step, task, instance))
    holds_file.write_text(json.dumps(holds))
    env = {
        "SIMULATED_HOLDS": str(holds_file),
        "TASK_EXTRA_OPERATIONS": "",  # the real start/stop/restart, not the harness's sleep operations
        "SIMULATED_SPEED": "0.01",
        "WORKER_POOL_MIN": str(n),
        "WORKER_CONCURRENCY": str(n),
        "TASK_SHUTDOWN_GRACE_SECONDS": "1",
        "TASK_RETRY_BASE_SECONDS": "0.05",
    }
    ids = [task.pk for _, _, task, _ in queued]

    first = WorkerTier(tmp_path, node, **env).start()
    try:
        markers = [Path(f"{holds_file}.{guest}.held") for guest in holds]
        try:
            wait_until(lambda: all(m.exists() for m in markers), 60, 0.1, f"all {n} runs to reach their step")
        except AssertionError:
            missing = [
                (op, step, t.pk, Task.objects.get(pk=t.pk).status, Task.objects.get(pk=t.pk).error_message)
                for (op, step, t, i) in queued
                if not Path(f"{holds_file}.{i.guest_name}.held").exists()
            ]
            raise AssertionError(f"not held: {missing}") from None
        # Every case is inside its step now: interrupt the whole machine.
        if how == "sigterm":
            assert first.stop(timeout=30) == 0
            statuses = set(Task.objects.filter(pk__in=ids).values_list("status", flat=True))
            assert statuses == {"pending"}, f"handed back at shutdown: {statuses}"
        else:
            first.kill()
    finally:
        first.stop()

    with WorkerTier(tmp_path, node + "b", **env):
        wait_until(lambda: not Task.objects.filter(pk__in=ids).exclude(status__in=FINAL).exists(), 90, 0.2, "resumed")

    reason = "resumed:handback" if how == "sigterm" else "resumed:worker_lost"
    problems = []
    for op, step, task, instance in queued:
        task.refresh_from_db()
        instance.refresh_from_db()
        case = f"{op} at {step} ({how}): task {task.pk}"
        if (task.status, task.attempt_count) != ("completed", 2):
            problems.append(f"{case}: {task.status} after {task.attempt_count} attempts: {task.error_message}")
            continue
        if TaskEvent.objects.filter(task=task, reason=reason).count() != 1:
            problems.append(f"{case}: not resumed once by {reason}")
        guest = store.guest(instance.guest_name)
        # The interrupted run undid nothing: the resumed one finished its work.
        if op != "delete" and store.applied("delete", instance.guest_name):
            problems.append(f"{case}: the guest was deleted in between")
        if op != "delete_port" and store.applied("remove_port", instance.guest_name):
            problems.append(f"{case}: a port was unmapped in between")
        if op == "delete":
            if guest is not None or store.ports(instance.guest_name) or instance.status != "deleted":
                problems.append(f"{case}: guest {guest and guest['status']}, instance {instance.status}")
            continue
        expected = "stopped" if op == "stop" else "running"
        if guest is None or guest["status"] != expected or instance.status != expected:
            problems.append(f"{case}: guest {guest and guest['status']}, instance {instance.status}, not {expected}")
            continue
        if instance.needs_reconcile or instance.active_task_id is not None:
            problems.append(f"{case}: instance still flagged or busy")
        on_host, live = host_ports(store, instance.guest_name), live_ports(instance)
        if on_host != live:
            problems.append(f"{case}: host ports {on_host} != live mappings {live}")
        if set(PortMapping.objects.filter(instance=instance).values_list("status", flat=True)) - {"active", "deleted"}:
            problems.append(f"{case}: a mapping is neither active nor deleted")
        if op in WITH_PASSWORD:
            password = crypto.decrypt(TaskSecret.objects.get(task=task).ciphertext)
            if not store.password_matches(instance.guest_name, password):
                problems.append(f"{case}: the guest's password is not the one shown")
    # Nothing else on the host: one guest per live instance of this provider.
    live_guests = {
        i.guest_name for i in Instance.objects.filter(provider=provider).exclude(status__in=["deleted", "failed"])
    }
    host_guests = {g["name"] for g in store.guests()}
    if host_guests != live_guests:
        problems.append(f"host guests {sorted(host_guests ^ live_guests)} differ from the live instances")
    assert not problems, "\n".join(problems)
    assert "accounting consistent" in check_accounting()
    connection.close()
