"""The nine operations end to end against each real daemon, through the engine.

A Provider row points at the daemon; services queue each task and a real worker
tier (`run_workers`, on MariaDB as .ci/run runs it) runs it: admission, the broker,
a pool worker, heartbeats, the guarded finish (tests/daemons/conftest.py, Engine). After each step the daemon's own
state is read without the driver (tests/daemons/hosts.py): the guest exists, runs
or is stopped, its ports answer a TCP connect on 127.0.0.1 (busybox httpd inside
the guest), the root password's hash in /etc/shadow matches the password the task
handed out, Docker's /data volume is mounted and survives a port change, and delete
leaves nothing behind.
"""

from __future__ import annotations

import time

import pytest

from tasks import services
from tasks.models import PortMapping, Task
from tests.daemons.conftest import FIGURES
from tests.daemons.hosts import http_get, password_matches, refused

# transaction=True: the worker tier's processes read what the test commits.
pytestmark = [pytest.mark.daemons, pytest.mark.django_db(transaction=True)]


def test_nine_operations(alice, daemon, provider_for, request, engine):
    provider = provider_for(daemon)
    runner = engine()

    def run(provider, task: Task) -> Task:
        task = runner.run(provider, task)
        assert (task.status, task.error_message) == ("completed", ""), f"{task.task_type}: {task.error_message}"
        return task

    def timed(provider, task: Task) -> float:
        started = time.monotonic()
        run(provider, task)
        return time.monotonic() - started

    docker = daemon.provider_type == "docker"
    images_before = {i["Id"] for i in daemon.api.images()} if docker else set()

    # 1. create: running, password set, the port block published, Docker's /data mounted.
    instance, task = services.create_instance(alice, provider=provider, image=daemon.image, memory_mb=256, disk_mb=1024)
    guest = instance.guest_name
    request.addfinalizer(lambda: daemon.purge(guest))
    create_seconds = timed(provider, task)
    instance.refresh_from_db()
    assert instance.status == "running" and daemon.status(guest) == "running"
    password = services.read_password_once(alice, task.pk)
    assert password_matches(daemon.shadow_hash(guest), password)
    block = list(instance.port_mappings.order_by("host_port_start"))
    assert [m.status for m in block] == [PortMapping.STATUS_ACTIVE] * 2
    ssh, second = block
    assert ssh.guest_port_start == 22 and http_get(ssh.host_port_start)
    assert instance.addresses, "the guest's addresses are recorded"
    if docker:
        assert daemon.data_volumes(guest) == [f"{guest}-data"]
        base_layers = len(daemon.api.inspect_image("cloudhost/busybox:latest")["RootFS"]["Layers"])
        # Published at creation: the container runs on the image itself, no committed layer.
        assert daemon.image_layers(guest) == base_layers
        assert not [t for i in daemon.api.images() for t in i.get("RepoTags") or [] if guest in t]
    FIGURES.append(
        f"{daemon.name}: create task {create_seconds:.1f} s"
        + (" (target 5 s: " + ("met" if create_seconds <= 5 else "missed") + ")" if docker else "")
    )

    # 2. stop
    stop_seconds = timed(provider, services.request_operation(alice, instance.pk, "stop"))
    assert daemon.status(guest) == "stopped" and refused(ssh.host_port_start)
    FIGURES.append(f"{daemon.name}: stop task {stop_seconds:.1f} s")

    # 3. start
    run(provider, services.request_operation(alice, instance.pk, "start"))
    assert daemon.status(guest) == "running" and http_get(ssh.host_port_start)

    # 4. restart
    before = daemon.run(guest, "cat /proc/1/stat | cut -d' ' -f22")  # PID 1's start time
    restart_seconds = timed(provider, services.request_operation(alice, instance.pk, "restart"))
    assert daemon.status(guest) == "running" and http_get(ssh.host_port_start)
    assert daemon.run(guest, "cat /proc/1/stat | cut -d' ' -f22") != before
    FIGURES.append(f"{daemon.name}: restart task {restart_seconds:.1f} s")

    # 5. reset-password
    task = run(provider, services.request_operation(alice, instance.pk, "reset-password"))
    password = services.read_password_once(alice, task.pk)
    assert password_matches(daemon.shadow_hash(guest), password)

    # 6. create-port: guest port 80 on a new host port; the data and the password survive.
    daemon.run(guest, "mkdir -p /data && echo kept > /data/marker")
    task, mapping = services.create_port(alice, instance.pk, protocol="tcp", guest_port=80)
    run(provider, task)
    mapping.refresh_from_db()
    assert mapping.status == PortMapping.STATUS_ACTIVE
    assert daemon.status(guest) == "running"
    assert http_get(mapping.host_port_start) and http_get(ssh.host_port_start)
    assert daemon.run(guest, "cat /data/marker") == "kept"
    assert password_matches(daemon.shadow_hash(guest), password)
    if docker:
        assert daemon.data_volumes(guest) == [f"{guest}-data"]  # Podman too (bug 1)

    # 7. delete-port: the new host port closes, the others stay.
    run(provider, services.delete_port(alice, instance.pk, mapping.pk))
    assert refused(mapping.host_port_start) and http_get(ssh.host_port_start)
    assert daemon.status(guest) == "running"

    # 8. reset: a reinstall (Docker: a fresh /data), same ports, a new password.
    task = run(provider, services.request_operation(alice, instance.pk, "reset"))
    assert daemon.status(guest) == "running" and http_get(ssh.host_port_start)
    assert daemon.run(guest, "cat /data/marker 2>/dev/null") == ""
    assert password_matches(daemon.shadow_hash(guest), services.read_password_once(alice, task.pk))
    if docker:
        assert daemon.data_volumes(guest) == [f"{guest}-data-1"]

    # 9. delete: nothing left on the daemon.
    run(provider, services.request_operation(alice, instance.pk, "delete"))
    assert daemon.status(guest) is None and daemon.leftovers(guest) == []
    assert refused(ssh.host_port_start)
    if docker:  # no committed state image left, tagged or dangling
        assert {i["Id"] for i in daemon.api.images()} == images_before
    instance.refresh_from_db()
    assert instance.status == "deleted"
