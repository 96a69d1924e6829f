"""A host port that something outside the panel holds ("address already in use").

The panel cannot see the host's own listeners or the host's outgoing connections, so
the first it learns of such a port is the daemon refusing to bind it. A create then
moves the instance to another block and goes on; the port is remembered, so the
next automatic allocation skips it; a create-port on it fails with a clear message.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from providers.base import CANCEL_USER, ConflictError, HostPortBusy, PermanentError, host_port_busy
from providers.docker.engine import classify as docker_classify
from providers.lxd.errors import classify_http, classify_op_failure
from providers.simulated.options import validate_connection
from tasks import ports, services
from tasks.models import BusyHostPort, PortMapping
from tasks.operations.create import CreateOperation
from tests.operations.conftest import fresh, inject, run, store, usage


def _live_ranges(instance) -> list[tuple[int, int]]:
    return sorted(
        PortMapping.objects.filter(instance=instance, status__in=PortMapping.LIVE_STATUSES).values_list(
            "host_port_start", "host_port_end"
        )
    )


def _steps(task) -> list[str]:
    return list(task.events.filter(kind="step").order_by("pk").values_list("message", flat=True))


def test_create_moves_to_another_block_when_a_host_port_is_busy(alice, provider):
    inject(provider, host_ports_in_use=[20002])  # inside the first block, 20000-20004
    instance, task = services.create_instance(alice, provider=provider, image="debian/12", cpu=2)
    run(provider)
    task, instance = fresh(task), fresh(instance)
    assert task.status == "completed", task.error_message
    # The first free run of five that avoids 20002: 20003-20007.
    assert instance.status == "running" and instance.ssh_port == 20003
    assert _live_ranges(instance) == [(20003, 20003), (20004, 20007)]
    assert PortMapping.objects.filter(instance=instance, status="failed").count() == 2
    # One guest on the host, with the new block only; the first one was removed again.
    host = store(provider)
    assert {(p["protocol"], p["host_start"]) for p in host.ports(instance.guest_name)} == {
        ("tcp", 20003),
        ("tcp", 20004),
        ("udp", 20004),
    }
    assert [c["applied"] for c in host.executions("create", instance.guest_name)] == [1, 1]
    assert host.applied("delete", instance.guest_name) == 1
    assert "host port 20002 is in use on the host; trying the block from port 20003" in _steps(task)
    assert usage(instance) == (1, 2, 2, 1)  # charged once
    busy = BusyHostPort.objects.get(provider=provider)
    assert busy.port == 20002 and "address already in use" in busy.message
    assert busy.expires_at > timezone.now() + timedelta(minutes=59)


def test_the_next_create_skips_a_port_found_busy(alice, provider):
    inject(provider, host_ports_in_use=[20002])
    services.create_instance(alice, provider=provider, image="debian/12", name="first")
    run(provider)
    second, task = services.create_instance(alice, provider=provider, image="debian/12", name="second")
    # Reserved at once past the busy port and the first instance's block (20003-20007).
    assert fresh(second).ssh_port == 20008
    run(provider)
    assert fresh(task).status == "completed"
    assert store(provider).applied("create", second.guest_name) == 1  # no second try needed
    assert not any("in use on the host" in m for m in _steps(task))


def test_a_busy_port_is_tried_again_once_its_time_is_over(alice, provider):
    BusyHostPort.objects.create(
        provider=provider, port=20000, expires_at=timezone.now() - timedelta(seconds=1), message="old"
    )
    BusyHostPort.objects.create(provider=provider, port=20005, expires_at=timezone.now() + timedelta(hours=1))
    instance, _ = services.create_instance(alice, provider=provider, image="debian/12")
    assert instance.ssh_port == 20000  # 20000 expired; 20005 is not needed
    assert ports.find_free(provider, "tcp", 6) == 20006  # a run of six would cross 20005


def test_without_a_memory_the_create_still_moves(alice, provider, settings):
    settings.HOST_PORT_BUSY_SECONDS = 0
    inject(provider, host_ports_in_use=[20000])
    instance, task = services.create_instance(alice, provider=provider, image="debian/12")
    run(provider)
    assert fresh(task).status == "completed" and fresh(instance).ssh_port == 20001
    assert not BusyHostPort.objects.exists()


def test_create_gives_up_after_its_attempts_and_releases_everything(alice, provider, settings):
    settings.TASK_CREATE_PORT_ATTEMPTS = 3
    # Each try's block is the first free run that avoids the ports found busy so far:
    # 20000-20004 (20001 busy), 20002-20006 (20005), 20006-20010 (20008).
    inject(provider, host_ports_in_use=[20001, 20005, 20008])
    instance, task = services.create_instance(alice, provider=provider, image="debian/12", cpu=2)
    run(provider)
    task, instance = fresh(task), fresh(instance)
    assert task.status == "failed"
    assert "address already in use" in task.error_message
    assert "host port 20008 is in use on the host, outside the panel; tried 3 port block(s)" in task.error_message
    assert instance.status == "failed" and not instance.holds_resources
    assert usage(instance) == (0, 0, 0, 0)
    assert _live_ranges(instance) == []
    assert store(provider).guest(instance.guest_name) is None and store(provider).ports() == []
    assert sorted(BusyHostPort.objects.values_list("port", flat=True)) == [20001, 20005, 20008]


def test_no_block_to_move_to_fails_the_create_cleanly(alice, provider):
    inject(provider, host_ports_in_use=[20000])
    instance, task = services.create_instance(alice, provider=provider, image="debian/12", cpu=2)
    provider.port_range_end = 20004  # meanwhile the operator narrowed the range to this one block
    provider.save(update_fields=["port_range_end"])
    run(provider)
    task, instance = fresh(task), fresh(instance)
    assert task.status == "failed"
    assert "host port 20000 is in use on the host, outside the panel; tried 1 port block(s)" in task.error_message
    assert instance.status == "failed" and usage(instance) == (0, 0, 0, 0) and _live_ranges(instance) == []
    assert store(provider).guest(instance.guest_name) is None


def test_a_busy_port_outside_the_instance_block_is_not_blamed(alice, provider):
    """An error that names no port of the instance's block is an ordinary failure."""
    inject(provider, fail_ops={"add_port": "permanent"})
    instance, task = services.create_instance(alice, provider=provider, image="debian/12")
    run(provider)
    assert fresh(task).status == "failed"
    assert not BusyHostPort.objects.exists()
    assert PortMapping.objects.filter(instance=instance, status="failed").count() == 0


