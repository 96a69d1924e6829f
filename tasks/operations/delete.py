"""delete: remove the guest, verify it is gone, then give everything back.

Steps (progress): traffic counters 5, delete 10-80 (retryable errors are
retried 3 times after 2, 4 and 8 s: TASK_RETRY_BASE_SECONDS x 1, 2, 4), verify
with get_state 85.

Success (the provider says the guest does not exist): quota, capacity and ports
are released, the instance is ``deleted`` and its name free again.
Failure, including a delete the provider acknowledged but that left the guest
(error code verify_failed) or a provider that cannot be read: nothing is
released, the instance stays, marked ``error``.
Cancel (admins only while running): if the guest turns out to be gone already
the delete completes (the truth wins); otherwise the instance shows the state
read back and keeps everything.
"""

from __future__ import annotations

import logging

from django.utils import timezone

from providers.base import OperationCancelled, ProviderError
from tasks import resources, traffic
from tasks.engine.states import COMPLETED, InstanceStatus, TaskType
from tasks.operations import register
from tasks.operations.base import ExecutionContext, Outcome
from tasks.operations.steps import GuestOperation, Steps, VerifyFailed, guest_ref, status_of, truth_after_failure

logger = logging.getLogger("tasks.operations")


class DeleteOperation(GuestOperation):
    task_type = TaskType.DELETE
    touches_quota = True
    success_status = InstanceStatus.DELETED

    def steps(self, ctx: ExecutionContext, steps: Steps) -> None:
        ref = guest_ref(ctx.instance)
        steps.sync_traffic(traffic.BEFORE_DELETE, 5)
        steps.call("deleting the guest", lambda p: ctx.driver.delete(ref, ctx.cancel, p), 10, 80)
        steps.step(85, "verifying the guest is gone")
        try:
            state = steps.read_state()
        except ProviderError as exc:
            raise VerifyFailed(f"cannot verify that guest {ref['name']} is gone: {exc}", op="delete") from exc
        if state.exists:
            raise VerifyFailed(
                f"the provider reported guest {ref['name']} deleted, but it still exists ({state.status})",
                op="delete",
            )
        steps.step(100, "deleted")

    def after_failure(self, ctx: ExecutionContext, steps: Steps, exc: Exception) -> bool:
        if isinstance(exc, VerifyFailed):
            ctx.instance_status = InstanceStatus.ERROR
            return False
        state = truth_after_failure(ctx)
        if state is not None and not state.exists:
            # The guest is verifiably gone: the delete happened, whatever was raised.
            return True
        if isinstance(exc, OperationCancelled):
            ctx.instance_status = status_of(state)
        else:
            ctx.instance_status = InstanceStatus.ERROR
        return False

    def on_finished(self, task, instance, outcome: Outcome) -> None:
        if instance is None:
            return
        if outcome.status != COMPLETED:
            super().on_finished(task, instance, outcome)
            return
        resources.release(instance)
        instance.status = InstanceStatus.DELETED
        instance.live_name = None
        instance.deleted_at = timezone.now()
        instance.needs_reconcile = False
        logger.info("task %s: instance %s deleted; quota, capacity and ports released", task.pk, instance.pk)


register(DeleteOperation())
