"""The Docker driver's bugs found on Docker Engine 20.10 and Podman 4.3, each checked on
both (the fake-daemon tests of the same bugs are in tests/providers/test_docker.py).
Bugs 1 (Podman's /data in a swap), 2 (HostIp "") and 6 (ports at creation, one layer)
are also checked step by step in test_nine_operations."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connection

from providers.base import CancelToken, build_driver, no_progress
from providers.docker import DockerDriver
from tasks import services
from tasks.engine.worker import provider_config, run_admitted_inline
from tasks.models import PortMapping
from tests.daemons.hosts import host, http_get

pytestmark = [pytest.mark.daemons]


@pytest.fixture(params=["docker", "podman"])
def engine(request):
    h = host(request.param)
    assert h.up(), f"{request.param} does not answer: scripts/daemons start {request.param}"
    return h


def created(alice, engine, provider, request):
    instance, task = services.create_instance(alice, provider=provider, image=engine.image, memory_mb=256, disk_mb=1024)
    request.addfinalizer(lambda: engine.purge(instance.guest_name))
    run_admitted_inline(provider.pk)
    task.refresh_from_db()
    instance.refresh_from_db()
    assert (task.status, task.error_message) == ("completed", "")
    return instance


@pytest.mark.django_db(transaction=True)  # the worker runs in a thread; the cancel comes through its heartbeat
def test_a_cancelled_port_change_brings_the_old_container_back_running(
    alice, engine, provider_for, request, monkeypatch, settings
):
    """Bug 3: the swap's stop ran before the try that restores the old container."""
    settings.TASK_CANCEL_POLL_SECONDS = 0.1
    provider = provider_for(engine)
    instance = created(alice, engine, provider, request)
    guest = instance.guest_name
    ssh = instance.port_mappings.order_by("host_port_start").first()
    old_id = engine.inspect(guest)["Id"]
    original = DockerDriver._stop
    stopped = threading.Event()

    def stop_then_wait(self, name, cancel, timeout, op):
        original(self, name, cancel, timeout, op)  # really stopped on the daemon
        stopped.set()
        cancel.sleep(60)  # the cancel arrives while the swap has the container down

    monkeypatch.setattr(DockerDriver, "_stop", stop_then_wait)
    task, mapping = services.create_port(alice, instance.pk, protocol="tcp", guest_port=80)
    runner = threading.Thread(target=lambda: (run_admitted_inline(provider.pk), connection.close()))
    runner.start()
    try:
        assert stopped.wait(60)
        assert engine.status(guest) == "stopped"
        services.cancel_task(alice, task.pk)
    finally:
        runner.join(timeout=120)
    task.refresh_from_db()
    instance.refresh_from_db()
    assert task.status == "cancelled"
    info = engine.inspect(guest)
    assert info["Id"] == old_id and info["State"]["Running"]  # the old container, running again
    assert instance.status == "running" and http_get(ssh.host_port_start)
    assert engine.leftovers(guest) == [f"/{guest}", f"{guest}-data"]
    assert not PortMapping.objects.filter(pk=mapping.pk, status=PortMapping.STATUS_ACTIVE).exists()


@pytest.mark.django_db
def test_paused_reads_running_the_api_version_is_negotiated_and_guests_run_an_init(
    alice, engine, provider_for, request
):
    """Bugs 4 and 5, and the init of bug 6."""
    provider = provider_for(engine)
    instance = created(alice, engine, provider, request)
    guest = instance.guest_name
    driver = build_driver(provider_config(provider))
    info = driver.server_info()
    assert info.details["api_version"] == "1.41" and info.details["client_api_version"] == "1.41"
    assert engine.inspect(guest)["HostConfig"]["Init"] is True
    engine.api.pause(guest)
    try:
        assert driver.get_state(instance.provider_ref).status == "running"  # was: unknown -> error
    finally:
        engine.api.unpause(guest)
    started = time.monotonic()
    driver.stop(instance.provider_ref, CancelToken(), no_progress)
    stop_seconds = time.monotonic() - started
    assert engine.status(guest) == "stopped"
    assert stop_seconds < 10, f"a stop took {stop_seconds:.1f} s: the guest's init did not end it"
    assert driver.get_state(instance.provider_ref).status == "stopped"


@pytest.mark.django_db
def test_a_guest_whose_command_is_a_shell_stops_at_once(alice, engine, provider_for, request):
    """A distro image's command is an interactive shell (TTY), which ignores SIGTERM even
    under an init: the driver stops such a guest with SIGHUP (connection.stop_signal auto)."""
    engine.connection = {**engine.connection, "command": ["sh"]}
    provider = provider_for(engine)
    instance, task = services.create_instance(alice, provider=provider, image=engine.image, memory_mb=256, disk_mb=1024)
    request.addfinalizer(lambda: engine.purge(instance.guest_name))
    run_admitted_inline(provider.pk)
    task.refresh_from_db()
    assert task.status == "completed", task.error_message
    assert engine.inspect(instance.guest_name)["Config"]["StopSignal"] in ("SIGHUP", "1")  # Podman: the number
    stop = services.request_operation(alice, instance.pk, "stop")
    started = time.monotonic()
    run_admitted_inline(provider.pk)
    stop_seconds = time.monotonic() - started
    stop.refresh_from_db()
    assert stop.status == "completed" and engine.status(instance.guest_name) == "stopped"
    assert stop_seconds < 10, f"the stop took {stop_seconds:.1f} s: the shell did not end before the timeout"
