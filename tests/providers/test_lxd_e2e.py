"""End to end: a create task through the worker against the fake LXD / Incus daemon.

services.create_instance on a Provider row of type lxd/incus pointing at the
fake, then tasks.engine.worker.run_admitted_inline: the task completes, the guest runs
on the daemon with its limits, root password and port block (proxy devices),
and the instance row records its addresses and active port mappings.
"""

from __future__ import annotations

import pytest

from providers.base import PortSpec
from tasks import services
from tasks.engine.worker import run_admitted_inline
from tasks.models import PortMapping, Provider
from tests.providers.fake_lxd import RUNNING

pytestmark = pytest.mark.django_db


@pytest.fixture(params=["unix", "https"])
def lxd_provider(request, lxd_env):
    transport = request.param
    provider = Provider(name=f"{lxd_env.flavour}-e2e", provider_type=lxd_env.flavour, default_port_block=3)
    provider.connection = lxd_env.connection(transport)
    provider.set_secrets(lxd_env.secrets(transport))  # stored encrypted, decrypted by the worker
    provider.save()
    return provider


def test_create_task_ends_with_a_running_guest_its_addresses_and_ports(alice, lxd_env, lxd_provider):
    instance, task = services.create_instance(
        alice, provider=lxd_provider, image="debian/12", cpu=2, memory_mb=1024, disk_mb=10240
    )
    assert run_admitted_inline(lxd_provider.pk) == 1
    task.refresh_from_db()
    instance.refresh_from_db()
    assert (task.status, task.progress, task.error_message) == ("completed", 100, "")

    guest = lxd_env.fake.instances[instance.guest_name]
    assert guest["status"] == RUNNING
    assert guest["config"]["limits.cpu"] == "2" and guest["config"]["limits.memory"] == "1024MiB"
    assert guest["password"]  # set through chpasswd's stdin

    assert instance.status == "running" and instance.provider_ref["name"] == instance.guest_name
    assert instance.addresses == [f"10.0.3.{guest['ip']}", f"fd42::{guest['ip']}"]
    mappings = list(instance.port_mappings.order_by("host_port_start"))
    assert mappings and all(m.status == PortMapping.STATUS_ACTIVE for m in mappings)
    ssh = mappings[0]
    assert ssh.guest_port_start == 22 and instance.ssh_port == ssh.host_port_start
    proxies = {k: v for k, v in guest["devices"].items() if v["type"] == "proxy"}
    # One proxy device per protocol of every mapping, named by its handle.
    expected = {
        PortSpec(proto, m.host_port_start, m.host_port_end, m.guest_port_start, m.guest_port_end).handle
        for m in mappings
        for proto in m.protocols
    }
    assert set(proxies) == expected
    assert proxies[f"pm-tcp-{ssh.host_port_start}"]["connect"] == "tcp:127.0.0.1:22"
