"""The task system's data model.

The Task row is the only authority on a task's state (DESIGN.md section 1). Its
state only changes through tasks.engine.transitions, each change a compare-and-set
UPDATE that also writes a TaskEvent and changes the instance in the same
transaction. See tasks.engine.states for the state machine.
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from tasks import crypto
from tasks.engine.states import (
    DEFAULT_TIMEOUTS,
    ErrorCode,
    InstanceStatus,
    TaskStatus,
    TaskType,
)


class ProviderType(models.TextChoices):
    SIMULATED = "simulated", _("Simulated")
    LXD = "lxd", _("LXD")
    INCUS = "incus", _("Incus")
    PROXMOX = "proxmox", _("Proxmox VE")
    DOCKER = "docker", _("Docker")


class InstanceType(models.TextChoices):
    CONTAINER = "container", _("Container")
    VM = "vm", _("Virtual machine")


class Protocol(models.TextChoices):
    TCP = "tcp", _("TCP")
    UDP = "udp", _("UDP")
    BOTH = "both", _("TCP and UDP")


def provider_queue(provider_id: int) -> str:
    """The queue (django-q2 cluster name, broker key) of the provider with this id."""
    return f"provider-{provider_id}"


class Provider(models.Model):
    """A host (LXD, Incus, Proxmox VE, Docker or simulated) with its own task queue."""

    name = models.CharField(max_length=100, unique=True, verbose_name=_("name"))
    provider_type = models.CharField(
        max_length=20, choices=ProviderType.choices, default=ProviderType.SIMULATED, verbose_name=_("provider type")
    )
    enabled = models.BooleanField(default=True, verbose_name=_("enabled"))
    # Connection settings that are not secret (endpoint, node, socket path, TLS
    # fingerprints); secrets (tokens, client keys, passwords) live encrypted in
    # secrets_encrypted and are decrypted only when a driver is built.
    connection = models.JSONField(default=dict, blank=True, verbose_name=_("connection"))
    secrets_encrypted = models.TextField(blank=True, default="", editable=False, verbose_name=_("secrets encrypted"))

    # Concurrency: serial unless allow_concurrent_tasks; read at every admission.
    allow_concurrent_tasks = models.BooleanField(default=False, verbose_name=_("allow concurrent tasks"))
    max_concurrent_tasks = models.PositiveIntegerField(
        default=1, validators=[MinValueValidator(1), MaxValueValidator(256)], verbose_name=_("max concurrent tasks")
    )
    task_poll_interval = models.PositiveIntegerField(
        default=5,
        validators=[MinValueValidator(1), MaxValueValidator(3600)],
        help_text="seconds between admission sweeps",
        verbose_name=_("task poll interval"),
    )
    enable_task_polling = models.BooleanField(default=True, verbose_name=_("enable task polling"))

    # Health: set when a task failed because the provider could not be reached at
    # all (tasks.engine.health). Admission holds its queue, and the worker tier probes it,
    # until it answers again.
    unreachable_since = models.DateTimeField(null=True, blank=True, editable=False, verbose_name=_("unreachable since"))
    unreachable_error = models.CharField(
        max_length=500, blank=True, default="", editable=False, verbose_name=_("unreachable error")
    )
    probed_at = models.DateTimeField(null=True, blank=True, editable=False, verbose_name=_("probed at"))

    # Capacity: totals set by the operator, *_used kept by reservations.
    cpu_total = models.PositiveIntegerField(default=64, verbose_name=_("CPU total"))
    memory_total_mb = models.PositiveBigIntegerField(default=256 * 1024, verbose_name=_("Memory total (MB)"))
    disk_total_mb = models.PositiveBigIntegerField(default=4 * 1024 * 1024, verbose_name=_("Disk total (MB)"))
    max_containers = models.PositiveIntegerField(default=200, verbose_name=_("max containers"))
    max_vms = models.PositiveIntegerField(default=100, verbose_name=_("max vms"))
    cpu_used = models.PositiveIntegerField(default=0, editable=False, verbose_name=_("CPU used"))
    memory_used_mb = models.PositiveBigIntegerField(default=0, editable=False, verbose_name=_("Memory used (MB)"))
    disk_used_mb = models.PositiveBigIntegerField(default=0, editable=False, verbose_name=_("Disk used (MB)"))
    containers_used = models.PositiveIntegerField(default=0, editable=False, verbose_name=_("containers used"))
    vms_used = models.PositiveIntegerField(default=0, editable=False, verbose_name=_("vms used"))

    # Host ports available for mappings, and the block every new instance gets.
    port_range_start = models.PositiveIntegerField(
        default=20000, validators=[MinValueValidator(1), MaxValueValidator(65535)], verbose_name=_("port range start")
    )
    port_range_end = models.PositiveIntegerField(
        default=29999, validators=[MinValueValidator(1), MaxValueValidator(65535)], verbose_name=_("port range end")
    )
    default_port_block = models.PositiveIntegerField(
        default=5,
        validators=[MaxValueValidator(100)],
        help_text="host ports given to each new instance; the first maps SSH",
        verbose_name=_("default port block"),
    )

    created_at = models.DateTimeField(auto_now_add=True, verbose_name=_("created at"))
    updated_at = models.DateTimeField(auto_now=True, verbose_name=_("updated at"))

    class Meta:
        verbose_name = _("provider")
        verbose_name_plural = _("providers")
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def concurrency_limit(self) -> int:
        return max(1, self.max_concurrent_tasks) if self.allow_concurrent_tasks else 1

    @property
    def accepts_work(self) -> bool:
        """Admission may start its tasks: enabled, and not held as unreachable."""
        return self.enabled and self.unreachable_since is None

    @property
    def queue_name(self) -> str:
        """The django-q2 cluster name that serves this provider."""
        return provider_queue(self.pk)

    def get_secrets(self) -> dict:
        return crypto.decrypt_json(self.secrets_encrypted)

    def set_secrets(self, data: dict) -> None:
        self.secrets_encrypted = crypto.encrypt_json(data)


class UserQuota(models.Model):
    """Per-user limits and what the user's live instances and pending creates hold."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="quota", verbose_name=_("user")
    )
    max_instances = models.PositiveIntegerField(default=10, verbose_name=_("max instances"))
    max_cpu = models.PositiveIntegerField(default=16, verbose_name=_("Max CPU"))
    max_memory_mb = models.PositiveBigIntegerField(default=32 * 1024, verbose_name=_("Max memory (MB)"))
    max_disk_mb = models.PositiveBigIntegerField(default=500 * 1024, verbose_name=_("Max disk (MB)"))
    # Host ports of the user's live mappings, counted port by port (default blocks included).
    max_ports = models.PositiveIntegerField(default=50, verbose_name=_("max ports"))
    used_instances = models.PositiveIntegerField(default=0, editable=False, verbose_name=_("used instances"))
    used_cpu = models.PositiveIntegerField(default=0, editable=False, verbose_name=_("CPU used"))
    used_memory_mb = models.PositiveBigIntegerField(default=0, editable=False, verbose_name=_("Memory used (MB)"))
    used_disk_mb = models.PositiveBigIntegerField(default=0, editable=False, verbose_name=_("Disk used (MB)"))
    # Monthly traffic (received + sent) each of the user's instances may move, in GB
    # (10^9 bytes); empty: no limit. An instance over it is stopped (tasks.traffic_counters).
    max_traffic_gb = models.PositiveIntegerField(null=True, blank=True, verbose_name=_("Max traffic (GB)"))

    class Meta:
        verbose_name = _("user quota")
        verbose_name_plural = _("user quotas")

    def __str__(self) -> str:
        return f"quota of {self.user}"


