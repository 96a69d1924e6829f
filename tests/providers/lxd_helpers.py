"""Helpers shared by the LXD/Incus driver tests (the fake and its fixtures are in fake_lxd)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

import pytest

from providers.base import CancelToken, GuestSpec, OperationCancelled

NAME = "vps-0123456789ab"


def spec(name: str = NAME, **kw) -> GuestSpec:
    fields = {
        "instance_type": "container",
        "image": "debian/12",
        "cpu": 2,
        "memory_mb": 1024,
        "disk_mb": 20480,
        "labels": {"instance": "42", "owner": "alice"},
    }
    fields.update(kw)
    return GuestSpec(name=name, **fields)


class Progress:
    def __init__(self):
        self.events: list[tuple[int, str]] = []

    def __call__(self, percent: int, message: str) -> None:
        self.events.append((percent, message))

    @property
    def messages(self) -> list[str]:
        return [m for _, m in self.events]


def cancel_soon(token: CancelToken, after: float = 0.2) -> threading.Timer:
    timer = threading.Timer(after, token.cancel)
    timer.daemon = True
    timer.start()
    return timer


@contextmanager
def prompt(limit: float = 2.5):
    """The body must finish within ``limit`` seconds (a wait slice is 1 s)."""
    start = time.monotonic()
    yield
    elapsed = time.monotonic() - start
    assert elapsed < limit, f"took {elapsed:.2f}s"


def assert_cancelled(call: Callable[[CancelToken], object], *, deadline: bool = False) -> OperationCancelled:
    """Run ``call`` with a token cancelled mid-way (by a timer, or by its deadline)."""
    token = CancelToken(deadline=time.monotonic() + 0.3) if deadline else CancelToken()
    if not deadline:
        cancel_soon(token)
    with prompt():
        with pytest.raises(OperationCancelled) as info:
            call(token)
    assert info.value.reason == ("timeout" if deadline else "cancelled")
    return info.value
