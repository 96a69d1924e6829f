"""Task and instance states: the one place that spells them.

Task state machine (DESIGN.md section 2)::

    pending ──► running ──► completed
       │           │──────► failed
       │           │──────► timeout
       │           │──────► pending (resumed: its worker was lost or handed it back)
       │           └──────► cancelling ──► cancelled
       │                         └───────► completed / failed / timeout (the truth wins)
       └──► cancelled

A pending task may also fail without running (its instance vanished, the provider
was deleted): pending -> failed. Terminal states never change again.
"""

from __future__ import annotations

from django.db import models
from django.utils.translation import gettext_lazy as _


class TaskStatus(models.TextChoices):
    PENDING = "pending", _("Pending")
    RUNNING = "running", _("Running")
    CANCELLING = "cancelling", _("Cancelling")
    COMPLETED = "completed", _("Completed")
    FAILED = "failed", _("Failed")
    CANCELLED = "cancelled", _("Cancelled")
    TIMEOUT = "timeout", _("Timed out")


def word(choices: type[models.TextChoices], value: str) -> str:
    """A state or type as a word inside a sentence, in the active language ("running", "正在运行")."""
    try:
        return str(choices(value).label).lower()
    except ValueError:
        return value


class TaskType(models.TextChoices):
    CREATE = "create", _("Create")
    START = "start", _("Start")
    STOP = "stop", _("Stop")
    RESTART = "restart", _("Restart")
    DELETE = "delete", _("Delete")
    RESET = "reset", _("Reset")
    RESET_PASSWORD = "reset-password", _("Reset password")
    CREATE_PORT = "create-port", _("Create port mapping")
    DELETE_PORT = "delete-port", _("Delete port mapping")


class InstanceStatus(models.TextChoices):
    CREATING = "creating", _("Creating")
    RUNNING = "running", _("Running")
    STOPPED = "stopped", _("Stopped")
    STARTING = "starting", _("Starting")
    STOPPING = "stopping", _("Stopping")
    RESTARTING = "restarting", _("Restarting")
    RESETTING = "resetting", _("Resetting")
    DELETING = "deleting", _("Deleting")
    ERROR = "error", _("Error")
    FAILED = "failed", _("Failed")  # create failed: nothing exists on the provider
    DELETED = "deleted", _("Deleted")
    UNKNOWN = "unknown", _("Unknown")


class ErrorCode(models.TextChoices):
    PROVIDER_ERROR = "provider_error", _("Provider error")
    PROVIDER_UNREACHABLE = "provider_unreachable", _("Provider unreachable")
    WORKER_LOST = "worker_lost", _("Worker lost")
    TIMEOUT = "timeout", _("Timed out")
    CANCELLED_BY_USER = "cancelled_by_user", _("Cancelled by its owner")
    CANCELLED_BY_ADMIN = "cancelled_by_admin", _("Cancelled by an administrator")
    FORCE_STOPPED = "force_stopped", _("Force-stopped by an administrator")
    QUOTA_EXCEEDED = "quota_exceeded", _("Quota exceeded")
    CAPACITY_EXCEEDED = "capacity_exceeded", _("Provider capacity exceeded")
    PORT_CONFLICT = "port_conflict", _("Port conflict")
    INSTANCE_GONE = "instance_gone", _("Instance no longer exists")
    PROVIDER_DISABLED = "provider_disabled", _("Provider disabled")
    VERIFY_FAILED = "verify_failed", _("Could not verify the result")
    INTERNAL_ERROR = "internal_error", _("Internal error")


PENDING = TaskStatus.PENDING.value
RUNNING = TaskStatus.RUNNING.value
CANCELLING = TaskStatus.CANCELLING.value
COMPLETED = TaskStatus.COMPLETED.value
FAILED = TaskStatus.FAILED.value
CANCELLED = TaskStatus.CANCELLED.value
TIMEOUT = TaskStatus.TIMEOUT.value