class Instance(models.Model):
    """A container or VM on a provider. Rows are never deleted: status=deleted."""

    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False, verbose_name=_("UUID"))
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="instances", verbose_name=_("owner")
    )
    provider = models.ForeignKey(
        Provider, on_delete=models.PROTECT, related_name="instances", verbose_name=_("provider")
    )
    name = models.CharField(max_length=63, verbose_name=_("name"))
    # name while the instance lives, NULL once deleted or failed: unique per
    # provider so a deleted instance's name can be reused (NULLs never collide).
    live_name = models.CharField(max_length=63, null=True, blank=True, editable=False, verbose_name=_("live name"))
    instance_type = models.CharField(
        max_length=10, choices=InstanceType.choices, default=InstanceType.CONTAINER, verbose_name=_("instance type")
    )
    image = models.CharField(max_length=200, verbose_name=_("image"))
    status = models.CharField(
        max_length=20, choices=InstanceStatus.choices, default=InstanceStatus.CREATING, verbose_name=_("status")
    )
    cpu = models.PositiveIntegerField(default=1, verbose_name=_("CPU"))
    memory_mb = models.PositiveIntegerField(default=512, verbose_name=_("Memory (MB)"))
    disk_mb = models.PositiveIntegerField(default=10240, verbose_name=_("Disk (MB)"))
    bandwidth_mbps = models.PositiveIntegerField(default=100, verbose_name=_("Bandwidth (Mbit/s)"))
    addresses = models.JSONField(default=list, blank=True, verbose_name=_("addresses"))
    ssh_port = models.PositiveIntegerField(null=True, blank=True, verbose_name=_("SSH port"))
    # Provider-native handle (LXD name, Proxmox node/vmid, Docker id), set by create.
    provider_ref = models.JSONField(default=dict, blank=True, verbose_name=_("provider ref"))
    # The one pending or running task: a unique column, so the database itself
    # refuses a second active task (set by compare-and-set where it is NULL).
    active_task = models.OneToOneField(
        "Task",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="active_for",
        editable=False,
        verbose_name=_("active task"),
    )
    # True while the instance's quota and provider capacity are counted.
    holds_resources = models.BooleanField(default=False, editable=False, verbose_name=_("holds resources"))
    # Set when a task ended without a trustworthy final state (worker lost, force-stop).
    needs_reconcile = models.BooleanField(default=False, verbose_name=_("needs reconcile"))
    created_at = models.DateTimeField(auto_now_add=True, verbose_name=_("created at"))
    updated_at = models.DateTimeField(auto_now=True, verbose_name=_("updated at"))
    deleted_at = models.DateTimeField(null=True, blank=True, verbose_name=_("deleted at"))

    class Meta:
        verbose_name = _("instance")
        verbose_name_plural = _("instances")
        constraints = [
            models.UniqueConstraint(fields=["provider", "live_name"], name="instance_unique_live_name"),
        ]
        indexes = [
            # user instance list: WHERE owner_id=? ORDER BY created_at DESC
            models.Index(fields=["owner", "-created_at"], name="instance_owner_created"),
            # admin/provider views and capacity checks: WHERE provider_id=? AND status IN (...)
            models.Index(fields=["provider", "status"], name="instance_provider_status"),
        ]

    def __str__(self) -> str:
        # The name alone: operators read it in links and titles ("web-1", not "web-1 (2)").
        return self.name

    @property
    def guest_name(self) -> str:
        """Deterministic name of the guest on the provider: retries converge on it."""
        return f"vps-{self.uuid.hex[:12]}"


