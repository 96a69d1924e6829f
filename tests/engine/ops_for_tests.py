"""Operations used by the engine tests (loaded in worker processes via TASK_EXTRA_OPERATIONS).

They replace start/stop/restart with an operation driven by task_data:
``sleep`` seconds (cancel-aware unless ``ignore_cancel``), ``block_sigalrm`` to
defeat django-q2's in-process timeout, ``swallow_timeout`` to catch and ignore
its TimeoutException too, ``fail`` to raise a provider error, ``kill_self`` to
SIGKILL its own worker process (a poison task).
Each execution appends "start task pid time" when it begins and "task pid start end"
when it ends to $TEST_EXEC_LOG.
"""

from __future__ import annotations

import os
import signal
import time

from providers.base import PermanentError
from tasks.engine.states import InstanceStatus, TaskType
from tasks.operations import register
from tasks.operations.base import ExecutionContext, Operation


class SleepOperation(Operation):
    def __init__(self, task_type: str, success_status: str):
        self.task_type = task_type
        self.success_status = success_status

    def run(self, ctx: ExecutionContext) -> None:
        started = time.time()
        log = os.environ.get("TEST_EXEC_LOG")
        if log:
            with open(log, "a") as fh:
                fh.write(f"start {ctx.task.pk} {os.getpid()} {started:.6f}\n")
        data = ctx.data
        # What "the provider" reports if the operation stops midway.
        ctx.instance_status = InstanceStatus.RUNNING
        try:
            if data.get("block_sigalrm"):
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            seconds = float(data.get("sleep", 0))
            ctx.progress(10, "sleeping")
            if data.get("kill_self"):
                os.kill(os.getpid(), signal.SIGKILL)
            if data.get("ignore_cancel") or data.get("swallow_timeout"):
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    try:
                        time.sleep(0.05)
                    except BaseException:
                        # swallow_timeout: even django-q2's TimeoutException is ignored (a bare except).
                        if not data.get("swallow_timeout"):
                            raise
            else:
                ctx.cancel.sleep(seconds)
            if data.get("fail"):
                raise PermanentError("injected failure")
            ctx.progress(100, "done")
        finally:
            if log:
                with open(log, "a") as fh:
                    fh.write(f"{ctx.task.pk} {os.getpid()} {started:.6f} {time.time():.6f}\n")


register(SleepOperation(TaskType.START, InstanceStatus.RUNNING))
register(SleepOperation(TaskType.STOP, InstanceStatus.STOPPED))
register(SleepOperation(TaskType.RESTART, InstanceStatus.RUNNING))
