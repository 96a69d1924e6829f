"""End to end: a create task through the worker against the fake Docker Engine (unix socket).

services.create_instance on a Provider row of type docker, then
tasks.engine.worker.run_admitted_inline: the task completes, the container runs with its
limits and its data volume, its port block published when it was created (no
stop, commit or swap), the root password set through exec stdin, and the
instance row records the container's address and the active mappings.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile

import pytest
from django.core.management import CommandError, call_command

from tasks import services
from tasks.engine.worker import run_admitted_inline
from tasks.models import PortMapping, Provider
from tests.providers.fakes_docker import FakeDocker
from tests.providers.fakes_pve import ServerThread

pytestmark = pytest.mark.django_db


@pytest.fixture
def daemon():
    fake = FakeDocker()
    folder = tempfile.mkdtemp(prefix="dk", dir="/tmp")
    path = os.path.join(folder, "docker.sock")
    server = ServerThread(fake, f"unix://{path}")
    provider = Provider.objects.create(
        name="docker-e2e",
        provider_type="docker",
        default_port_block=3,
        connection={"base_url": f"unix://{path}", "images": {"debian/12": "debian:12"}, "poll_interval": 0.02},
    )
    yield provider, fake
    fake.release()
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


def test_create_task_ends_with_a_running_container_its_address_password_and_ports(alice, daemon):
    provider, fake = daemon
    instance, task = services.create_instance(alice, provider=provider, image="debian/12", cpu=2, memory_mb=1024)
    assert run_admitted_inline(provider.pk) == 1
    task.refresh_from_db()
    instance.refresh_from_db()
    assert (task.status, task.progress, task.error_message) == ("completed", 100, "")

    container = fake.by_name(instance.guest_name)
    assert container.status == "running"
    assert (container.host_config["NanoCpus"], container.host_config["Memory"]) == (2 * 10**9, 1024 * 2**20)
    assert container.fs.get("password:root")  # set through exec stdin
    # The ports were published at creation: one container, never stopped, committed or swapped.
    assert len(fake.calls_to("POST", r"^/containers/create$")) == 1
    assert not fake.calls_to("POST", r"/commit$") and not fake.calls_to("POST", r"/rename$")
    assert not fake.calls_to("POST", r"/stop$")
    assert [c.name for c in fake.containers.values()] == [instance.guest_name]  # no swap leftovers
    assert instance.status == "running" and instance.addresses == [container.ip]
    assert instance.provider_ref["name"] == instance.guest_name

    mappings = list(instance.port_mappings.order_by("host_port_start"))
    assert mappings and all(m.status == PortMapping.STATUS_ACTIVE for m in mappings)
    ssh = mappings[0]
    assert ssh.guest_port_start == 22 and instance.ssh_port == ssh.host_port_start
    published = {
        (key.partition("/")[2], int(entry["HostPort"]), int(key.partition("/")[0]))
        for key, entries in container.host_config["PortBindings"].items()
        for entry in entries
    }
    expected = {
        (proto, m.host_port_start + i, m.guest_port_start + i)
        for m in mappings
        for proto in m.protocols
        for i in range(m.host_port_end - m.host_port_start + 1)
    }
    assert published == expected


def test_check_provider_reports_version_and_capabilities(daemon):
    provider, _ = daemon
    out = io.StringIO()
    call_command("check_provider", str(provider.pk), stdout=out)
    assert "server version:      27.3.1" in out.getvalue()
    assert "live port mapping:   no" in out.getvalue()


def test_check_provider_names_an_unreachable_daemon(daemon):
    provider, _ = daemon
    provider.connection = {"base_url": "unix:///tmp/no-such-dir/docker.sock"}
    provider.save()
    with pytest.raises(CommandError, match="unreachable"):
        call_command("check_provider", str(provider.pk), stdout=io.StringIO())