def effective_timeout(task_type: str, timeout_seconds: int) -> int:
    """A task's timeout: its own, else its type's default (600 s for a type without one)."""
    return timeout_seconds or DEFAULT_TIMEOUTS.get(task_type, 600)


class Task(models.Model):
    """One operation on one instance.

    State machine (tasks/engine/states.py)::

        pending ──► running ──► completed | failed | timeout
           │           └──► cancelling ──► cancelled | completed | failed | timeout
           └──► cancelled | failed

    Admission (tasks.engine.dispatch) gives a pending task a lease token and an
    ``admitted_at`` when its provider has a free slot, then sends a job carrying
    (task id, token). The worker's claim is pending+token -> running; its later
    writes name the token too, so a revoked lease (force-stop, recovery) fences
    off a late worker.
    """

    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False, verbose_name=_("UUID"))
    task_type = models.CharField(max_length=20, choices=TaskType.choices, verbose_name=_("task type"))
    status = models.CharField(
        max_length=12, choices=TaskStatus.choices, default=TaskStatus.PENDING, editable=False, verbose_name=_("status")
    )
    progress = models.PositiveSmallIntegerField(default=0, editable=False, verbose_name=_("progress"))
    status_message = models.CharField(
        max_length=255, blank=True, default="", editable=False, verbose_name=_("status message")
    )
    error_code = models.CharField(
        max_length=40, choices=ErrorCode.choices, blank=True, default="", editable=False, verbose_name=_("error code")
    )
    error_message = models.TextField(blank=True, default="", editable=False, verbose_name=_("error message"))
    cancel_reason = models.CharField(
        max_length=500, blank=True, default="", editable=False, verbose_name=_("cancel reason")
    )
    # Operation parameters and results; never secrets.
    task_data = models.JSONField(default=dict, blank=True, editable=False, verbose_name=_("task data"))

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="tasks", verbose_name=_("owner")
    )
    initiator = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="initiated_tasks",
        verbose_name=_("initiator"),
    )
    provider = models.ForeignKey(Provider, on_delete=models.PROTECT, related_name="tasks", verbose_name=_("provider"))
    instance = models.ForeignKey(
        Instance, on_delete=models.PROTECT, null=True, blank=True, related_name="tasks", verbose_name=_("instance")
    )
    port_mapping = models.ForeignKey(
        "PortMapping",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="tasks",
        editable=False,
        verbose_name=_("port mapping"),
    )
    timeout_seconds = models.PositiveIntegerField(default=0, verbose_name=_("timeout seconds"))

    created_at = models.DateTimeField(default=timezone.now, editable=False, verbose_name=_("created at"))
    admitted_at = models.DateTimeField(null=True, blank=True, editable=False, verbose_name=_("admitted at"))
    # When its job was last sent (admission, or a re-send of a job nobody claimed):
    # admitted_at stays the admission time, so admission order remains visible.
    dispatched_at = models.DateTimeField(null=True, blank=True, editable=False, verbose_name=_("dispatched at"))
    started_at = models.DateTimeField(null=True, blank=True, editable=False, verbose_name=_("started at"))
    completed_at = models.DateTimeField(null=True, blank=True, editable=False, verbose_name=_("completed at"))

    # Lease: who runs it, the fencing token, and until when the claim holds.
    lease_token = models.CharField(max_length=32, blank=True, default="", editable=False, verbose_name=_("lease token"))
    lease_expires_at = models.DateTimeField(null=True, blank=True, editable=False, verbose_name=_("lease expires at"))
    heartbeat_at = models.DateTimeField(null=True, blank=True, editable=False, verbose_name=_("heartbeat at"))
    worker = models.CharField(max_length=200, blank=True, default="", editable=False, verbose_name=_("worker"))
    attempt_count = models.PositiveIntegerField(default=0, editable=False, verbose_name=_("attempt count"))
    # Provider steps that change something each time they run (a reinstall, a reboot),
    # recorded once done, with what they returned: a resumed attempt skips them
    # (tasks.operations.steps.Steps.call, ``once``). Written under the lease token.
    checkpoints = models.JSONField(default=dict, blank=True, editable=False, verbose_name=_("checkpoints"))
    # "Stopping" hold: set when the task was ended (force-stop, timeout sweep, recovery)
    # while its worker may still be inside a provider call: until this time (the end of
    # the revoked lease, database clock) or until that worker reports its exit, the task
    # keeps its provider slot and its instance (Instance.active_task), though it is
    # terminal for its user. NULL: nothing held.
    held_until = models.DateTimeField(null=True, blank=True, editable=False, verbose_name=_("held until"))
    dispatch_count = models.PositiveIntegerField(default=0, editable=False, verbose_name=_("dispatch count"))
    # The task this one asks again (POST .../retry/): same type, instance and parameters.
    retry_of = models.ForeignKey(
        "self",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="retries",
        editable=False,
        verbose_name=_("retry of"),
    )

    class Meta:
        verbose_name = _("task")
        verbose_name_plural = _("tasks")
        indexes = [
            # user task list: WHERE owner_id=? [AND status IN ..] ORDER BY created_at DESC, id DESC
            models.Index(fields=["owner", "-created_at", "-id"], name="task_owner_created"),
            # admission FIFO and slot count: WHERE provider_id=? AND status=? ORDER BY created_at, id;
            # admin list filtered by provider+status, ordered by created_at
            models.Index(fields=["provider", "status", "created_at", "id"], name="task_provider_status_created"),
            # admission: slots held (status=pending AND admitted_at IS NOT NULL is a range of
            # at most the limit), anyone waiting (admitted_at IS NULL), and the oldest waiting
            # in FIFO order without a sort, however long the backlog
            models.Index(fields=["provider", "status", "admitted_at", "created_at", "id"], name="task_admission"),
            # admin list filtered by status: WHERE status IN (..) ORDER BY created_at DESC
            models.Index(fields=["status", "-created_at", "-id"], name="task_status_created"),
            # admin list default ordering: ORDER BY created_at DESC, id DESC
            models.Index(fields=["-created_at", "-id"], name="task_created"),
            # recovery sweep: WHERE status IN (running, cancelling) AND lease_expires_at < now
            models.Index(fields=["status", "lease_expires_at"], name="task_status_lease"),
            # stopping holds: the slot count (provider_id=? AND held_until IS NOT NULL) and
            # the sweep's release of expired ones; only ended tasks whose worker may still run
            models.Index(fields=["held_until", "provider"], name="task_held"),
            # instance filter and instance history: WHERE instance_id=? ORDER BY created_at DESC, id DESC
            # (the id too: InnoDB's implicit id is ascending, so the tie-break would sort)
            models.Index(fields=["instance", "-created_at", "-id"], name="task_instance_created_id"),
            # stats: durations and error rate of finished tasks: WHERE completed_at >= ? GROUP BY task_type, status;
            # the live part of the counts, by state and type and by owner and state, without reading rows
            models.Index(fields=["completed_at", "task_type", "status", "owner"], name="task_completed_type_owner"),
            # the console's "finished in the last hour" list: WHERE status = ? AND completed_at >= ?
            # ORDER BY completed_at DESC, id DESC, one final status at a time (tasks.admin.triage)
            models.Index(fields=["status", "-completed_at", "-id"], name="task_status_completed"),
        ]

    def __str__(self) -> str:
        return f"task {self.pk} {self.task_type} [{self.status}]"

    @property
    def effective_timeout(self) -> int:
        return effective_timeout(self.task_type, self.timeout_seconds)

    @property
    def is_final(self) -> bool:
        from tasks.engine.states import FINAL

        return self.status in FINAL

    @property
    def deadline(self):
        if self.started_at is None:
            return None
        return self.started_at + timezone.timedelta(seconds=self.effective_timeout)

    # Guarded state changes, named for their target (each one compare-and-set in
    # tasks.engine.transitions; False means another actor got there first).
    def set_running(self, token: str, worker: str) -> bool:
        from tasks.engine import transitions

        return transitions.claim(self.pk, token=token, worker=worker)

    def set_cancelling(self, actor: str, reason: str = "", by_admin: bool = False) -> bool:
        from tasks.engine import transitions

        return transitions.request_cancel(self.pk, actor=actor, reason=reason, by_admin=by_admin)

    def set_completed(self, token: str | None, actor: str, **kwargs) -> bool:
        from tasks.engine import transitions

        return transitions.finish(self.pk, TaskStatus.COMPLETED, token=token, actor=actor, **kwargs)

    def set_failed(self, token: str | None, actor: str, error_code: str, error_message: str = "", **kwargs) -> bool:
        from tasks.engine import transitions

        return transitions.finish(
            self.pk,
            TaskStatus.FAILED,
            token=token,
            actor=actor,
            error_code=error_code,
            error_message=error_message,
            **kwargs,
        )

    def set_timeout(self, token: str | None, actor: str, **kwargs) -> bool:
        from tasks.engine import transitions

        return transitions.finish(self.pk, TaskStatus.TIMEOUT, token=token, actor=actor, **kwargs)

    def set_cancelled(self, token: str | None, actor: str, **kwargs) -> bool:
        from tasks.engine import transitions

        return transitions.finish(self.pk, TaskStatus.CANCELLED, token=token, actor=actor, **kwargs)


