"""Minimal operations: no provider I/O, but the database side of every type is right
(reservations released, ports activated or freed), so the engine can be exercised
before the real operation modules exist. Registered only for types without one.
"""

from __future__ import annotations

from django.utils import timezone

from tasks import resources
from tasks.models import PortMapping
from tasks.operations import _REGISTRY
from tasks.operations.base import ExecutionContext, Operation, Outcome
from tasks.states import COMPLETED, InstanceStatus, TaskType

_SUCCESS = {
    TaskType.CREATE: InstanceStatus.RUNNING,
    TaskType.START: InstanceStatus.RUNNING,
    TaskType.STOP: InstanceStatus.STOPPED,
    TaskType.RESTART: InstanceStatus.RUNNING,
    TaskType.DELETE: InstanceStatus.DELETED,
    TaskType.RESET: InstanceStatus.RUNNING,
}


class NoopOperation(Operation):
    def __init__(self, task_type: str):
        self.task_type = task_type
        self.success_status = _SUCCESS.get(task_type)

    def run(self, ctx: ExecutionContext) -> None:
        ctx.progress(50, "working")
        ctx.cancel.sleep(float(ctx.data.get("sleep", 0)))
        ctx.progress(100, "done")

    def on_finished(self, task, instance, outcome: Outcome) -> None:
        super().on_finished(task, instance, outcome)
        if instance is None:
            return
        ok = outcome.status == COMPLETED
        if self.task_type == TaskType.CREATE:
            if ok:
                PortMapping.objects.filter(instance=instance, status=PortMapping.STATUS_PENDING).update(
                    status=PortMapping.STATUS_ACTIVE
                )
            else:
                resources.release(instance)
                instance.status = InstanceStatus.FAILED if outcome.ran else InstanceStatus.DELETED
                instance.live_name = None
                instance.needs_reconcile = False
        elif self.task_type == TaskType.DELETE and ok:
            resources.release(instance)
            instance.live_name = None
            instance.deleted_at = timezone.now()
        elif self.task_type in (TaskType.CREATE_PORT, TaskType.DELETE_PORT) and task.port_mapping_id:
            if self.task_type == TaskType.CREATE_PORT:
                new = PortMapping.STATUS_ACTIVE if ok else PortMapping.STATUS_FAILED
            else:
                new = PortMapping.STATUS_DELETED if ok else PortMapping.STATUS_ACTIVE
            PortMapping.objects.filter(pk=task.port_mapping_id).update(status=new)


for _t in TaskType.values:
    _REGISTRY.setdefault(_t, NoopOperation(_t))
