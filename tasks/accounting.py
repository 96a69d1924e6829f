"""The accounting check: counters against what live instances and pending creates hold.

Invariants (DESIGN.md section 5), each difference reported on its own line:

- every user's quota ``used_*`` equals the sums over their instances with
  ``holds_resources`` (live instances and pending creates);
- every provider's ``*_used`` equals the sums over its instances with
  ``holds_resources``;
- ``holds_resources`` is set exactly on instances that are not gone
  (``deleted``/``failed``);
- no live port mapping (pending, active, deleting) belongs to a gone instance
  or to another provider than its instance's;
- no two live mappings of a provider share a host port for a protocol.

``fix()`` corrects what can be corrected (counters, flags, stray mappings)
while holding every quota and provider row lock, in the system's lock order,
so no create, finish or port reservation interleaves. Overlapping mappings are
reported, never changed: which one is the real one is for an operator to say.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from django.contrib.auth import get_user_model
from django.db import transaction

from tasks.engine.states import INSTANCE_GONE
from tasks.engine.transitions import retry_on_deadlock
from tasks.models import Instance, InstanceType, PortMapping, Provider, UserQuota

QUOTA_FIELDS = ("used_instances", "used_cpu", "used_memory_mb", "used_disk_mb")
CAPACITY_FIELDS = ("cpu_used", "memory_used_mb", "disk_used_mb", "containers_used", "vms_used")


@dataclass
class Difference:
    kind: str  # quota | capacity | holds_resources | stray_port | port_provider | port_overlap
    subject: str
    field: str
    recorded: Any
    expected: Any
    fixable: bool = True
    key: tuple = ()

    def __str__(self) -> str:
        return f"{self.kind}: {self.subject}: {self.field} is {self.recorded}, expected {self.expected}"


def _expected_usage() -> tuple[dict[int, dict[str, int]], dict[int, dict[str, int]]]:
    users: dict[int, dict[str, int]] = defaultdict(lambda: dict.fromkeys(QUOTA_FIELDS, 0))
    providers: dict[int, dict[str, int]] = defaultdict(lambda: dict.fromkeys(CAPACITY_FIELDS, 0))
    rows = Instance.objects.filter(holds_resources=True).values(
        "owner_id", "provider_id", "instance_type", "cpu", "memory_mb", "disk_mb"
    )
    for row in rows:
        u = users[row["owner_id"]]
        u["used_instances"] += 1
        u["used_cpu"] += row["cpu"]
        u["used_memory_mb"] += row["memory_mb"]
        u["used_disk_mb"] += row["disk_mb"]
        p = providers[row["provider_id"]]
        p["cpu_used"] += row["cpu"]
        p["memory_used_mb"] += row["memory_mb"]
        p["disk_used_mb"] += row["disk_mb"]
        p["vms_used" if row["instance_type"] == InstanceType.VM else "containers_used"] += 1
    return users, providers


def _counter_differences() -> list[Difference]:
    diffs: list[Difference] = []
    users, providers = _expected_usage()
    names = dict(get_user_model().objects.values_list("pk", "username"))
    quotas = {q["user_id"]: q for q in UserQuota.objects.values("user_id", *QUOTA_FIELDS)}
    for user_id in sorted(set(quotas) | set(users)):
        expected = users.get(user_id, dict.fromkeys(QUOTA_FIELDS, 0))
        recorded = quotas.get(user_id)
        for name in QUOTA_FIELDS:
            have = recorded[name] if recorded else 0
            if have != expected[name] or (recorded is None and expected[name]):
                diffs.append(
                    Difference(
                        "quota",
                        f"user {names.get(user_id, user_id)}" + ("" if recorded else " (no quota row)"),
                        name,
                        have,
                        expected[name],
                        key=("user", user_id),
                    )
                )
    for row in Provider.objects.values("pk", "name", *CAPACITY_FIELDS).order_by("pk"):
        expected = providers.get(row["pk"], dict.fromkeys(CAPACITY_FIELDS, 0))
        for name in CAPACITY_FIELDS:
            if row[name] != expected[name]:
                diffs.append(
                    Difference(
                        "capacity",
                        f"provider {row['name']}",
                        name,
                        row[name],
                        expected[name],
                        key=("provider", row["pk"]),
                    )
                )
    return diffs


def _flag_differences() -> list[Difference]:
    diffs = []
    for row in Instance.objects.values("pk", "name", "status", "holds_resources").order_by("pk"):
        should = row["status"] not in INSTANCE_GONE
        if row["holds_resources"] != should:
            diffs.append(
                Difference(
                    "holds_resources",
                    f"instance {row['pk']} ({row['name']}, {row['status']})",
                    "holds_resources",
                    row["holds_resources"],
                    should,
                    key=("instance", row["pk"]),
                )
            )
    return diffs


def _port_differences() -> list[Difference]:
    diffs: list[Difference] = []
    live = list(
        PortMapping.objects.filter(status__in=PortMapping.LIVE_STATUSES)
        .select_related("instance")
        .order_by("provider_id", "host_port_start", "pk")
    )
    by_protocol: dict[tuple[int, str], list[PortMapping]] = defaultdict(list)
    for m in live:
        if m.instance.status in INSTANCE_GONE:
            diffs.append(
                Difference(
                    "stray_port",
                    f"port mapping {m.pk} ({m}) of {m.instance.status} instance {m.instance_id}",
                    "status",
                    m.status,
                    PortMapping.STATUS_DELETED,
                    key=("port", m.pk),
                )
            )
        if m.provider_id != m.instance.provider_id:
            diffs.append(
                Difference(
                    "port_provider",
                    f"port mapping {m.pk} ({m})",
                    "provider",
                    m.provider_id,
                    m.instance.provider_id,
                    fixable=False,
                )
            )
        for proto in m.protocols:
            by_protocol[(m.provider_id, proto)].append(m)
    for (provider_id, proto), mappings in sorted(by_protocol.items()):
        mappings.sort(key=lambda m: (m.host_port_start, m.pk))
        reach = None  # the mapping reaching furthest so far
        for m in mappings:
            if reach is not None and m.host_port_start <= reach.host_port_end:
                diffs.append(
                    Difference(
                        "port_overlap",
                        f"provider {provider_id} {proto}: mappings {reach.pk} ({reach}) and {m.pk} ({m})",
                        "host ports",
                        "overlapping",
                        "disjoint",
                        fixable=False,
                    )
                )
            if reach is None or m.host_port_end > reach.host_port_end:
                reach = m
    return diffs


def find_differences() -> list[Difference]:
    """Every difference between the counters and the rows (a consistent snapshot)."""
    with transaction.atomic():
        return _flag_differences() + _counter_differences() + _port_differences()


@retry_on_deadlock
def fix() -> list[Difference]:
    """Correct the counters, flags and stray mappings; return what was found (fixed or not)."""
    with transaction.atomic():
        # Lock order: every quota, then every provider (the system's order), so no
        # reservation or release runs while the sums are recomputed.
        list(UserQuota.objects.select_for_update().order_by("pk").values_list("pk", flat=True))
        list(Provider.objects.select_for_update().order_by("pk").values_list("pk", flat=True))
        found = _flag_differences() + _counter_differences() + _port_differences()
        for d in found:
            if d.kind == "holds_resources":
                Instance.objects.filter(pk=d.key[1]).update(holds_resources=d.expected)
            elif d.kind == "stray_port":
                PortMapping.objects.filter(pk=d.key[1]).update(status=PortMapping.STATUS_DELETED)
        users, providers = _expected_usage()
        from tasks.resources import ensure_quota

        for user in get_user_model().objects.filter(pk__in=list(users)):
            ensure_quota(user)
        for user_id in UserQuota.objects.values_list("user_id", flat=True):
            UserQuota.objects.filter(user_id=user_id).update(**users.get(user_id, dict.fromkeys(QUOTA_FIELDS, 0)))
        for provider_id in Provider.objects.values_list("pk", flat=True):
            Provider.objects.filter(pk=provider_id).update(
                **providers.get(provider_id, dict.fromkeys(CAPACITY_FIELDS, 0))
            )
    return found