class TaskEvent(models.Model):
    """Audit trail: one row per transition (kind=transition) or operation step (kind=step)."""

    KIND_TRANSITION = "transition"
    KIND_STEP = "step"

    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="events", verbose_name=_("task"))
    kind = models.CharField(max_length=12, default=KIND_TRANSITION, verbose_name=_("kind"))
    from_status = models.CharField(max_length=12, blank=True, default="", verbose_name=_("from status"))
    to_status = models.CharField(max_length=12, verbose_name=_("to status"))
    actor = models.CharField(max_length=200, verbose_name=_("actor"))
    reason = models.CharField(max_length=500, blank=True, default="", verbose_name=_("reason"))
    progress = models.PositiveSmallIntegerField(default=0, verbose_name=_("progress"))
    message = models.TextField(blank=True, default="", verbose_name=_("message"))
    at = models.DateTimeField(default=timezone.now, verbose_name=_("at"))

    class Meta:
        verbose_name = _("task event")
        verbose_name_plural = _("task events")
        ordering = ["at", "id"]
        indexes = [
            # task timeline: WHERE task_id=? ORDER BY at, id
            models.Index(fields=["task", "at", "id"], name="taskevent_task_at"),
            # event log filtered by kind and/or to-status, newest first by id (admin; a
            # filter on one of the two reads one branch per value of the other)
            models.Index(fields=["kind", "to_status", "id"], name="taskevent_kind_status"),
        ]

    def __str__(self) -> str:
        return f"{self.task_id}: {self.from_status or '-'} -> {self.to_status} by {self.actor}"


