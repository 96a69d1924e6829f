"""create-port / delete-port: TCP, UDP or both, single ports and ranges, never overlapping."""

from __future__ import annotations

import os
import tempfile
import threading

import pytest
from django.db import connection, transaction
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from providers.simulated import SimulatedStore
from tasks import services
from tasks.errors import InstanceBusy, InvalidInput, InvalidState, PortConflict, QuotaExceeded
from tasks.models import PortMapping, Task
from tests.operations.conftest import fresh, inject, run, store, usage


def _host_ports(provider, instance):
    return sorted((p["protocol"], p["host_start"], p["host_end"]) for p in store(provider).ports(instance.guest_name))


@pytest.mark.parametrize(
    ("protocol", "count", "expected"),
    [("tcp", 1, ["tcp"]), ("udp", 1, ["udp"]), ("both", 1, ["tcp", "udp"]), ("both", 10, ["tcp", "udp"])],
)
def test_create_port_maps_each_protocol_and_activates(alice, provider, live_instance, protocol, count, expected):
    before = _host_ports(provider, live_instance)
    task, mapping = services.create_port(alice, live_instance.pk, protocol=protocol, guest_port=8080, count=count)
    assert mapping.status == "pending"
    run(provider)
    task, mapping = fresh(task), fresh(mapping)
    assert task.status == "completed" and mapping.status == "active"
    assert mapping.host_port_end - mapping.host_port_start == count - 1
    added = sorted(set(_host_ports(provider, live_instance)) - set(before))
    assert added == [(proto, mapping.host_port_start, mapping.host_port_end) for proto in expected]
    assert fresh(live_instance).status == "running"


def test_requested_host_port_that_overlaps_a_live_one_is_refused(alice, provider, live_instance):
    _, first = services.create_port(alice, live_instance.pk, protocol="tcp", guest_port=80, host_port=25000, count=5)
    with pytest.raises(InstanceBusy):
        services.create_port(alice, live_instance.pk, protocol="tcp", guest_port=80, host_port=25004)
    run(provider)
    with pytest.raises(PortConflict) as err:  # a pending or active range blocks any overlap
        services.create_port(alice, live_instance.pk, protocol="both", guest_port=443, host_port=25004)
    assert err.value.extra["conflicting_port"] == first.pk
    # The same host port for the other protocol is free.
    _, udp = services.create_port(alice, live_instance.pk, protocol="udp", guest_port=53, host_port=25004)
    run(provider)
    assert fresh(udp).status == "active"


def test_failure_marks_the_mapping_failed_and_frees_its_ports(alice, provider, live_instance):
    inject(provider, fail_ops={"add_port": "permanent"})
    task, mapping = services.create_port(alice, live_instance.pk, protocol="tcp", guest_port=80, host_port=25000)
    run(provider)
    assert fresh(task).status == "failed" and fresh(mapping).status == "failed"
    assert fresh(live_instance).status == "running"
    inject(provider, fail_ops={})
    _, again = services.create_port(alice, live_instance.pk, protocol="tcp", guest_port=80, host_port=25000)
    run(provider)
    assert fresh(again).status == "active"


def test_failure_on_the_second_protocol_unmaps_the_first(alice, provider, live_instance, interrupt):
    interrupt("add_port", "fail", at=2)  # tcp mapped, udp fails
    before = _host_ports(provider, live_instance)
    task, mapping = services.create_port(alice, live_instance.pk, protocol="both", guest_port=80, host_port=25000)
    run(provider)
    assert fresh(task).status == "failed" and fresh(mapping).status == "failed"
    assert _host_ports(provider, live_instance) == before


@pytest.mark.parametrize("how", ["cancel", "timeout"])
def test_cancel_or_timeout_leaves_nothing_mapped(alice, provider, live_instance, interrupt, how):
    interrupt("add_port", how)
    before = _host_ports(provider, live_instance)
    task, mapping = services.create_port(alice, live_instance.pk, protocol="both", guest_port=80)
    run(provider)
    assert fresh(task).status == {"cancel": "cancelled", "timeout": "timeout"}[how]
    assert fresh(mapping).status == "failed" and _host_ports(provider, live_instance) == before
    assert fresh(live_instance).status == "running" and usage(live_instance) == (1, 2, 2, 1)


