"""delete-port: unmap host port(s) from the guest (one driver call per protocol).

Steps (progress): 10-90.
Success: the mapping turns ``deleted`` (its host ports are free); removing the
SSH mapping clears the instance's ssh_port.
Failure or cancel: the mapping keeps its status (``active``): until the host
says it is gone, its ports stay taken.
"""

from __future__ import annotations

from tasks.engine.states import COMPLETED, TaskType
from tasks.models import PortMapping
from tasks.operations import register
from tasks.operations.base import ExecutionContext, Outcome
from tasks.operations.create_port import apply_mapping
from tasks.operations.steps import GuestOperation, Steps, status_of, truth_after_failure


class DeletePortOperation(GuestOperation):
    task_type = TaskType.DELETE_PORT
    success_status = None

    def steps(self, ctx: ExecutionContext, steps: Steps) -> None:
        apply_mapping(ctx, steps, "unmapping", "unmapped", ctx.driver.remove_port)

    def after_failure(self, ctx: ExecutionContext, steps: Steps, exc: Exception) -> bool:
        ctx.instance_status = status_of(truth_after_failure(ctx)) or ctx.instance.status
        return False

    def on_finished(self, task, instance, outcome: Outcome) -> None:
        super().on_finished(task, instance, outcome)
        if not task.port_mapping_id or outcome.status != COMPLETED:
            return
        mapping = PortMapping.objects.filter(pk=task.port_mapping_id).first()
        if mapping is None:
            return
        PortMapping.objects.filter(pk=mapping.pk).update(status=PortMapping.STATUS_DELETED)
        if instance is not None and mapping.is_ssh and instance.ssh_port == mapping.host_port_start:
            instance.ssh_port = None


register(DeletePortOperation())