class PortMapping(models.Model):
    """Host port(s) on a provider forwarded to guest port(s) of an instance.

    No two live mappings of one provider overlap on host ports for a protocol
    ("both" counts as tcp and udp); creation checks it under the provider row lock.
    """

    STATUS_PENDING = "pending"
    STATUS_ACTIVE = "active"
    STATUS_DELETING = "deleting"
    STATUS_DELETED = "deleted"
    STATUS_FAILED = "failed"
    STATUS_CHOICES = [
        (STATUS_PENDING, _("Pending")),
        (STATUS_ACTIVE, _("Active")),
        (STATUS_DELETING, _("Deleting")),
        (STATUS_DELETED, _("Deleted")),
        (STATUS_FAILED, _("Failed")),
    ]
    LIVE_STATUSES = (STATUS_PENDING, STATUS_ACTIVE, STATUS_DELETING)

    instance = models.ForeignKey(
        Instance, on_delete=models.PROTECT, related_name="port_mappings", verbose_name=_("instance")
    )
    provider = models.ForeignKey(
        Provider, on_delete=models.PROTECT, related_name="port_mappings", verbose_name=_("provider")
    )
    protocol = models.CharField(
        max_length=4, choices=Protocol.choices, default=Protocol.TCP, verbose_name=_("protocol")
    )
    host_port_start = models.PositiveIntegerField(
        validators=[MinValueValidator(1), MaxValueValidator(65535)], verbose_name=_("host port start")
    )
    host_port_end = models.PositiveIntegerField(
        validators=[MinValueValidator(1), MaxValueValidator(65535)], verbose_name=_("host port end")
    )
    guest_port_start = models.PositiveIntegerField(
        validators=[MinValueValidator(1), MaxValueValidator(65535)], verbose_name=_("guest port start")
    )
    guest_port_end = models.PositiveIntegerField(
        validators=[MinValueValidator(1), MaxValueValidator(65535)], verbose_name=_("guest port end")
    )
    is_ssh = models.BooleanField(default=False, verbose_name=_("SSH"))
    description = models.CharField(max_length=100, blank=True, default="", verbose_name=_("description"))
    status = models.CharField(max_length=10, choices=STATUS_CHOICES, default=STATUS_PENDING, verbose_name=_("status"))
    created_at = models.DateTimeField(auto_now_add=True, verbose_name=_("created at"))
    updated_at = models.DateTimeField(auto_now=True, verbose_name=_("updated at"))

    class Meta:
        verbose_name = _("port mapping")
        verbose_name_plural = _("port mappings")
        indexes = [
            # overlap check: WHERE provider_id=? AND status IN (live) AND host_port_start<=? AND host_port_end>=?
            models.Index(fields=["provider", "status", "host_port_start"], name="port_provider_status_start"),
            # instance's mappings: WHERE instance_id=?
            models.Index(fields=["instance", "status"], name="port_instance_status"),
        ]
        constraints = [
            models.CheckConstraint(condition=Q(host_port_end__gte=models.F("host_port_start")), name="port_host_range"),
            models.CheckConstraint(
                condition=Q(guest_port_end__gte=models.F("guest_port_start")), name="port_guest_range"
            ),
        ]

    def __str__(self) -> str:
        if self.host_port_start == self.host_port_end:
            return f"{self.protocol} {self.host_port_start}->{self.guest_port_start}"
        return f"{self.protocol} {self.host_port_start}-{self.host_port_end}->{self.guest_port_start}-{self.guest_port_end}"

    @property
    def protocols(self) -> tuple[str, ...]:
        return ("tcp", "udp") if self.protocol == Protocol.BOTH else (self.protocol,)


