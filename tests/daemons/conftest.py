"""The `daemons` suite: real Docker Engine, Podman, LXD and Incus (scripts/daemons).

Skipped unless CLOUDHOST_DAEMONS=1 (.ci/run sets it after `scripts/daemons start`);
then a daemon that does not answer fails its tests instead of skipping them, so CI
really runs them. Figures (create and stop times) are printed at the end of the run.
"""

from __future__ import annotations

import os
import time

import pytest
from django.db import connection

from tasks.engine.states import FINAL
from tasks.engine.worker import run_admitted_inline
from tasks.models import Provider, Task
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


class Engine:
    """Runs the queued tasks: a real worker tier (`run_workers`, MariaDB), or inline.

    On MariaDB (as .ci/run runs this suite) the tasks go through the worker tier a
    deployment runs: admission, the broker, a pool worker, heartbeats, the guarded
    finish. On SQLite (an in-memory test database no other process can open) the
    test's own process runs them with tasks.engine.worker.run_admitted_inline.
    """

    def __init__(self, tmp_path, **env):
        self.tier = None
        if connection.vendor == "mysql":
            from tests.engine.harness import WorkerTier

            settings = {
                "TASK_EXTRA_OPERATIONS": "tests.daemons.tier_hooks",
                "TASK_LEASE_SECONDS": "15",
                "TASK_HEARTBEAT_SECONDS": "2",
                "TASK_CANCEL_POLL_SECONDS": "0.2",
                "TASK_HARD_KILL_GRACE_SECONDS": "10",
                "TASK_DISPATCH_TIMEOUT_SECONDS": "30",
                "TASK_SHUTDOWN_GRACE_SECONDS": "30",
                # Probes are the test's to run: the daemons' own start-up must settle first.
                "PROVIDER_PROBE_SECONDS": "3600",
                **env,
            }
            self.tier = WorkerTier(tmp_path, f"daemons-{os.getpid()}", **settings).start().wait_ready()

    @property
    def inline(self) -> bool:
        return self.tier is None

    def run(self, provider: Provider, task: Task, timeout: float = 300) -> Task:
        """Until ``task`` has ended; returns it fresh from the database."""
        if self.inline:
            run_admitted_inline(provider.pk)
        else:
            deadline = time.monotonic() + timeout
            while Task.objects.filter(pk=task.pk).exclude(status__in=FINAL).exists():
                assert time.monotonic() < deadline, f"task {task.pk} still not ended after {timeout} s"
                assert self.tier.proc.poll() is None, f"the worker tier died:\n{self.tier.log()[-3000:]}"
                time.sleep(0.1)
        return Task.objects.get(pk=task.pk)

    def stop(self) -> None:
        if self.tier is not None:
            from tests.engine.harness import kill_node_processes

            self.tier.stop()
            kill_node_processes(self.tier.node)


@pytest.fixture
def engine(tmp_path):
    """A factory: ``engine(**settings)`` starts the runner (with extra tier settings)."""
    started: list[Engine] = []

    def start(**env) -> Engine:
        runner = Engine(tmp_path, **env)
        started.append(runner)
        return runner

    yield start
    for runner in started:
        runner.stop()
