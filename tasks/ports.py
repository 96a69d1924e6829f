"""Host port allocation: no two live mappings of a provider overlap for a protocol.

Callers hold the provider row lock (select_for_update) while they check and
insert, so two concurrent requests for the same port cannot both win; on SQLite
the IMMEDIATE transaction serialises them the same way.
"""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.utils import timezone
from django.utils.translation import gettext as _

from tasks.errors import InvalidInput, PortConflict
from tasks.models import BusyHostPort, Instance, PortMapping, Protocol, Provider

MAX_RANGE = 1000


def _protocols(protocol: str) -> tuple[str, ...]:
    return ("tcp", "udp") if protocol == Protocol.BOTH else (protocol,)


def overlapping(provider_id: int, protocol: str, start: int, end: int):
    """Live mappings of the provider that share a host port with [start, end] for the protocol."""
    protos = set(_protocols(protocol)) | {Protocol.BOTH}
    return PortMapping.objects.filter(
        provider_id=provider_id,
        status__in=PortMapping.LIVE_STATUSES,
        protocol__in=protos,
        host_port_start__lte=end,
        host_port_end__gte=start,
    )


def find_free(
    provider: Provider, protocol: str, count: int, exclude: list[tuple[int, int]] | None = None
) -> int | None:
    """First host port of a free run of ``count`` ports in the provider's range.

    Free: no live mapping of the provider has it, and the host did not lately refuse
    to bind it (BusyHostPort, whatever the protocol).
    """
    protos = set(_protocols(protocol)) | {Protocol.BOTH}
    taken = list(
        PortMapping.objects.filter(
            provider_id=provider.pk,
            status__in=PortMapping.LIVE_STATUSES,
            protocol__in=protos,
            host_port_end__gte=provider.port_range_start,
            host_port_start__lte=provider.port_range_end,
        )
        .order_by("host_port_start")
        .values_list("host_port_start", "host_port_end")
    )
    busy = BusyHostPort.objects.filter(
        provider_id=provider.pk,
        expires_at__gt=timezone.now(),
        port__gte=provider.port_range_start,
        port__lte=provider.port_range_end,
    ).values_list("port", flat=True)
    taken = sorted(taken + [(port, port) for port in busy] + list(exclude or []))
    candidate = provider.port_range_start
    for start, end in taken:
        if candidate + count - 1 < start:
            break
        candidate = max(candidate, end + 1)
    if candidate + count - 1 > provider.port_range_end:
        return None
    return candidate


def validate_request(protocol: str, guest_port: int, host_port: int | None, count: int) -> None:
    if protocol not in Protocol.values:
        raise InvalidInput(_("protocol must be tcp, udp or both"), field="protocol")
    if not 1 <= count <= MAX_RANGE:
        raise InvalidInput(_("count must be between 1 and %(max)s") % {"max": MAX_RANGE}, field="count")
    if not 1 <= guest_port <= 65535 or guest_port + count - 1 > 65535:
        raise InvalidInput(_("guest_port (and the range from it) must lie within 1-65535"), field="guest_port")
    if host_port is not None and (not 1 <= host_port <= 65535 or host_port + count - 1 > 65535):
        raise InvalidInput(_("host_port (and the range from it) must lie within 1-65535"), field="host_port")


def reserve(
    provider: Provider,
    instance: Instance,
    *,
    protocol: str,
    guest_port: int,
    host_port: int | None = None,
    count: int = 1,
    is_ssh: bool = False,
    description: str = "",
    restrict_to_range: bool = True,
) -> PortMapping:
    """Create a pending mapping; the provider row must be locked by the caller."""
    validate_request(protocol, guest_port, host_port, count)
    if host_port is None:
        host_port = find_free(provider, protocol, count)
        if host_port is None:
            raise PortConflict(
                _("no %(count)s free port(s) left in %(name)s's range") % {"count": count, "name": provider.name},
                field="host_port",
            )
    else:
        if restrict_to_range and not (
            provider.port_range_start <= host_port and host_port + count - 1 <= provider.port_range_end
        ):
            raise InvalidInput(
                _("host_port must lie within the provider's range %(start)s-%(end)s")
                % {"start": provider.port_range_start, "end": provider.port_range_end},
                field="host_port",
            )
        clash = overlapping(provider.pk, protocol, host_port, host_port + count - 1).first()
        if clash is not None:
            raise PortConflict(
                _("host port(s) %(first)s-%(last)s/%(protocol)s overlap mapping %(id)s (%(mapping)s)")
                % {
                    "first": host_port,
                    "last": host_port + count - 1,
                    "protocol": protocol,
                    "id": clash.pk,
                    "mapping": clash,
                },
                field="host_port",
                conflicting_port=clash.pk,
            )
    return PortMapping.objects.create(
        instance=instance,
        provider=provider,
        protocol=protocol,
        host_port_start=host_port,
        host_port_end=host_port + count - 1,
        guest_port_start=guest_port,
        guest_port_end=guest_port + count - 1,
        is_ssh=is_ssh,
        description=description,
        status=PortMapping.STATUS_PENDING,
    )


def reserve_default_block(
    provider: Provider, instance: Instance, exclude: list[tuple[int, int]] | None = None
) -> list[PortMapping]:
    """The block every new instance gets: first host port -> SSH (22/tcp), the rest 1:1 tcp+udp."""
    size = provider.default_port_block
    if size == 0:
        return []
    start = find_free(provider, Protocol.BOTH, size, exclude)
    if start is None:
        raise PortConflict(
            _("provider %(name)s has no block of %(size)s free host ports") % {"name": provider.name, "size": size},
            field="provider",
        )
    mappings = [
        reserve(
            provider, instance, protocol=Protocol.TCP, guest_port=22, host_port=start, is_ssh=True, description="ssh"
        )
    ]
    if size > 1:
        mappings.append(
            reserve(
                provider, instance, protocol=Protocol.BOTH, guest_port=start + 1, host_port=start + 1, count=size - 1
            )
        )
    return mappings


def listed(numbers: list[int]) -> str:
    """Ports for a message: 21000,21003."""
    return ",".join(str(n) for n in numbers)


def record_refused(provider_id: int, exc, ranges: list[tuple[int, int]]) -> list[int]:
    """The ports of ``ranges`` that a HostPortBusy names, recorded as busy (see record_busy)."""
    busy = [port for port in exc.ports if any(lo <= port <= hi for lo, hi in ranges)]
    record_busy(provider_id, busy, exc.remote_message or str(exc))
    return busy


def record_busy(provider_id: int, ports: list[int], message: str) -> None:
    """Remember host ports the host refused to bind, so automatic allocation skips them
    for HOST_PORT_BUSY_SECONDS (a hint, not a reservation: no lock, last writer wins)."""
    seconds = settings.HOST_PORT_BUSY_SECONDS
    if not ports or seconds <= 0:
        return
    now = timezone.now()
    fields = {"message": message[:300], "seen_at": now, "expires_at": now + timedelta(seconds=seconds)}
    for port in sorted(set(ports)):
        BusyHostPort.objects.update_or_create(provider_id=provider_id, port=port, defaults=fields)