class BusyHostPort(models.Model):
    """A host port of a provider that something outside the panel holds.

    Recorded when the host refused to bind it ("address already in use": a program
    listening on it, or one of the host's outgoing connections using it as its
    local port). Automatic allocation skips it until ``expires_at``; a port asked
    for by number is still tried. Not a mapping: it never counts against a quota.
    """

    provider = models.ForeignKey(
        Provider, on_delete=models.CASCADE, related_name="busy_host_ports", verbose_name=_("provider")
    )
    port = models.PositiveIntegerField(
        validators=[MinValueValidator(1), MaxValueValidator(65535)], verbose_name=_("host port")
    )
    message = models.CharField(max_length=300, blank=True, default="", verbose_name=_("host's message"))
    seen_at = models.DateTimeField(default=timezone.now, verbose_name=_("last seen busy"))
    expires_at = models.DateTimeField(verbose_name=_("skipped until"))

    class Meta:
        verbose_name = _("busy host port")
        verbose_name_plural = _("busy host ports")
        constraints = [models.UniqueConstraint(fields=["provider", "port"], name="busy_port_provider_port")]

    def __str__(self) -> str:
        return f"{self.provider_id}:{self.port}"


class TaskSecret(models.Model):
    """A password produced by a task, encrypted, readable once by the task's owner."""

    task = models.OneToOneField(Task, on_delete=models.CASCADE, related_name="secret", verbose_name=_("task"))
    ciphertext = models.TextField(blank=True, default="", verbose_name=_("ciphertext"))
    created_at = models.DateTimeField(default=timezone.now, verbose_name=_("created at"))
    read_at = models.DateTimeField(null=True, blank=True, verbose_name=_("read at"))
    expires_at = models.DateTimeField(verbose_name=_("expires at"))

    class Meta:
        verbose_name = _("task secret")
        verbose_name_plural = _("task secrets")

    def __str__(self) -> str:
        return f"secret of task {self.task_id}"


