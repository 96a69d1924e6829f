"""stop: graceful shutdown, forced after the graceful timeout.

Steps (progress): traffic counters 5, shut down 10-85 (the driver forces the
stop after ``graceful_timeout`` seconds, task_data may set it, default 30),
read the state back 90.
Failure or cancel: the instance shows the state read back from the provider.
"""

from __future__ import annotations

from tasks import traffic
from tasks.engine.states import InstanceStatus, TaskType
from tasks.operations import register
from tasks.operations.base import ExecutionContext
from tasks.operations.steps import GuestOperation, Steps, guest_ref, status_of

GRACEFUL_TIMEOUT = 30


class StopOperation(GuestOperation):
    task_type = TaskType.STOP
    success_status = InstanceStatus.STOPPED

    def steps(self, ctx: ExecutionContext, steps: Steps) -> None:
        ref = guest_ref(ctx.instance)
        graceful = int(ctx.data.get("graceful_timeout") or GRACEFUL_TIMEOUT)
        steps.sync_traffic(traffic.BEFORE_STOP, 5)
        steps.call(
            "stopping the guest",
            lambda p: ctx.driver.stop(ref, ctx.cancel, p, graceful_timeout=graceful),
            10,
            85,
        )
        steps.step(90, "reading the guest's state")
        ctx.instance_status = status_of(steps.read_state())
        steps.step(100, "stopped")


register(StopOperation())
