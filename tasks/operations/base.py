"""What every operation module provides.

An operation has two halves:

- ``run(ctx)``: the steps, executed by the worker outside any transaction, talking
  to the provider driver, reporting progress, checking ``ctx.cancel`` at each safe
  point. It returns normally on success (``ctx.result`` holds instance fields to
  record) and raises on failure (providers.base errors) or cancellation.
- ``on_running`` / ``on_finished``: the database side, called by
  tasks.engine.transitions inside the transaction that changes the task, with the
  instance row locked. They change the instance object in memory (the caller
  saves it) and release or confirm resources. They must not do I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tasks.engine.states import COMPLETED, INSTANCE_BUSY_STATUS, InstanceStatus

if TYPE_CHECKING:
    from providers.base import CancelToken, Driver
    from tasks.models import Instance, Provider, Task


@dataclass
class Outcome:
    """How a task ended, as seen by the on_finished hook."""

    status: str  # the terminal task status
    ran: bool  # the task had started (running or cancelling) before it ended
    instance_status: str | None = None  # truth read back from the provider, if any
    instance_updates: dict[str, Any] = field(default_factory=dict)
    reason: str = ""  # error code


@dataclass
class ExecutionContext:
    task: Task
    instance: Instance | None
    provider: Provider
    driver: Driver
    cancel: CancelToken
    progress: Callable[[int, str], None]
    data: dict[str, Any]
    # Instance fields to record with the final transition (addresses, ssh_port ...).
    result: dict[str, Any] = field(default_factory=dict)
    # Status read back from the provider after a failure, so the instance shows the truth.
    instance_status: str | None = None
    # A password to hand to the owner once (stored encrypted with the completed task).
    secret: str | None = None
    # Appended to the error message of a task that does not complete (e.g. which guest
    # an undo could not remove), whatever ends it: a failure, a cancel or a timeout.
    error_note: str = ""
    # Steps an earlier attempt of this task finished (Task.checkpoints): name -> result.
    checkpoints: dict[str, Any] = field(default_factory=dict)

    def checkpoint(self, name: str, value: Any) -> None:
        """Record a finished step for a resumed attempt; stop if the lease is gone."""
        from providers.base import CANCEL_LEASE_LOST, OperationCancelled
        from tasks.engine import transitions

        self.checkpoints[name] = value
        if not transitions.save_checkpoints(self.task.pk, token=self.task.lease_token, checkpoints=self.checkpoints):
            self.cancel.cancel(CANCEL_LEASE_LOST)
            raise OperationCancelled(CANCEL_LEASE_LOST)


class Operation:
    task_type: str = ""
    # Instance status after success (None: leave as is).
    success_status: str | None = None
    # Whether on_finished may release quota/capacity: the finish transition then
    # locks the owner's quota row first (the system's lock order).
    touches_quota: bool = False

    def run(self, ctx: ExecutionContext) -> None:
        raise NotImplementedError

    @property
    def busy_status(self) -> str | None:
        return INSTANCE_BUSY_STATUS.get(self.task_type)

    def on_running(self, task: Task, instance: Instance | None) -> None:
        if instance is not None and self.busy_status:
            instance.status = self.busy_status

    def on_finished(self, task: Task, instance: Instance | None, outcome: Outcome) -> None:
        if instance is None:
            return
        for name, value in outcome.instance_updates.items():
            setattr(instance, name, value)
        if outcome.status == COMPLETED:
            if outcome.instance_status:
                instance.status = outcome.instance_status
            elif self.success_status:
                instance.status = self.success_status
            instance.needs_reconcile = False
        elif outcome.ran:
            if outcome.instance_status:
                instance.status = outcome.instance_status
            else:
                # The operation stopped midway and nobody read the guest back:
                # say so, and let reconciliation find the truth.
                instance.status = InstanceStatus.UNKNOWN
                instance.needs_reconcile = True