def test_real_deadline_on_create_port(alice, provider, live_instance):
    inject(provider, hang_ops=["add_port"])
    task, mapping = services.create_port(alice, live_instance.pk, protocol="tcp", guest_port=80, timeout_seconds=1)
    run(provider)
    assert fresh(task).status == "timeout" and fresh(mapping).status == "failed"


def test_host_side_conflict_fails_the_mapping(alice, provider, live_instance):
    # Something outside the panel already listens on 25000/tcp on the host.
    from providers.base import CancelToken, PortSpec, no_progress
    from providers.simulated import SimulatedDriver
    from tasks.engine.worker import provider_config

    host = store(provider)
    host.put_guest("intruder")
    SimulatedDriver(provider_config(provider)).add_port(
        {"name": "intruder"}, PortSpec("tcp", 25000, 25000, 22, 22), CancelToken(), no_progress
    )
    task, mapping = services.create_port(alice, live_instance.pk, protocol="tcp", guest_port=80, host_port=25000)
    run(provider)
    task = fresh(task)
    assert task.status == "failed" and "already bound by intruder" in task.error_message
    assert fresh(mapping).status == "failed"


def test_delete_port_unmaps_and_frees(alice, provider, live_instance):
    ssh = PortMapping.objects.get(instance=live_instance, is_ssh=True)
    task = services.delete_port(alice, live_instance.pk, ssh.pk)
    run(provider)
    assert fresh(task).status == "completed" and fresh(ssh).status == "deleted"
    assert fresh(live_instance).ssh_port is None
    assert ("tcp", ssh.host_port_start, ssh.host_port_end) not in _host_ports(provider, live_instance)


@pytest.mark.parametrize("how", ["fail", "cancel", "timeout"])
def test_delete_port_that_does_not_finish_stays_active(alice, provider, live_instance, interrupt, how):
    mapping = PortMapping.objects.filter(instance=live_instance, protocol="both").get()
    interrupt("remove_port", how)
    task = services.delete_port(alice, live_instance.pk, mapping.pk)
    run(provider)
    assert fresh(task).status == {"fail": "failed", "cancel": "cancelled", "timeout": "timeout"}[how]
    assert fresh(mapping).status == "active" and usage(live_instance) == (1, 2, 2, 1)
    assert ("udp", mapping.host_port_start, mapping.host_port_end) in _host_ports(provider, live_instance)
    # Its ports stay taken.
    with pytest.raises(PortConflict):
        services.create_port(alice, live_instance.pk, protocol="udp", guest_port=1, host_port=mapping.host_port_end)


def test_delete_port_real_deadline(alice, provider, live_instance):
    mapping = PortMapping.objects.filter(instance=live_instance, protocol="both").get()
    inject(provider, hang_ops=["remove_port"])
    task = services.delete_port(alice, live_instance.pk, mapping.pk, timeout_seconds=1)
    run(provider)
    assert fresh(task).status == "timeout" and fresh(mapping).status == "active"


def test_ports_of_a_stopped_instance_can_change(alice, provider, stopped_instance):
    task, mapping = services.create_port(alice, stopped_instance.pk, protocol="tcp", guest_port=80)
    run(provider)
    assert fresh(mapping).status == "active" and fresh(stopped_instance).status == "stopped"


def test_no_ports_on_a_failed_instance(alice, provider):
    inject(provider, fail_ops={"create": "permanent"})
    instance, _ = services.create_instance(alice, provider=provider, image="debian/12")
    run(provider)
    with pytest.raises(InvalidState):
        services.create_port(alice, instance.pk, protocol="tcp", guest_port=80)


# ------------------------------------------------------------------ property test


