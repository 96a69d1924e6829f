"""What goes wrong, on the real daemons: a cancel mid-create, a host port taken by
another program, the daemon stopped under a queue, and VMs where KVM is missing.

The tasks run on a real worker tier (tests/daemons/conftest.py, Engine) on MariaDB."""

from __future__ import annotations

import socket
import threading
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from providers.base import DRIVERS
from tasks import services
from tasks.engine import health
from tasks.engine.worker import run_admitted_inline
from tasks.errors import InvalidInput
from tasks.models import BusyHostPort, PortMapping, Provider, Task
from tests.daemons.hosts import http_get, refused
from tests.daemons.tier_hooks import HELD

# transaction=True: the worker tier's processes read what the test commits.
pytestmark = [pytest.mark.daemons, pytest.mark.django_db(transaction=True)]


def driver_class(provider: Provider):
    import importlib

    module, name = DRIVERS[provider.provider_type]
    return getattr(importlib.import_module(module), name)


def created(alice, daemon, provider, request, runner):
    instance, task = services.create_instance(alice, provider=provider, image=daemon.image, memory_mb=256, disk_mb=1024)
    request.addfinalizer(lambda: daemon.purge(instance.guest_name))
    task = runner.run(provider, task)
    instance.refresh_from_db()
    assert (task.status, task.error_message) == ("completed", "")
    return instance


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.1)


def test_cancel_in_the_middle_of_a_create_leaves_nothing_behind(
    alice, daemon, provider_for, monkeypatch, settings, engine
):
    settings.TASK_CANCEL_POLL_SECONDS = 0.1
    provider = provider_for(daemon)
    # The tier's drivers hold each create after its password step (tests/daemons/tier_hooks.py).
    runner = engine(DAEMONS_HOLD_AFTER_PASSWORD="1")
    instance, task = services.create_instance(alice, provider=provider, image=daemon.image, memory_mb=256, disk_mb=1024)
    guest = instance.guest_name
    if runner.inline:
        _cancel_inline(alice, daemon, provider, task, guest, monkeypatch)
    else:
        try:
            wait_for(
                lambda: Task.objects.filter(pk=task.pk, status_message=HELD).exists(), 120, "the create's password step"
            )
            assert daemon.status(guest) == "running"
            services.cancel_task(alice, task.pk)
            runner.run(provider, task, timeout=120)
        finally:
            daemon_leftovers = daemon.leftovers(guest)
            daemon.purge(guest)
        assert daemon_leftovers == []
    task.refresh_from_db()
    instance.refresh_from_db()
    assert (task.status, task.error_code) == ("cancelled", "cancelled_by_user")
    assert instance.status == "failed"
    assert daemon.status(guest) is None
    assert not instance.port_mappings.filter(status__in=[PortMapping.STATUS_ACTIVE, PortMapping.STATUS_PENDING])
    low = provider.port_range_start
    assert refused(low)


def _cancel_inline(alice, daemon, provider, task, guest, monkeypatch) -> None:
    """The same cancel with the worker in a thread of this process (SQLite)."""
    cls = driver_class(provider)
    original = cls.set_password
    reached = threading.Event()

    def set_password_then_wait(self, ref, password, cancel, progress):
        original(self, ref, password, cancel, progress)  # the guest exists and runs by now
        reached.set()
        cancel.sleep(60)  # the user's cancel arrives here, mid-create

    monkeypatch.setattr(cls, "set_password", set_password_then_wait)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            run_admitted_inline(provider.pk)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            connection.close()

    runner = threading.Thread(target=work)
    runner.start()
    try:
        assert reached.wait(60), "the create never got to the password"
        assert daemon.status(guest) == "running"
        services.cancel_task(alice, task.pk)
    finally:
        runner.join(timeout=120)
        daemon_leftovers = daemon.leftovers(guest)
        daemon.purge(guest)
    assert not runner.is_alive() and not errors
    assert daemon_leftovers == []


