"""create-port: map host port(s) to the guest (TCP, UDP or both; one port or a range).

The mapping row was reserved ``pending`` by services.create_port under the
provider row lock (no overlap with any live mapping of the provider for the
protocol, pending ones included).

Steps (progress): one driver call per protocol, 10-90.
Success: the mapping turns ``active``.
Failure or cancel: what was mapped is unmapped again (best effort, bounded),
and the mapping turns ``failed`` (its host ports are free again). If the task
ended without a trustworthy result (force-stop, lost worker), the mapping stays
``pending`` and the instance is reconciled: active if the host has it, else
failed.
"""

from __future__ import annotations

import logging

from providers.base import HostPortBusy, no_progress
from tasks import ports
from tasks.engine.states import COMPLETED, TaskType
from tasks.models import PortMapping
from tasks.operations import register
from tasks.operations.base import ExecutionContext, Outcome
from tasks.operations.steps import (
    GuestOperation,
    Steps,
    cleanup_token,
    guest_ref,
    port_specs,
    status_of,
    truth_after_failure,
)

logger = logging.getLogger("tasks.operations")


def task_mapping(ctx: ExecutionContext) -> PortMapping:
    mapping_id = ctx.task.port_mapping_id or ctx.data.get("port_mapping")
    mapping = PortMapping.objects.filter(pk=mapping_id, instance=ctx.instance).first()
    if mapping is None:
        raise LookupError(f"task {ctx.task.pk}: its port mapping {mapping_id} does not exist")
    return mapping


def apply_mapping(ctx: ExecutionContext, steps: Steps, verb: str, done: str, call) -> None:
    """One driver call per protocol of the task's mapping (progress 10-90): ``call(ref, port, cancel, progress)``."""
    mapping = task_mapping(ctx)
    ref = guest_ref(ctx.instance)
    steps.call_each(
        port_specs(mapping),
        lambda port: f"{verb} {port.handle}",
        lambda port, p: call(ref, port, ctx.cancel, p),
        10,
        90,
    )
    steps.step(100, f"{done} {mapping}")


class CreatePortOperation(GuestOperation):
    task_type = TaskType.CREATE_PORT
    success_status = None

    def steps(self, ctx: ExecutionContext, steps: Steps) -> None:
        apply_mapping(ctx, steps, "mapping", "mapped", ctx.driver.add_port)

    def after_failure(self, ctx: ExecutionContext, steps: Steps, exc: Exception) -> bool:
        ref = guest_ref(ctx.instance)
        token = cleanup_token(ctx)
        try:
            undo = port_specs(task_mapping(ctx))
        except LookupError:
            undo = []
        if isinstance(exc, HostPortBusy) and undo:
            # Something outside the panel holds the port: remember it, so that a request
            # without a host port gets another one, and say so.
            busy = ports.record_refused(ctx.provider.pk, exc, [(undo[0].host_port_start, undo[0].host_port_end)])
            if busy:
                ctx.error_note = (
                    f"host port {ports.listed(busy)} is in use on the host, outside the panel; choose another one"
                )
        # Removal is idempotent and the host ports are ours (reserved under the
        # provider lock), so unmapping every protocol undoes whatever was mapped.
        for port in undo:
            try:
                ctx.driver.remove_port(ref, port, token, no_progress)
            except Exception as undo_exc:
                logger.warning("task %s: could not unmap %s after a failure: %s", ctx.task.pk, port.handle, undo_exc)
        ctx.instance_status = status_of(truth_after_failure(ctx)) or ctx.instance.status
        return False

    def on_finished(self, task, instance, outcome: Outcome) -> None:
        super().on_finished(task, instance, outcome)
        if not task.port_mapping_id:
            return
        if outcome.status == COMPLETED:
            new = PortMapping.STATUS_ACTIVE
        elif outcome.ran and outcome.instance_status is None:
            return  # no trustworthy end: reconciliation decides from the host's mappings
        else:
            new = PortMapping.STATUS_FAILED
        PortMapping.objects.filter(pk=task.port_mapping_id, status=PortMapping.STATUS_PENDING).update(status=new)


register(CreatePortOperation())