ALL_STATES: tuple[str, ...] = tuple(TaskStatus.values)
FINAL: frozenset[str] = frozenset({COMPLETED, FAILED, CANCELLED, TIMEOUT})
ACTIVE: frozenset[str] = frozenset({PENDING, RUNNING, CANCELLING})
# States in which a task holds one of its provider's slots.
EXECUTING: frozenset[str] = frozenset({RUNNING, CANCELLING})
CANCELLABLE: frozenset[str] = frozenset({PENDING, RUNNING})

# The one transition table: target -> allowed sources.
TRANSITIONS: dict[str, frozenset[str]] = {
    # Resumption: a running task whose worker was lost or handed it back at shutdown.
    PENDING: frozenset({RUNNING}),
    RUNNING: frozenset({PENDING}),
    CANCELLING: frozenset({RUNNING}),
    COMPLETED: frozenset({RUNNING, CANCELLING}),
    FAILED: frozenset({PENDING, RUNNING, CANCELLING}),
    TIMEOUT: frozenset({RUNNING, CANCELLING}),
    CANCELLED: frozenset({PENDING, RUNNING, CANCELLING}),
}


def allowed_sources(target: str) -> frozenset[str]:
    return TRANSITIONS.get(target, frozenset())


def can_transition(source: str, target: str) -> bool:
    return source in allowed_sources(target)


# Default timeouts in seconds (DESIGN.md section 4).
DEFAULT_TIMEOUTS: dict[str, int] = {
    TaskType.CREATE: 1800,
    TaskType.START: 300,
    TaskType.STOP: 300,
    TaskType.RESTART: 600,
    TaskType.DELETE: 600,
    TaskType.RESET: 1200,
    TaskType.RESET_PASSWORD: 300,
    TaskType.CREATE_PORT: 300,
    TaskType.DELETE_PORT: 300,
}

# Instance status while a task of that type runs (None: unchanged).
INSTANCE_BUSY_STATUS: dict[str, str | None] = {
    TaskType.CREATE: InstanceStatus.CREATING,
    TaskType.START: InstanceStatus.STARTING,
    TaskType.STOP: InstanceStatus.STOPPING,
    TaskType.RESTART: InstanceStatus.RESTARTING,
    TaskType.DELETE: InstanceStatus.DELETING,
    TaskType.RESET: InstanceStatus.RESETTING,
    TaskType.RESET_PASSWORD: None,
    TaskType.CREATE_PORT: None,
    TaskType.DELETE_PORT: None,
}

# Instance statuses from which a user may queue each operation.
ALLOWED_INSTANCE_STATUS: dict[str, frozenset[str]] = {
    TaskType.START: frozenset({InstanceStatus.STOPPED, InstanceStatus.ERROR, InstanceStatus.UNKNOWN}),
    TaskType.STOP: frozenset({InstanceStatus.RUNNING, InstanceStatus.ERROR, InstanceStatus.UNKNOWN}),
    TaskType.RESTART: frozenset(
        {InstanceStatus.RUNNING, InstanceStatus.STOPPED, InstanceStatus.ERROR, InstanceStatus.UNKNOWN}
    ),
    TaskType.DELETE: frozenset(
        {
            InstanceStatus.RUNNING,
            InstanceStatus.STOPPED,
            InstanceStatus.ERROR,
            InstanceStatus.UNKNOWN,
            InstanceStatus.FAILED,
        }
    ),
    TaskType.RESET: frozenset({InstanceStatus.RUNNING, InstanceStatus.STOPPED, InstanceStatus.ERROR}),
    TaskType.RESET_PASSWORD: frozenset({InstanceStatus.RUNNING}),
    TaskType.CREATE_PORT: frozenset({InstanceStatus.RUNNING, InstanceStatus.STOPPED}),
    TaskType.DELETE_PORT: frozenset({InstanceStatus.RUNNING, InstanceStatus.STOPPED, InstanceStatus.ERROR}),
}

# Instance statuses that mean the instance no longer holds anything.
INSTANCE_GONE: frozenset[str] = frozenset({InstanceStatus.DELETED, InstanceStatus.FAILED})