def test_a_busy_host_port_fails_cleanly_and_the_instance_stays_as_it_was(alice, daemon, provider_for, request, engine):
    provider = provider_for(daemon)
    runner = engine()
    instance = created(alice, daemon, provider, request, runner)
    guest = instance.guest_name
    ssh = instance.port_mappings.order_by("host_port_start").first()
    daemon.run(guest, "mkdir -p /data && echo kept > /data/marker")
    busy = provider.port_range_end - 1
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("0.0.0.0", busy))  # another program on the host holds it (no traffic is sent to it)
    blocker.listen(1)
    try:
        task, mapping = services.create_port(alice, instance.pk, protocol="tcp", guest_port=80, host_port=busy)
        task = runner.run(provider, task)
    finally:
        blocker.close()
    mapping.refresh_from_db()
    instance.refresh_from_db()
    assert task.status == "failed", task.error_message
    assert f"host port {busy} is in use on the host, outside the panel" in task.error_message
    assert mapping.status == PortMapping.STATUS_FAILED
    assert BusyHostPort.objects.filter(provider=provider, port=busy).exists()
    # The instance as it was: running, its SSH port answering, its data and one guest.
    assert instance.status == "running" and daemon.status(guest) == "running"
    assert http_get(ssh.host_port_start)
    assert daemon.run(guest, "cat /data/marker") == "kept"
    assert daemon.leftovers(guest) in ([f"/{guest}", f"{guest}-data"], [guest], [f"/1.0/instances/{guest}"])
    # Once the port is free, the same mapping can be asked for again and works.
    task, mapping = services.create_port(alice, instance.pk, protocol="tcp", guest_port=80, host_port=busy)
    task = runner.run(provider, task)
    assert task.status == "completed", task.error_message
    assert http_get(busy)


def test_a_create_whose_host_port_is_busy_moves_to_another_block(alice, daemon, provider_for, request, engine):
    provider = provider_for(daemon)
    runner = engine()
    busy = provider.port_range_start  # the SSH port of the first block (default_port_block 2)
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("0.0.0.0", busy))  # another program on the host holds it (no traffic is sent to it)
    blocker.listen(1)
    try:
        instance = created(alice, daemon, provider, request, runner)
    finally:
        blocker.close()
    # The daemon refused the port; the task removed that guest and made it again on the next block.
    assert instance.ssh_port == busy + 1
    assert http_get(instance.ssh_port)
    assert BusyHostPort.objects.filter(provider=provider, port=busy).exists()
    assert daemon.leftovers(instance.guest_name) in (
        [f"/{instance.guest_name}", f"{instance.guest_name}-data"],
        [instance.guest_name],
        [f"/1.0/instances/{instance.guest_name}"],
    )


def test_a_stopped_daemon_holds_the_provider_and_its_return_resumes_it(alice, daemon, provider_for, request, engine):
    provider = provider_for(daemon)
    runner = engine()
    instance = created(alice, daemon, provider, request, runner)
    guest = instance.guest_name
    request.addfinalizer(lambda: daemon.up() or daemon.start_daemon())
    daemon.stop_daemon()
    try:
        first = runner.run(provider, services.request_operation(alice, instance.pk, "restart"))
        assert (first.status, first.error_code) == ("failed", "provider_unreachable"), first.error_message
        provider.refresh_from_db()
        assert provider.unreachable_since is not None and not provider.accepts_work
        held = services.request_operation(alice, instance.pk, "stop")
        if runner.inline:
            assert run_admitted_inline(provider.pk) == 0  # held: not admitted, not failed
        else:
            time.sleep(3)  # the tier is free: a held queue admits nothing
        held.refresh_from_db()
        assert held.status == "pending" and held.admitted_at is None
        later = timezone.now() + timedelta(minutes=1)
        assert health.probe_due(Provider.objects.filter(pk=provider.pk), now=later)[provider.pk]  # still down
    finally:
        daemon.start_daemon()
    # LXD and Incus bring back, as they start, the guests that ran when they stopped: let
    # that finish first, or it may start the guest again after the held stop ran (a race
    # of the daemon's own start-up, seen once under load).
    settle = time.monotonic() + 30
    while daemon.status(guest) != "running" and time.monotonic() < settle:
        time.sleep(0.5)
    time.sleep(2)
    later = timezone.now() + timedelta(minutes=2)
    assert health.probe_due(Provider.objects.filter(pk=provider.pk), now=later) == {provider.pk: None}
    provider.refresh_from_db()
    assert provider.unreachable_since is None and provider.accepts_work
    held = runner.run(provider, held)  # the probe's answer admitted the queue
    assert held.status == "completed", held.error_message
    deadline = time.monotonic() + 30
    while daemon.status(guest) != "stopped" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert daemon.status(guest) == "stopped"


def test_vms_are_refused_where_they_cannot_run(alice, daemon, provider_for, engine):
    """No KVM here: Docker refuses a VM up front; LXD/Incus fail the create and keep nothing."""
    provider = provider_for(daemon)
    if daemon.provider_type == "docker":
        with pytest.raises(InvalidInput, match="containers only"):
            services.create_instance(alice, provider=provider, image=daemon.image, instance_type="vm")
        return
    instance, task = services.create_instance(
        alice, provider=provider, image=daemon.image, instance_type="vm", memory_mb=256, disk_mb=1024
    )
    task = engine().run(provider, task)
    instance.refresh_from_db()
    assert task.status == "failed" and task.error_message
    assert instance.status == "failed"
    assert daemon.leftovers(instance.guest_name) == []
