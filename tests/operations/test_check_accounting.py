"""python manage.py check_accounting [--fix]: every difference printed, non-zero exit, fix under locks."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from tasks import services
from tasks.models import Instance, PortMapping, Provider, UserQuota
from tests.operations.conftest import run


def _check(*args) -> tuple[int, str]:
    out = StringIO()
    try:
        call_command("check_accounting", *args, stdout=out)
    except CommandError as exc:
        return exc.returncode, out.getvalue() + str(exc)
    return 0, out.getvalue()


def test_consistent_system_reports_nothing(alice, provider, live_instance):
    services.create_instance(alice, provider=provider, image="debian/12")  # a pending create counts too
    code, out = _check()
    assert code == 0 and "no differences" in out


def test_every_difference_is_printed_and_fixed(alice, provider, live_instance):
    UserQuota.objects.filter(user=alice).update(used_cpu=7)
    Provider.objects.filter(pk=provider.pk).update(memory_used_mb=1, containers_used=4)
    code, out = _check()
    assert code == 1
    assert "quota: user alice: used_cpu is 7, expected 2" in out
    assert f"capacity: provider {provider.name}: memory_used_mb is 1, expected 1024" in out
    assert f"capacity: provider {provider.name}: containers_used is 4, expected 1" in out
    assert "3 difference(s)" in out
    code, out = _check("--fix")
    assert code == 0 and out.count("fixed: ") == 3
    assert _check() == (0, _check()[1])
    quota = UserQuota.objects.get(user=alice)
    assert (quota.used_instances, quota.used_cpu) == (1, 2)


def test_stray_ports_and_flags_on_gone_instances_are_found_and_fixed(alice, provider, live_instance):
    # A deleted instance that still holds its share and a live port: a leak.
    Instance.objects.filter(pk=live_instance.pk).update(status="deleted")
    code, out = _check()
    assert code == 1
    assert "holds_resources is True, expected False" in out and "stray_port" in out
    assert _check("--fix")[0] == 0
    assert not PortMapping.objects.filter(instance=live_instance, status__in=PortMapping.LIVE_STATUSES).exists()
    quota = UserQuota.objects.get(user=alice)
    provider.refresh_from_db()
    assert (quota.used_instances, quota.used_cpu, provider.cpu_used, provider.containers_used) == (0, 0, 0, 0)


def test_overlapping_mappings_are_reported_but_not_touched(alice, provider, live_instance):
    ssh = PortMapping.objects.get(instance=live_instance, is_ssh=True)
    clash = PortMapping.objects.create(
        instance=live_instance,
        provider=provider,
        protocol="both",
        host_port_start=ssh.host_port_start,
        host_port_end=ssh.host_port_start + 1,
        guest_port_start=1,
        guest_port_end=2,
        status="active",
    )
    code, out = _check("--fix")
    assert code == 1 and "port_overlap" in out and "NOT fixable" in out and "remain" in out
    assert PortMapping.objects.get(pk=clash.pk).status == "active"


def test_missing_quota_row_is_reported(alice, provider, live_instance):
    UserQuota.objects.filter(user=alice).delete()
    code, out = _check()
    assert code == 1 and "(no quota row)" in out
    assert _check("--fix")[0] == 0
    assert UserQuota.objects.get(user=alice).used_instances == 1


@pytest.mark.parametrize("extra", [[], ["--fix"]])
def test_runs_clean_after_real_work(alice, bob, provider, extra):
    for owner in (alice, bob, alice):
        services.create_instance(owner, provider=provider, image="debian/12")
    run(provider)
    victim = Instance.objects.filter(owner=alice).first()
    services.request_operation(alice, victim.pk, "delete")
    run(provider)
    assert _check(*extra)[0] == 0
