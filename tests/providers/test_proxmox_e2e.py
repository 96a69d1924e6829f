"""End to end: a create task through the worker against the fake PVE API (TLS, token)
and a real SSH server standing in for the node (pct exec, iptables).

services.create_instance on a Provider row of type proxmox, then
tasks.engine.worker.run_admitted_inline: the task completes, the container runs with its
limits, its root password went through `pct exec ... chpasswd` on stdin, every
mapping of its port block is a tagged DNAT rule on the node, and the instance
row records the guest's address and the active mappings.
"""

from __future__ import annotations

import io

import paramiko
import pytest
import trustme
from django.core.management import CommandError, call_command

from providers.base import PortSpec
from tasks import services
from tasks.engine.worker import run_admitted_inline
from tasks.models import PortMapping, Provider
from tests.providers.fakes_hostshell import FakeHostShell, FakeSSHServer
from tests.providers.fakes_pve import FakePVE, ServerThread, pve_tls_context
from tests.providers.test_proxmox import IMAGES

pytestmark = pytest.mark.django_db


@pytest.fixture
def node():
    """The fake PVE API and the node's SSH server."""
    ca = trustme.CA()
    pve = FakePVE()
    ctx, _ = pve_tls_context(ca)
    api = ServerThread(pve, "127.0.0.1", 0, ssl_context=ctx)
    host_key, client_key = paramiko.ECDSAKey.generate(), paramiko.ECDSAKey.generate()
    host = FakeHostShell()
    ssh = FakeSSHServer(host, host_key, client_key)
    pem = io.StringIO()
    client_key.write_private_key(pem)
    provider = Provider(name="pve-e2e", provider_type="proxmox", default_port_block=3)
    provider.connection = {
        "host": "127.0.0.1",
        "port": api.port,
        "node": "pve1",
        "verify": ca.cert_pem.bytes().decode(),
        "poll_interval": 0.02,
        "images": IMAGES,
        "ssh": {"host": "127.0.0.1", "port": ssh.port, "user": "root", "host_key": ssh.host_key_line},
    }
    provider.set_secrets({"token": pve.token, "ssh_private_key": pem.getvalue()})  # stored encrypted
    provider.save()
    yield provider, pve, host
    pve.release()
    api.stop()
    ssh.stop()


def test_create_task_ends_with_a_running_container_its_address_password_and_ports(alice, node):
    provider, pve, host = node
    instance, task = services.create_instance(
        alice, provider=provider, image="debian/12", cpu=2, memory_mb=1024, disk_mb=10240
    )
    assert run_admitted_inline(provider.pk) == 1
    task.refresh_from_db()
    instance.refresh_from_db()
    assert (task.status, task.progress, task.error_message) == ("completed", 100, "")

    vmid = instance.provider_ref["vmid"]
    guest = pve.guests[vmid]
    assert instance.provider_ref == {"node": "pve1", "type": "lxc", "vmid": vmid, "name": instance.guest_name}
    assert guest.status == "running" and guest.config["hostname"] == instance.guest_name
    assert (guest.config["cores"], guest.config["memory"], guest.config["rootfs"]) == ("2", "1024", "local-lvm:10")
    assert host.passwords[str(vmid)]  # set on the node through chpasswd's stdin
    assert instance.status == "running" and instance.addresses == [guest.ip]

    mappings = list(instance.port_mappings.order_by("host_port_start"))
    assert mappings and all(m.status == PortMapping.STATUS_ACTIVE for m in mappings)
    ssh = mappings[0]
    assert ssh.guest_port_start == 22 and instance.ssh_port == ssh.host_port_start
    expected = {
        PortSpec(proto, m.host_port_start, m.host_port_end, m.guest_port_start, m.guest_port_end).handle
        for m in mappings
        for proto in m.protocols
    }
    tags = {line.split("--comment ")[1].split()[0] for line in host.rule_lines("nat", "PREROUTING")}
    assert tags == expected
    assert f"--dport {ssh.host_port_start} " in host.rule_lines("nat", "PREROUTING")[0]
    assert host.rule_lines("nat", "PREROUTING")[0].endswith(f"--to-destination {guest.ip}:22")


def test_the_vmid_is_reserved_and_stored_before_the_create_call(alice, node):
    """A create whose first POST fails (the host may or may not have acted) converges on one guest."""
    provider, pve, host = node
    pve.fail_next(1, 503, "proxy timeout", method="POST", path=r"^nodes/pve1/lxc$")
    instance, task = services.create_instance(alice, provider=provider, image="debian/12")
    run_admitted_inline(provider.pk)
    task.refresh_from_db()
    instance.refresh_from_db()
    assert task.status == "completed", task.error_message
    reserved = pve.calls_to("GET", "cluster/nextid")
    created = pve.calls_to("POST", r"^nodes/pve1/lxc$")
    assert len(created) == 2, "the failed create was retried"
    assert {str(c["vmid"]) for c in created} == {str(instance.provider_ref["vmid"])}, "both used the stored VMID"
    assert len([c for c in reserved if "vmid" not in c]) == 1, "one VMID allocated; later calls only re-check it"
    ours = [g for g in pve.guests.values() if not g.template and g.config.get("hostname") == instance.guest_name]
    assert len(ours) == 1


def test_check_provider_reports_version_and_capabilities(node):
    provider, _, _ = node
    out = io.StringIO()
    call_command("check_provider", str(provider.pk), stdout=out)
    text = out.getvalue()
    assert "server version:      8.2.4" in text
    assert "instance types:      container, vm" in text and "remote cancel:       yes" in text


def test_check_provider_names_a_wrong_token(node):
    provider, _, _ = node
    provider.set_secrets({"token": "root@pam!panel=wrong"})
    provider.save()
    with pytest.raises(CommandError, match="authentication refused"):
        call_command("check_provider", str(provider.pk), stdout=io.StringIO())


def test_the_nodes_ssh_connection_is_closed_with_the_driver(node):
    import gc

    from providers.base import build_driver
    from tasks.engine.worker import provider_config

    provider, pve, host = node
    driver = build_driver(provider_config(provider))
    shell = driver.host_channel()
    assert shell.run(["iptables", "-t", "nat", "-S", "PREROUTING"])[0] == 0
    assert shell._client is not None
    del driver
    gc.collect()
    assert shell._client is None  # a worker runs many tasks: no connection may pile up
