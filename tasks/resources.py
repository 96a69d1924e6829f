"""Quota and provider capacity: reserved with a create task, released exactly once.

Callers hold the locks (quota -> provider -> instance) inside their transaction.
``Instance.holds_resources`` records whether an instance's share is counted, so
a release can never happen twice and check_accounting can recompute the sums.
"""

from __future__ import annotations

from django.conf import settings
from django.db.models import F, Sum
from django.utils.translation import gettext as _

from tasks.errors import CapacityExceeded, QuotaExceeded
from tasks.models import Instance, InstanceType, PortMapping, Provider, UserQuota


def ensure_quota(user) -> UserQuota:
    """The user's quota row (a user object or id), created with the defaults on first use."""
    quota, _ = UserQuota.objects.get_or_create(
        user_id=getattr(user, "pk", user),
        defaults={
            "max_instances": settings.DEFAULT_QUOTA_INSTANCES,
            "max_cpu": settings.DEFAULT_QUOTA_CPU,
            "max_memory_mb": settings.DEFAULT_QUOTA_MEMORY_MB,
            "max_disk_mb": settings.DEFAULT_QUOTA_DISK_MB,
            "max_ports": settings.DEFAULT_QUOTA_PORTS,
        },
    )
    return quota


# What a quota or capacity message calls each resource (translated when raised).
RESOURCE_NAMES = {
    "instances": lambda: _("instances"),
    "cpu": lambda: _("CPU"),
    "memory_mb": lambda: _("MB of memory"),
    "disk_mb": lambda: _("MB of disk"),
    "vms": lambda: _("virtual machines"),
    "containers": lambda: _("containers"),
    "ports": lambda: _("host ports"),
}


def ports_used(owner_id: int) -> int:
    """Host ports the user's live mappings hold, port by port (a range of 10 is 10; a
    ``both`` mapping is one port number, taken on tcp and udp)."""
    total = PortMapping.objects.filter(instance__owner_id=owner_id, status__in=PortMapping.LIVE_STATUSES).aggregate(
        n=Sum(F("host_port_end") - F("host_port_start") + 1)
    )["n"]
    return int(total or 0)


def check_ports(quota: UserQuota, count: int) -> None:
    """409 quota_exceeded (resource ``ports``) unless ``count`` more host ports fit the quota.

    The caller holds the quota row lock, so two requests cannot both take the last ports.
    """
    if count <= 0:
        return
    wanted = ports_used(quota.user_id) + count
    if wanted > quota.max_ports:
        raise QuotaExceeded(
            _("your quota allows %(limit)s %(resource)s; this would use %(wanted)s")
            % {"limit": quota.max_ports, "resource": RESOURCE_NAMES["ports"](), "wanted": wanted},
            resource="ports",
            limit=quota.max_ports,
            requested=wanted,
        )


def check_and_reserve(
    quota: UserQuota, provider: Provider, *, instance_type: str, cpu: int, memory_mb: int, disk_mb: int
) -> None:
    """Raise QuotaExceeded / CapacityExceeded, else count the new instance in both."""
    checks = [
        ("instances", quota.used_instances + 1, quota.max_instances),
        ("cpu", quota.used_cpu + cpu, quota.max_cpu),
        ("memory_mb", quota.used_memory_mb + memory_mb, quota.max_memory_mb),
        ("disk_mb", quota.used_disk_mb + disk_mb, quota.max_disk_mb),
    ]
    for name, wanted, limit in checks:
        if wanted > limit:
            raise QuotaExceeded(
                _("your quota allows %(limit)s %(resource)s; this would use %(wanted)s")
                % {"limit": limit, "resource": RESOURCE_NAMES[name](), "wanted": wanted},
                field=name if name != "instances" else None,
                resource=name,
                limit=limit,
                requested=wanted,
            )
    is_vm = instance_type == InstanceType.VM
    cap = [
        ("cpu", provider.cpu_used + cpu, provider.cpu_total),
        ("memory_mb", provider.memory_used_mb + memory_mb, provider.memory_total_mb),
        ("disk_mb", provider.disk_used_mb + disk_mb, provider.disk_total_mb),
        (
            "vms" if is_vm else "containers",
            (provider.vms_used if is_vm else provider.containers_used) + 1,
            provider.max_vms if is_vm else provider.max_containers,
        ),
    ]
    for name, wanted, limit in cap:
        if wanted > limit:
            raise CapacityExceeded(
                _("provider %(name)s has no room: %(resource)s would be %(wanted)s of %(limit)s")
                % {"name": provider.name, "resource": RESOURCE_NAMES[name](), "wanted": wanted, "limit": limit},
                resource=name,
                limit=limit,
                requested=wanted,
            )
    UserQuota.objects.filter(pk=quota.pk).update(
        used_instances=F("used_instances") + 1,
        used_cpu=F("used_cpu") + cpu,
        used_memory_mb=F("used_memory_mb") + memory_mb,
        used_disk_mb=F("used_disk_mb") + disk_mb,
    )
    count_field = "vms_used" if is_vm else "containers_used"
    Provider.objects.filter(pk=provider.pk).update(
        cpu_used=F("cpu_used") + cpu,
        memory_used_mb=F("memory_used_mb") + memory_mb,
        disk_used_mb=F("disk_used_mb") + disk_mb,
        **{count_field: F(count_field) + 1},
    )


def release(instance: Instance) -> bool:
    """Give back the instance's quota, capacity and ports (once). The caller saves the instance."""
    PortMapping.objects.filter(instance=instance, status__in=PortMapping.LIVE_STATUSES).update(
        status=PortMapping.STATUS_DELETED
    )
    if not instance.holds_resources:
        return False
    count_field = "vms_used" if instance.instance_type == InstanceType.VM else "containers_used"
    UserQuota.objects.filter(user_id=instance.owner_id).update(
        used_instances=F("used_instances") - 1,
        used_cpu=F("used_cpu") - instance.cpu,
        used_memory_mb=F("used_memory_mb") - instance.memory_mb,
        used_disk_mb=F("used_disk_mb") - instance.disk_mb,
    )
    Provider.objects.filter(pk=instance.provider_id).update(
        cpu_used=F("cpu_used") - instance.cpu,
        memory_used_mb=F("memory_used_mb") - instance.memory_mb,
        disk_used_mb=F("disk_used_mb") - instance.disk_mb,
        **{count_field: F(count_field) - 1},
    )
    instance.holds_resources = False
    return True