def test_cancel_during_the_move_ends_with_the_guest_known_gone(alice, provider, monkeypatch):
    inject(provider, host_ports_in_use=[20000])
    move = CreateOperation._move_ports

    def move_then_cancel(self, ctx, busy):
        start = move(self, ctx, busy)
        services.cancel_task(alice, ctx.task.pk)
        ctx.cancel.cancel(CANCEL_USER)  # (what the heartbeat does when it sees the request)
        return start

    monkeypatch.setattr(CreateOperation, "_move_ports", move_then_cancel)
    instance, task = services.create_instance(alice, provider=provider, image="debian/12", cpu=2)
    run(provider)
    task, instance = fresh(task), fresh(instance)
    assert task.status == "cancelled"
    # The first guest was verified gone before the move: nothing is held, nothing left.
    assert instance.status == "failed" and not instance.holds_resources and not instance.needs_reconcile
    assert usage(instance) == (0, 0, 0, 0)
    assert store(provider).guest(instance.guest_name) is None
    assert _live_ranges(instance) == []


def test_create_port_on_a_busy_port_fails_and_the_next_automatic_one_avoids_it(alice, provider, live_instance):
    inject(provider, host_ports_in_use=[20100])
    task, mapping = services.create_port(alice, live_instance.pk, protocol="tcp", guest_port=80, host_port=20100)
    run(provider)
    task, mapping = fresh(task), fresh(mapping)
    assert task.status == "failed" and mapping.status == "failed"
    assert "host port 20100 is in use on the host, outside the panel; choose another one" in task.error_message
    assert BusyHostPort.objects.filter(provider=provider, port=20100).exists()
    assert fresh(live_instance).status == "running"
    # Asked by number, the port is still tried (the operator may have freed it) ...
    inject(provider, host_ports_in_use=[])
    again, mapping = services.create_port(alice, live_instance.pk, protocol="tcp", guest_port=80, host_port=20100)
    run(provider)
    assert fresh(again).status == "completed"
    # ... while automatic allocation skips it until its time is over.
    BusyHostPort.objects.create(provider=provider, port=20005, expires_at=timezone.now() + timedelta(hours=1))
    _, auto = services.create_port(alice, live_instance.pk, protocol="tcp", guest_port=81)
    assert auto.host_port_start == 20006