def _live_overlaps(provider_id: int) -> list:
    spans: dict[str, list] = {"tcp": [], "udp": []}
    for m in PortMapping.objects.filter(provider_id=provider_id, status__in=PortMapping.LIVE_STATUSES):
        for proto in m.protocols:
            spans[proto].append((m.host_port_start, m.host_port_end, m.pk))
    bad = []
    for proto, items in spans.items():
        items.sort()
        for (_, end_a, a), (start_b, _, b) in zip(items, items[1:], strict=False):
            if start_b <= end_a:
                bad.append((proto, a, b))
    return bad


ACTIONS = st.one_of(
    st.tuples(
        st.just("add"),
        st.integers(0, 3),
        st.sampled_from(["tcp", "udp", "both"]),
        st.one_of(st.none(), st.integers(20000, 20040)),
        st.integers(1, 6),
    ),
    st.tuples(st.just("cancel"), st.integers(0, 3)),
    st.tuples(st.just("delete"), st.integers(0, 3), st.integers(0, 5)),
    st.tuples(st.just("run")),
)


@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(actions=st.lists(ACTIONS, min_size=1, max_size=25))
def test_no_two_live_mappings_of_a_provider_overlap(alice, provider, make_instance, tmp_path, actions):
    """Whatever mix of requests, cancels, runs and deletes: live host ports never overlap per protocol."""
    # A fresh simulated host per example (the database part is rolled back below).
    os.environ["SIMULATED_STATE_DIR"] = tempfile.mkdtemp(dir=tmp_path)
    with transaction.atomic():
        provider.port_range_start, provider.port_range_end = 20000, 20040
        provider.save()
        instances = [make_instance(alice, provider, name=f"p{i}") for i in range(4)]
        for action in actions:
            kind, idx = action[0], action[1] if len(action) > 1 else 0
            instance = fresh(instances[idx])
            try:
                if kind == "add":
                    _, protocol, host_port, count = action[1:]
                    services.create_port(
                        alice, instance.pk, protocol=protocol, guest_port=100, host_port=host_port, count=count
                    )
                elif kind == "cancel" and instance.active_task_id:
                    services.cancel_task(alice, instance.active_task_id)
                elif kind == "delete":
                    live = list(PortMapping.objects.filter(instance=instance, status="active").order_by("pk"))
                    if live:
                        services.delete_port(alice, instance.pk, live[action[2] % len(live)].pk)
                elif kind == "run":
                    run(provider)
            except (PortConflict, InstanceBusy, InvalidInput, QuotaExceeded):
                pass
            assert _live_overlaps(provider.pk) == []
        run(provider)
        assert _live_overlaps(provider.pk) == []
        assert not Task.objects.filter(status__in=["pending", "running", "cancelling"]).exists()
        transaction.set_rollback(True)


# ------------------------------------------------------------------ real concurrency


@pytest.mark.mariadb
@pytest.mark.django_db(transaction=True)
def test_concurrent_requests_for_the_same_port_exactly_one_wins(alice, provider, make_instance):
    instances = [make_instance(alice, provider, name=f"c{i}") for i in range(6)]
    barrier = threading.Barrier(len(instances))
    results: list = [None] * len(instances)

    def request(i: int) -> None:
        try:
            barrier.wait()
            # Different protocols/ranges that all include 24000/tcp.
            protocol, host_port, count = [("tcp", 24000, 1), ("both", 23998, 3), ("tcp", 23990, 20)][i % 3]
            services.create_port(
                alice, instances[i].pk, protocol=protocol, guest_port=100, host_port=host_port, count=count
            )
            results[i] = "won"
        except PortConflict:
            results[i] = "conflict"
        except Exception as exc:  # pragma: no cover - reported by the assertion below
            results[i] = repr(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=request, args=(i,)) for i in range(len(instances))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["conflict"] * 5 + ["won"], results
    assert PortMapping.objects.filter(host_port_start__lte=24000, host_port_end__gte=24000).count() == 1
    assert SimulatedStore.for_provider(provider.pk).ports() == []  # nothing ran yet
