"""Incus driver: the LXD driver speaking to an Incus daemon.

Incus forked from LXD and keeps the ``/1.0`` API shape; the differences that
matter to us (default socket /var/lib/incus/unix.socket, TLS 1.3 only, its own
image server) are in providers/lxd/transport.py's ``INCUS`` flavour, and the
client handles both ``/wait`` shapes (Incus >= 6.12 renders the operation,
older releases send an error body) whichever daemon answers. Connection
settings: as for LXD (providers/lxd/__init__.py, docs/providers-lxd.md).
"""

from __future__ import annotations

from providers.lxd.driver import LXDDriver
from providers.lxd.transport import INCUS, Flavour


class IncusDriver(LXDDriver):
    flavour: Flavour = INCUS
