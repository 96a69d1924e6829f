"""Incus driver: the LXD driver speaking to an Incus daemon.

Incus forked from LXD and keeps the ``/1.0`` API shape; the differences that
matter to us (default socket /var/lib/incus/unix.socket, TLS 1.3 only, its own
image server, the newer ``/wait`` shape since 6.12) are all in
providers/_lxdapi.py's ``INCUS`` flavour, and the client handles both ``/wait``
shapes whichever daemon answers. Connection settings: as for LXD
(providers/lxd.py).
"""

from __future__ import annotations

from providers._lxdapi import INCUS, Flavour
from providers.lxd import LXDDriver


class IncusDriver(LXDDriver):
    flavour: Flavour = INCUS
