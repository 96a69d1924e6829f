"""No-op work for the pipeline benchmark: the same nothing on both sides."""

from __future__ import annotations

import os
import time

from tasks.engine.states import InstanceStatus, TaskType
from tasks.operations import register
from tasks.operations.base import ExecutionContext, Operation


class NoopRestart(Operation):
    task_type = TaskType.RESTART
    success_status = InstanceStatus.RUNNING

    def run(self, ctx: ExecutionContext) -> None:
        seconds = float(ctx.data.get("sleep", 0))  # bench/tier_cost's busy tasks
        if seconds:
            ctx.cancel.sleep(seconds)


register(NoopRestart())


def baseline_noop(enqueued_at: float) -> None:
    """Plain django-q2 job: record when it started, nothing else."""
    started = time.time()
    with open(os.environ["BENCH_BASELINE_LOG"], "a") as fh:
        fh.write(f"{enqueued_at:.6f} {started:.6f}\n")
