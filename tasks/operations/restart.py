"""restart: stop and boot again (a stopped guest is simply started).

Steps (progress): traffic counters 5, restart 10-85, read the state back 90.
Failure or cancel: the instance shows the state read back from the provider.
"""

from __future__ import annotations

from tasks import traffic
from tasks.engine.states import InstanceStatus, TaskType
from tasks.operations import register
from tasks.operations.base import ExecutionContext
from tasks.operations.steps import GuestOperation, Steps, guest_ref, record_addresses, status_of


class RestartOperation(GuestOperation):
    task_type = TaskType.RESTART
    success_status = InstanceStatus.RUNNING

    def steps(self, ctx: ExecutionContext, steps: Steps) -> None:
        ref = guest_ref(ctx.instance)
        steps.sync_traffic(traffic.BEFORE_RESTART, 5)
        steps.call("restarting the guest", lambda p: ctx.driver.restart(ref, ctx.cancel, p), 10, 85, once="restart")
        steps.step(90, "reading the guest's state")
        state = steps.read_state()
        record_addresses(ctx, state)
        ctx.instance_status = status_of(state)
        steps.step(100, "running")


register(RestartOperation())
