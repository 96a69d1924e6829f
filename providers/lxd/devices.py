"""Port mappings as proxy devices, and what the state endpoint says about addresses."""

from __future__ import annotations

from typing import Any

from providers.base import PortSpec, UnsupportedError

PORT_DEVICE_PREFIX = "pm-"


def proxy_device(port: PortSpec, api_type: str, nat_listen_address: str | None) -> dict[str, str]:
    """The proxy device for ``port``; its name is ``port.handle``."""

    def rng(a: int, b: int) -> str:
        return str(a) if a == b else f"{a}-{b}"

    host, guest = rng(port.host_port_start, port.host_port_end), rng(port.guest_port_start, port.guest_port_end)
    if api_type == "virtual-machine":
        # VMs have no shared network namespace: proxy devices must run in NAT
        # mode, which needs a concrete host address to listen on.
        if not nat_listen_address:
            raise UnsupportedError(
                "port mappings on virtual machines need connection.nat_listen_address (proxy NAT mode)"
            )
        return {
            "type": "proxy",
            "nat": "true",
            "listen": f"{port.protocol}:{nat_listen_address}:{host}",
            "connect": f"{port.protocol}:0.0.0.0:{guest}",
        }
    return {
        "type": "proxy",
        "listen": f"{port.protocol}:{port.listen_ip}:{host}",
        "connect": f"{port.protocol}:127.0.0.1:{guest}",
    }


def port_from_device(name: str, device: dict[str, Any]) -> PortSpec | None:
    """The mapping a ``pm-*`` proxy device stands for (None for any other device)."""
    if not name.startswith(PORT_DEVICE_PREFIX) or device.get("type") != "proxy":
        return None
    try:
        lproto, listen = str(device["listen"]).split(":", 1)
        lip, lports = listen.rsplit(":", 1)
        cports = str(device["connect"]).rsplit(":", 1)[1]
        hs, _, he = lports.partition("-")
        gs, _, ge = cports.partition("-")
        return PortSpec(
            protocol=lproto,
            host_port_start=int(hs),
            host_port_end=int(he or hs),
            guest_port_start=int(gs),
            guest_port_end=int(ge or gs),
            listen_ip=lip.strip("[]"),
        )
    except (KeyError, ValueError):
        return None


def global_addresses(state: dict[str, Any]) -> list[str]:
    """Global addresses of every interface but loopback, IPv4 first."""
    found: list[tuple[int, str]] = []
    for iface, net in (state.get("network") or {}).items():
        if iface == "lo" or not isinstance(net, dict):
            continue
        for addr in net.get("addresses") or []:
            if addr.get("scope") != "global" or not addr.get("address"):
                continue
            found.append((0 if addr.get("family") == "inet" else 1, str(addr["address"])))
    return [a for _, a in sorted(found, key=lambda x: x[0])]
