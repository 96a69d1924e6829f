"""The `daemons` suite: real Docker Engine, Podman, LXD and Incus (scripts/daemons).

Skipped unless CLOUDHOST_DAEMONS=1 (.ci/run sets it after `scripts/daemons start`);
then a daemon that does not answer fails its tests instead of skipping them, so CI
really runs them. Figures (create and stop times) are printed at the end of the run.
"""

from __future__ import annotations

import os

import pytest

from tasks.models import Provider
from tests.daemons.hosts import NAMES, PORT_RANGES, host

FIGURES: list[str] = []


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("daemons: figures (shared 2-core machine: inflated)")
        for line in FIGURES:
            terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def _daemons_wanted():
    if os.environ.get("CLOUDHOST_DAEMONS") != "1":
        pytest.skip("real daemons: run `scripts/daemons start` and set CLOUDHOST_DAEMONS=1 (.ci/run does)")


@pytest.fixture(params=NAMES)
def daemon(request):
    h = host(request.param)
    assert h.up(), f"{request.param} does not answer: scripts/daemons start {request.param}"
    return h


@pytest.fixture
def provider_for(db):
    def make(h, **fields) -> Provider:
        low, high = PORT_RANGES[h.name]
        provider = Provider(
            name=f"real-{h.name}",
            provider_type=h.provider_type,
            port_range_start=low,
            port_range_end=high,
            default_port_block=2,
            **fields,
        )
        provider.connection = h.connection
        provider.set_secrets(h.secrets)
        provider.save()
        return provider

    return make