class Worker(models.Model):
    """A live worker process (one django-q2 worker of one queue, or a supervisor)."""

    name = models.CharField(max_length=200, unique=True, verbose_name=_("name"))  # node:pid
    node = models.CharField(max_length=100, verbose_name=_("node"))
    host = models.CharField(max_length=200, verbose_name=_("host"))
    pid = models.PositiveIntegerField(verbose_name=_("PID"))
    queue = models.CharField(max_length=100, verbose_name=_("queue"))
    role = models.CharField(max_length=20, default="worker", verbose_name=_("role"))  # worker | supervisor
    started_at = models.DateTimeField(default=timezone.now, verbose_name=_("started at"))
    last_heartbeat = models.DateTimeField(default=timezone.now, verbose_name=_("last heartbeat"))
    current_task = models.ForeignKey(
        Task, on_delete=models.SET_NULL, null=True, blank=True, related_name="+", verbose_name=_("current task")
    )
    tasks_run = models.PositiveIntegerField(default=0, verbose_name=_("tasks run"))
    draining = models.BooleanField(default=False, verbose_name=_("draining"))

    class Meta:
        verbose_name = _("worker")
        verbose_name_plural = _("workers")
        indexes = [
            # live workers: WHERE last_heartbeat >= ?
            models.Index(fields=["last_heartbeat"], name="worker_heartbeat"),
        ]

    def __str__(self) -> str:
        return self.name


class InstanceTraffic(models.Model):
    """Bytes an instance received and sent in one calendar month (UTC), from the accounting samples.

    ``last_rx``/``last_tx`` are the raw cumulative counters of the last sample and
    ``sampled_at`` its time; they matter on the newest row of an instance, where
    the next sample's difference starts (tasks.traffic_counters).
    """

    instance = models.ForeignKey(Instance, on_delete=models.CASCADE, related_name="traffic", verbose_name=_("instance"))
    period = models.DateField(help_text="first day of the month (UTC)", verbose_name=_("period"))
    rx_bytes = models.PositiveBigIntegerField(default=0, verbose_name=_("rx bytes"))
    tx_bytes = models.PositiveBigIntegerField(default=0, verbose_name=_("tx bytes"))
    last_rx = models.PositiveBigIntegerField(default=0, verbose_name=_("last rx"))
    last_tx = models.PositiveBigIntegerField(default=0, verbose_name=_("last tx"))
    sampled_at = models.DateTimeField(null=True, blank=True, verbose_name=_("sampled at"))

    class Meta:
        verbose_name = _("instance traffic")
        verbose_name_plural = _("instance traffic")
        constraints = [
            models.UniqueConstraint(fields=["instance", "period"], name="traffic_instance_period"),
        ]
        indexes = [
            # over-limit check: WHERE period=? (the month's rows)
            models.Index(fields=["period", "instance"], name="traffic_period_instance"),
        ]

    def __str__(self) -> str:
        return f"traffic of {self.instance_id} in {self.period:%Y-%m}"


