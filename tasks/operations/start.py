"""start: boot the guest; the instance shows starting, then what the provider says.

Steps (progress): boot 10-80, read the state back 85, traffic counters 95.
Failure or cancel: the instance shows the state read back from the provider
(stopped, running, or error when the guest is missing), never a guess; if the
provider cannot be read, unknown with needs_reconcile.
"""

from __future__ import annotations

from tasks import traffic
from tasks.engine.states import InstanceStatus, TaskType
from tasks.operations import register
from tasks.operations.base import ExecutionContext
from tasks.operations.steps import GuestOperation, Steps, guest_ref, record_addresses, status_of


class StartOperation(GuestOperation):
    task_type = TaskType.START
    success_status = InstanceStatus.RUNNING

    def steps(self, ctx: ExecutionContext, steps: Steps) -> None:
        ref = guest_ref(ctx.instance)
        steps.call("starting the guest", lambda p: ctx.driver.start(ref, ctx.cancel, p), 10, 80)
        steps.step(85, "reading the guest's state")
        state = steps.read_state()
        record_addresses(ctx, state)
        ctx.instance_status = status_of(state)
        steps.sync_traffic(traffic.AFTER_START, 95)
        steps.step(100, "running")


register(StartOperation())