# ------------------------------------------------------------ what the daemons say

DOCKER_BIND = (
    "driver failed programming external connectivity on endpoint cloudhost-7 (3f2a): "
    "Bind for 0.0.0.0:21000 failed: port is already allocated"
)
PODMAN_BIND = "rootlessport listen tcp 0.0.0.0:21003: bind: address already in use"
LXD_BIND = (
    'Failed to start device "pm-tcp-21001": Error occurred when starting proxy device: '
    "Error: Failed to listen on 0.0.0.0:21001: listen tcp 0.0.0.0:21001: bind: address already in use"
)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (DOCKER_BIND, (21000,)),
        (PODMAN_BIND, (21003,)),
        (LXD_BIND, (21001,)),
        ("listen tcp6 [::]:21004: bind: address already in use", (21004,)),
        ("bind: address already in use", ()),  # busy, but which port is not said
    ],
)
def test_bind_failures_name_their_ports(message, expected):
    error = host_port_busy(f"start: {message}", message, op="start")
    assert isinstance(error, HostPortBusy) and isinstance(error, ConflictError)
    assert error.ports == expected and error.op == "start"


def test_other_conflicts_are_not_busy_ports():
    assert host_port_busy("x", 'Conflict. The container name "/web" is already in use') is None


def test_docker_and_lxd_answers_map_to_busy_ports():
    import docker.errors
    import requests

    response = requests.Response()
    response.status_code = 500
    error = docker.errors.APIError("500 Server Error", response=response, explanation=DOCKER_BIND)
    mapped = docker_classify(error, "start", mutation=True)
    assert isinstance(mapped, HostPortBusy) and mapped.ports == (21000,)
    assert classify_op_failure(LXD_BIND, op="add port").ports == (21001,)
    assert isinstance(classify_http(500, LXD_BIND, op="add port", create=True), HostPortBusy)
    assert type(classify_op_failure("device already exists", op="add port")) is ConflictError


# Incus, depending on timing, loses the listener's own bind error and says only this.
INCUS_LISTENER = (
    'Failed to start device "pm-tcp-21798": Error occurred when starting proxy device: '
    "Error: Failed to receive fd from listener process: "
    "Failed to receive file descriptor via abstract unix socket"
)


def test_a_port_listener_that_never_came_up_is_a_busy_port():
    error = classify_op_failure(INCUS_LISTENER, op="add port")
    assert isinstance(error, HostPortBusy) and error.ports == (21798,)
    ranged = INCUS_LISTENER.replace("pm-tcp-21798", "pm-udp-21800-21802")
    assert classify_http(500, ranged, op="start", create=True).ports == (21800, 21801, 21802)
    # The same failure on a device the panel does not manage names no port it could move.
    other = INCUS_LISTENER.replace("pm-tcp-21798", "web")
    assert type(classify_op_failure(other, op="start")) is PermanentError


def test_simulated_host_ports_in_use_is_validated():
    assert validate_connection({"host_ports_in_use": [20000, 20001]}) == []
    for bad in ("20000", [0], [70000], [True], ["20000"]):
        assert validate_connection({"host_ports_in_use": bad}) == [
            "host_ports_in_use must be a list of port numbers (1-65535)"
        ]
