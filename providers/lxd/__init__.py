"""LXD driver: the ``/1.0`` REST API over the unix socket or mutual TLS.

Also the implementation of the Incus driver (providers/incus.py), which only
swaps the ``Flavour``: the two daemons share the API shape, and what differs
(socket path, TLS floor, image remotes, ``/wait`` failure shape) is handled in
providers/lxd/transport.py (``Flavour``) and client.py.

Connection settings (Provider.connection; docs/providers-lxd.md has the full table):

    endpoint          unix:///var/snap/lxd/common/lxd/unix.socket (default: the first
                      existing default socket) or https://host:8443
    server_fingerprint | server_cert | server_ca    trust for https (see transport.py)
    project           default "default"
    storage_pool      pool of the root disk, default "default"
    profiles          list, default ["default"]
    network           managed network for eth0 (optional; needed for bandwidth limits)
    image_server      default image server for unprefixed images (optional)
    image_remotes     {"name": "https://..."} extra "remote:alias" prefixes
    nat_listen_address  host address for VM port mappings (proxy devices in NAT mode)
    restart_timeout   graceful restart seconds before forcing, default 30
    request_timeout, connect_timeout, wait_slice, trust_env

Secrets (Provider secrets): client_cert, client_key (PEM) for https.

Guest refs are ``{"name", "project", "type"}``; every method re-reads the guest,
so a step repeated after a crash converges. Progress percentages cover the one
call they are reported from (0-100).
"""

from __future__ import annotations

from providers.lxd.driver import LXDDriver

__all__ = ["LXDDriver"]