class TaskDeletions(models.Model):
    """How many tasks were ever deleted (one row, id 1).

    Statistics keep an aggregate of finished tasks per process (tasks.stats);
    finished tasks never change, so only a deletion can make it wrong. Every
    deletion adds to this count in its own transaction, and a kept aggregate
    built at another count is rebuilt.
    """

    deleted = models.PositiveBigIntegerField(default=0, verbose_name=_("deleted"))

    class Meta:
        verbose_name = _("task deletions")
        verbose_name_plural = _("task deletions")

    def __str__(self) -> str:
        return f"{self.deleted} task(s) deleted"

    @classmethod
    def add(cls, n: int) -> None:
        """Count ``n`` deleted tasks; call inside the transaction that deletes them."""
        if n and not cls.objects.filter(pk=1).update(deleted=models.F("deleted") + n):
            _row, created = cls.objects.get_or_create(pk=1, defaults={"deleted": n})
            if not created:  # another deleter created it meanwhile
                cls.objects.filter(pk=1).update(deleted=models.F("deleted") + n)


class Webhook(models.Model):
    """A user's endpoint told about their tasks (tasks.webhooks delivers)."""

    EVENTS = ("task.started", "task.completed", "task.failed", "task.timeout", "task.cancelled")

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="webhooks")
    url = models.CharField(max_length=500)
    events = models.JSONField(default=list)
    # The HMAC key, encrypted at rest like every secret (tasks.crypto).
    secret_encrypted = models.TextField(editable=False)
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        indexes = [models.Index(fields=["owner", "enabled"], name="webhook_owner_enabled")]

    def __str__(self) -> str:
        return f"webhook {self.pk} of {self.owner_id}: {self.url}"

    @property
    def secret(self) -> str:
        return crypto.decrypt(self.secret_encrypted)

    @secret.setter
    def secret(self, value: str) -> None:
        self.secret_encrypted = crypto.encrypt(value)


class WebhookDelivery(models.Model):
    """One event for one webhook: its exact body, retried with backoff until delivered or given up."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
    STATUS_CHOICES = [(PENDING, "Pending"), (DELIVERED, "Delivered"), (FAILED, "Failed")]

    webhook = models.ForeignKey(Webhook, on_delete=models.CASCADE, related_name="deliveries")
    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="+")
    # The TaskEvent that caused it: unique per webhook, so a second scan never doubles it.
    event_id = models.BigIntegerField()
    event = models.CharField(max_length=30)
    body = models.TextField()
    status = models.CharField(max_length=10, choices=STATUS_CHOICES, default=PENDING)
    attempts = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)
    next_attempt_at = models.DateTimeField(default=timezone.now)
    # A deliverer holds the row until then (another machine skips it meanwhile).
    locked_until = models.DateTimeField(null=True, blank=True)
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    last_response_code = models.PositiveIntegerField(null=True, blank=True)
    last_error = models.CharField(max_length=500, blank=True, default="")
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "webhook deliveries"
        constraints = [
            models.UniqueConstraint(fields=["webhook", "event_id"], name="webhook_delivery_once"),
        ]
        indexes = [
            # the deliverer: WHERE status='pending' AND next_attempt_at <= now ORDER BY next_attempt_at
            models.Index(fields=["status", "next_attempt_at"], name="webhook_delivery_due"),
        ]

    def __str__(self) -> str:
        return f"{self.event} of task {self.task_id} to webhook {self.webhook_id} [{self.status}]"


class WebhookAttempt(models.Model):
    """One HTTP attempt of a delivery (the admin shows them)."""

    delivery = models.ForeignKey(WebhookDelivery, on_delete=models.CASCADE, related_name="attempt_log")
    at = models.DateTimeField(default=timezone.now)
    ok = models.BooleanField(default=False)
    response_code = models.PositiveIntegerField(null=True, blank=True)
    error = models.CharField(max_length=500, blank=True, default="")
    duration_ms = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["at", "id"]

    def __str__(self) -> str:
        return f"attempt of delivery {self.delivery_id} at {self.at}: {self.response_code or self.error}"


class WebhookCursor(models.Model):
    """Where the webhook scan of TaskEvent rows stands (one row, id 1; locked by the scanner)."""

    last_event_id = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"webhook cursor at event {self.last_event_id}"
