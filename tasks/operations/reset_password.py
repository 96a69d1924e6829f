"""reset-password: a new random root password, set on the guest, shown once.

Steps (progress): generate 10, set on the guest 20-90.
Success: the password is stored encrypted (TaskSecret) with the completed task
and readable once by the owner (services.read_password_once); it never enters
task_data, logs, events or list responses. The instance status is unchanged.
Failure or cancel: no password is kept; the instance shows the state read back
(or keeps its status when the provider cannot be read: a password change does
not touch the power state).
"""

from __future__ import annotations

from tasks import crypto
from tasks.engine.states import TaskType
from tasks.operations import register
from tasks.operations.base import ExecutionContext
from tasks.operations.steps import GuestOperation, Steps, guest_ref, status_of, truth_after_failure


class ResetPasswordOperation(GuestOperation):
    task_type = TaskType.RESET_PASSWORD
    success_status = None

    def steps(self, ctx: ExecutionContext, steps: Steps) -> None:
        ref = guest_ref(ctx.instance)
        steps.step(10, "generating a new password")
        password = crypto.generate_password()
        steps.call("setting the root password", lambda p: ctx.driver.set_password(ref, password, ctx.cancel, p), 20, 90)
        ctx.secret = password
        steps.step(100, "password changed")

    def after_failure(self, ctx: ExecutionContext, steps: Steps, exc: Exception) -> bool:
        ctx.secret = None
        ctx.instance_status = status_of(truth_after_failure(ctx)) or ctx.instance.status
        return False


register(ResetPasswordOperation())
