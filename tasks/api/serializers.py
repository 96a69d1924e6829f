"""Representations of tasks, instances, port mappings, providers and workers (API.md).

Serializers only shape data. Who may see a row is decided in the views'
get_queryset, every state change goes through tasks.services, and the
per-request context carries ``admin`` (which view family asks) and ``queue``
(a tasks.api.queueinfo.QueueInfo shared by the rows of one response).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.utils import timezone
from django.utils.translation import gettext as _
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from tasks import messages, traffic_counters
from tasks.api.queueinfo import EMPTY as NO_QUEUE_INFO
from tasks.api.queueinfo import QueueInfo
from tasks.engine.states import CANCELLABLE, FINAL, RUNNING
from tasks.models import (
    Instance,
    InstanceType,
    PortMapping,
    Protocol,
    Provider,
    Task,
    TaskEvent,
    Webhook,
    WebhookDelivery,
    Worker,
)
from tasks.ports import MAX_RANGE
from tasks.services import actor_role, user_may_cancel

MAX_ID = 2**63 - 1
MAX_INT32 = 2**31 - 1
REDACTED = "[redacted]"
SECRET_MARKERS = ("password", "secret", "token", "key")


def redact(value: Any) -> Any:
    """A copy of task data with the value of every secret-looking key replaced."""
    if isinstance(value, dict):
        return {
            k: (REDACTED if any(m in str(k).lower() for m in SECRET_MARKERS) else redact(v)) for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


# --- small references ---------------------------------------------------------------


class UserRefSerializer(serializers.Serializer):
    id = serializers.IntegerField(allow_null=True)
    username = serializers.CharField(allow_null=True)


class ProviderRefSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    type = serializers.CharField(source="provider_type")


class InstanceRefSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    instance_type = serializers.CharField()


class TaskEventSerializer(serializers.ModelSerializer):
    actor = serializers.SerializerMethodField(
        help_text="who made the change: in admin views the full actor (`user:<name>`, `admin:<name>`, "
        "`worker:<host>:<pid>`, `system:<job>`); users see a role: `you`, `operator` or `system`"
    )

    class Meta:
        model = TaskEvent
        fields = ["from_status", "to_status", "actor", "reason", "progress", "message", "at", "kind"]

    def to_representation(self, event: TaskEvent) -> dict:
        data = super().to_representation(event)
        data["message"] = messages.translate(data["message"])  # stored in English (tasks/messages.py)
        return data

    @extend_schema_field(OpenApiTypes.STR)
    def get_actor(self, event: TaskEvent) -> str:
        # Users never learn a staff member's name or a worker's host and pid (API.md).
        return event.actor if self.context.get("admin") else actor_role(event.actor)


# --- tasks ----------------------------------------------------------------------------


class TaskSerializer(serializers.ModelSerializer):
    """A task as its owner sees it (list rows)."""

    provider = ProviderRefSerializer(read_only=True)
    instance = InstanceRefSerializer(read_only=True, allow_null=True)
    user = UserRefSerializer(source="owner", read_only=True)
    initiator = serializers.SerializerMethodField()
    timeout_seconds = serializers.IntegerField(source="effective_timeout", read_only=True)
    error_code = serializers.CharField(
        read_only=True,
        help_text="machine-readable reason of a failure or cancel (tasks.engine.states.ErrorCode); empty if none",
    )
    remaining_seconds = serializers.SerializerMethodField()
    can_cancel = serializers.SerializerMethodField()
    queue_position = serializers.SerializerMethodField()
    estimated_wait_seconds = serializers.SerializerMethodField()
    blocked_reason = serializers.SerializerMethodField()
    attempt = serializers.SerializerMethodField()
    retry_of = serializers.PrimaryKeyRelatedField(
        read_only=True, allow_null=True, help_text="the task this one asks again (POST .../retry/), or null"
    )

    class Meta:
        model = Task
        fields = [
            "id",
            "uuid",
            "task_type",
            "status",
            "progress",
            "status_message",
            "error_code",
            "error_message",
            "cancel_reason",
            "provider",
            "instance",
            "user",
            "initiator",
            "created_at",
            "started_at",
            "completed_at",
            "timeout_seconds",
            "remaining_seconds",
            "can_cancel",
            "queue_position",
            "estimated_wait_seconds",
            "blocked_reason",
            "attempt",
            "retry_of",
        ]
        read_only_fields = fields

    @extend_schema_field(serializers.IntegerField(min_value=1))
    def get_attempt(self, task: Task) -> int:
        """1, more after a resumption (the claim counts attempts)."""
        return max(1, task.attempt_count)

    def _queue(self, task: Task) -> dict:
        if task.status in FINAL:
            return NO_QUEUE_INFO
        queue = self.context.get("queue")
        if queue is None:
            queue = self.context["queue"] = QueueInfo()
        return queue.for_task(task)

    @extend_schema_field(UserRefSerializer(allow_null=True))
    def get_initiator(self, task: Task) -> dict | None:
        if task.initiator_id is None:
            return None
        if self.context.get("admin") or task.initiator_id == task.owner_id:
            return {"id": task.initiator_id, "username": task.initiator.get_username()}
        # Users learn that staff acted on their instance, not who.
        return {"id": None, "username": "staff"}

    @extend_schema_field(serializers.IntegerField(allow_null=True, min_value=0))
    def get_remaining_seconds(self, task: Task) -> int | None:
        if task.status != RUNNING or task.started_at is None:
            return None
        now = self.context.get("now") or timezone.now()
        return max(0, int((task.deadline - now).total_seconds()))

    @extend_schema_field(OpenApiTypes.BOOL)
    def get_can_cancel(self, task: Task) -> bool:
        if self.context.get("admin"):
            return task.status in CANCELLABLE
        return user_may_cancel(task)

    @extend_schema_field(serializers.IntegerField(allow_null=True, min_value=0))
    def get_queue_position(self, task: Task) -> int | None:
        return self._queue(task)["queue_position"]

    @extend_schema_field(serializers.FloatField(allow_null=True, min_value=0))
    def get_estimated_wait_seconds(self, task: Task) -> float | None:
        return self._queue(task)["estimated_wait_seconds"]

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_blocked_reason(self, task: Task) -> str | None:
        return self._queue(task)["blocked_reason"]

    def to_representation(self, task: Task) -> dict:
        data = super().to_representation(task)
        # Stored in English by the workers, shown in the reader's language (tasks/messages.py).
        for name in ("status_message", "error_message"):
            if name in data:
                data[name] = messages.translate(data[name])
        return data


class TaskDetailSerializer(TaskSerializer):
    """One task with its timeline."""

    events = TaskEventSerializer(many=True, read_only=True)

    class Meta(TaskSerializer.Meta):
        fields = [*TaskSerializer.Meta.fields, "events"]
        read_only_fields = fields


class AdminTaskSerializer(TaskSerializer):
    """A task as operators see it: who asked, and whether force-stop applies."""

    can_force_stop = serializers.SerializerMethodField()

    class Meta(TaskSerializer.Meta):
        fields = [*TaskSerializer.Meta.fields, "can_force_stop", "worker", "attempt_count"]
        read_only_fields = fields

    @extend_schema_field(OpenApiTypes.BOOL)
    def get_can_force_stop(self, task: Task) -> bool:
        return task.status not in FINAL


class AdminTaskDetailSerializer(AdminTaskSerializer):
    """One task with its timeline, lease and task data (secrets redacted)."""

    events = TaskEventSerializer(many=True, read_only=True)
    task_data = serializers.SerializerMethodField()

    class Meta(AdminTaskSerializer.Meta):
        fields = [
            *AdminTaskSerializer.Meta.fields,
            "admitted_at",
            "heartbeat_at",
            "lease_expires_at",
            "dispatch_count",
            "task_data",
            "events",
        ]
        read_only_fields = fields

    @extend_schema_field(OpenApiTypes.OBJECT)
    def get_task_data(self, task: Task) -> dict:
        return redact(task.task_data or {})


# --- instances and ports -----------------------------------------------------------------


class PortMappingSerializer(serializers.ModelSerializer):
    class Meta:
        model = PortMapping
        fields = [
            "id",
            "protocol",
            "host_port_start",
            "host_port_end",
            "guest_port_start",
            "guest_port_end",
            "is_ssh",
            "description",
            "status",
            "created_at",
        ]
        read_only_fields = fields


class ResourcesSerializer(serializers.Serializer):
    cpu = serializers.IntegerField()
    memory_mb = serializers.IntegerField()
    disk_mb = serializers.IntegerField()
    bandwidth_mbps = serializers.IntegerField()


class TrafficSerializer(serializers.Serializer):
    period = serializers.CharField(help_text="the calendar month (UTC), YYYY-MM")
    rx_bytes = serializers.IntegerField(help_text="bytes received this month")
    tx_bytes = serializers.IntegerField(help_text="bytes sent this month")


class InstanceSerializer(serializers.ModelSerializer):
    provider = ProviderRefSerializer(read_only=True)
    traffic = serializers.SerializerMethodField()
    resources = serializers.SerializerMethodField()
    ports = serializers.SerializerMethodField()
    active_task = serializers.IntegerField(source="active_task_id", read_only=True, allow_null=True)
    addresses = serializers.JSONField(read_only=True)

    class Meta:
        model = Instance
        fields = [
            "id",
            "uuid",
            "name",
            "instance_type",
            "image",
            "status",
            "provider",
            "resources",
            "ports",
            "active_task",
            "addresses",
            "ssh_port",
            "traffic",
            "needs_reconcile",
            "created_at",
            "updated_at",
            "deleted_at",
        ]
        read_only_fields = fields

    @extend_schema_field(ResourcesSerializer)
    def get_resources(self, instance: Instance) -> dict:
        return {
            "cpu": instance.cpu,
            "memory_mb": instance.memory_mb,
            "disk_mb": instance.disk_mb,
            "bandwidth_mbps": instance.bandwidth_mbps,
        }

    @extend_schema_field(TrafficSerializer)
    def get_traffic(self, instance: Instance) -> dict:
        # The views prefetch this month's row into ``traffic_this_month``.
        return traffic_counters.current(instance)

    @extend_schema_field(PortMappingSerializer(many=True))
    def get_ports(self, instance: Instance) -> list[dict]:
        # The views prefetch the live mappings into ``live_ports``.
        mappings = getattr(instance, "live_ports", None)
        if mappings is None:
            mappings = instance.port_mappings.exclude(status=PortMapping.STATUS_DELETED).order_by("host_port_start")
        return PortMappingSerializer(mappings, many=True).data


class AdminInstanceSerializer(InstanceSerializer):
    owner = UserRefSerializer(read_only=True)

    class Meta(InstanceSerializer.Meta):
        fields = [*InstanceSerializer.Meta.fields, "owner", "holds_resources"]
        read_only_fields = fields


def _timeout_field() -> serializers.IntegerField:
    return serializers.IntegerField(
        required=False,
        allow_null=True,
        min_value=0,
        max_value=settings.TASK_MAX_TIMEOUT_SECONDS,
        help_text="seconds; 0 or absent: the task type's default",
    )


class InstanceCreateSerializer(serializers.Serializer):
    provider = serializers.IntegerField(min_value=1, max_value=MAX_ID, help_text="provider id")
    image = serializers.CharField(max_length=200)
    instance_type = serializers.ChoiceField(choices=InstanceType.choices, default=InstanceType.CONTAINER)
    cpu = serializers.IntegerField(min_value=1, max_value=1024)
    memory_mb = serializers.IntegerField(min_value=64, max_value=MAX_INT32)
    disk_mb = serializers.IntegerField(min_value=512, max_value=MAX_INT32)
    name = serializers.CharField(max_length=63, required=False, allow_blank=True, allow_null=True)
    bandwidth_mbps = serializers.IntegerField(min_value=1, max_value=1_000_000, default=100)
    timeout_seconds = _timeout_field()


class OperationSerializer(serializers.Serializer):
    timeout_seconds = _timeout_field()


class CancelSerializer(serializers.Serializer):
    reason = serializers.CharField(max_length=500, required=False, allow_blank=True, default="")


class ReasonSerializer(serializers.Serializer):
    reason = serializers.CharField(max_length=500, help_text="why; recorded in the task's timeline")


class PortCreateSerializer(serializers.Serializer):
    protocol = serializers.ChoiceField(choices=Protocol.choices)
    guest_port = serializers.IntegerField(min_value=1, max_value=65535)
    host_port = serializers.IntegerField(
        min_value=1, max_value=65535, required=False, allow_null=True, help_text="absent: the first free one"
    )
    count = serializers.IntegerField(min_value=1, max_value=MAX_RANGE, default=1, help_text="ports in the range")
    description = serializers.CharField(max_length=100, required=False, allow_blank=True, default="")
    timeout_seconds = _timeout_field()


class TaskAcceptedSerializer(serializers.Serializer):
    task = TaskSerializer()


class InstanceAcceptedSerializer(serializers.Serializer):
    task = TaskSerializer()
    instance = InstanceSerializer()


class PortAcceptedSerializer(serializers.Serializer):
    task = TaskSerializer()
    port = PortMappingSerializer()


class PasswordSerializer(serializers.Serializer):
    password = serializers.CharField()


# --- providers and workers ---------------------------------------------------------------


PROVIDER_WRITABLE = (
    "allow_concurrent_tasks",
    "max_concurrent_tasks",
    "task_poll_interval",
    "enable_task_polling",
    "enabled",
)


class ProviderSerializer(serializers.ModelSerializer):
    """What users need to choose a provider."""

    type = serializers.CharField(source="provider_type", read_only=True)

    class Meta:
        model = Provider
        fields = ["id", "name", "type"]
        read_only_fields = fields


class AdminProviderSerializer(serializers.ModelSerializer):
    """A provider with its live limits; PATCH changes only the WRITABLE fields."""

    WRITABLE = PROVIDER_WRITABLE

    type = serializers.CharField(source="provider_type", read_only=True)
    allow_concurrent_tasks = serializers.BooleanField(required=False)
    max_concurrent_tasks = serializers.IntegerField(min_value=1, max_value=256, required=False)
    task_poll_interval = serializers.IntegerField(min_value=1, max_value=3600, required=False)
    enable_task_polling = serializers.BooleanField(required=False)
    enabled = serializers.BooleanField(required=False)
    concurrency_limit = serializers.IntegerField(read_only=True)
    running = serializers.IntegerField(read_only=True, help_text="tasks holding a slot (running or cancelling)")
    pending = serializers.IntegerField(read_only=True)
    unreachable_since = serializers.DateTimeField(
        read_only=True,
        allow_null=True,
        help_text="set while the provider cannot be reached: its queue is held until a probe gets an answer",
    )
    unreachable_error = serializers.CharField(read_only=True, help_text="why the last call or probe failed")

    class Meta:
        model = Provider
        fields = [
            "id",
            "name",
            "type",
            "enabled",
            "allow_concurrent_tasks",
            "max_concurrent_tasks",
            "concurrency_limit",
            "task_poll_interval",
            "enable_task_polling",
            "unreachable_since",
            "unreachable_error",
            "running",
            "pending",
            "cpu_total",
            "cpu_used",
            "memory_total_mb",
            "memory_used_mb",
            "disk_total_mb",
            "disk_used_mb",
            "max_containers",
            "containers_used",
            "max_vms",
            "vms_used",
            "port_range_start",
            "port_range_end",
            "created_at",
            "updated_at",
        ]
        read_only_fields = [f for f in fields if f not in PROVIDER_WRITABLE]

    def to_internal_value(self, data):
        if isinstance(data, dict):
            unknown = [key for key in data if key not in self.WRITABLE]
            if unknown:
                raise serializers.ValidationError(
                    {
                        str(unknown[0]): [
                            _("not writable; PATCH accepts only %(fields)s") % {"fields": ", ".join(self.WRITABLE)}
                        ]
                    }
                )
        return super().to_internal_value(data)

    def validate(self, attrs):
        # A limit above 1 on a serial provider would be stored and have no effect.
        if {"allow_concurrent_tasks", "max_concurrent_tasks"} & set(attrs):
            allow = attrs.get("allow_concurrent_tasks", getattr(self.instance, "allow_concurrent_tasks", False))
            limit = attrs.get("max_concurrent_tasks", getattr(self.instance, "max_concurrent_tasks", 1))
            if limit > 1 and not allow:
                raise serializers.ValidationError(
                    {
                        "max_concurrent_tasks": [
                            _("a limit above 1 needs allow_concurrent_tasks true (a serial provider runs one task)")
                        ]
                    }
                )
        return attrs


class ProviderPatchSerializer(serializers.Serializer):
    """Request body of PATCH /admin/providers/{id}/ (for the schema)."""

    allow_concurrent_tasks = serializers.BooleanField(required=False)
    max_concurrent_tasks = serializers.IntegerField(min_value=1, max_value=256, required=False)
    task_poll_interval = serializers.IntegerField(min_value=1, max_value=3600, required=False)
    enable_task_polling = serializers.BooleanField(required=False)
    enabled = serializers.BooleanField(required=False)


class WorkerSerializer(serializers.ModelSerializer):
    current_task = serializers.IntegerField(source="current_task_id", read_only=True, allow_null=True)

    class Meta:
        model = Worker
        fields = [
            "id",
            "name",
            "node",
            "host",
            "pid",
            "queue",
            "role",
            "started_at",
            "last_heartbeat",
            "current_task",
            "tasks_run",
            "draining",
        ]
        read_only_fields = fields


# --- statistics (documentation of tasks.stats.task_stats) ------------------------------------


class ProviderStatsSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    type = serializers.CharField()
    enabled = serializers.BooleanField()
    pending = serializers.IntegerField()
    running = serializers.IntegerField(help_text="running or cancelling: holding a slot")
    limit = serializers.IntegerField(help_text="concurrency limit (1 when serial)")


class DurationStatsSerializer(serializers.Serializer):
    count = serializers.IntegerField(help_text="completed tasks in the sample")
    avg = serializers.FloatField(allow_null=True)
    p50 = serializers.FloatField(allow_null=True)
    p95 = serializers.FloatField(allow_null=True)


class ErrorRateWindowSerializer(serializers.Serializer):
    rate = serializers.FloatField(allow_null=True, help_text="(failed + timeout) / finished; null with none finished")
    failed = serializers.IntegerField()
    timeout = serializers.IntegerField()
    finished = serializers.IntegerField()


class ErrorRateSerializer(serializers.Serializer):
    last_hour = ErrorRateWindowSerializer()
    last_24h = ErrorRateWindowSerializer()


class WorkerCountsSerializer(serializers.Serializer):
    live = serializers.IntegerField()
    busy = serializers.IntegerField()


class WaitRowSerializer(serializers.Serializer):
    provider = serializers.DictField(help_text="{id, name}")
    task_type = serializers.CharField()
    count = serializers.IntegerField(help_text="tasks started in the window")
    avg = serializers.FloatField()
    p50 = serializers.FloatField()
    p95 = serializers.FloatField()


class WaitStatsSerializer(serializers.Serializer):
    window_seconds = serializers.IntegerField()
    by_provider_type = WaitRowSerializer(many=True)


class StatsSerializer(serializers.Serializer):
    generated_at = serializers.DateTimeField()
    total = serializers.IntegerField()
    by_status = serializers.DictField(child=serializers.IntegerField())
    by_type = serializers.DictField(child=serializers.IntegerField())
    by_provider = ProviderStatsSerializer(many=True)
    durations = serializers.DictField(child=DurationStatsSerializer())
    duration_window = serializers.DictField(child=serializers.IntegerField())
    error_rate = ErrorRateSerializer()
    queue_length = serializers.IntegerField()
    running = serializers.IntegerField()
    slots = serializers.IntegerField(help_text="sum of the concurrency limits of enabled providers")
    worker_utilization = serializers.FloatField(allow_null=True)
    workers = WorkerCountsSerializer()
    wait = WaitStatsSerializer(
        help_text="created -> started seconds per provider and type, tasks started in the last 24 h"
    )


class ErrorSerializer(serializers.Serializer):
    """Every error response."""

    code = serializers.CharField(help_text="stable machine-readable code")
    detail = serializers.CharField()
    field = serializers.CharField(required=False, help_text="the input at fault (400)")
    errors = serializers.JSONField(required=False, help_text="all validation errors by field (400)")
    active_task = serializers.IntegerField(required=False, allow_null=True, help_text="the task in the way (409)")
    status = serializers.CharField(required=False, help_text="the current state that forbids it (409)")


class TokenRequestSerializer(serializers.Serializer):
    username = serializers.CharField()
    password = serializers.CharField(style={"input_type": "password"})


class TokenSerializer(serializers.Serializer):
    token = serializers.CharField()


class HealthSerializer(serializers.Serializer):
    database = serializers.CharField()
    broker = serializers.CharField()


# --- webhooks -------------------------------------------------------------------------------


class WebhookSerializer(serializers.ModelSerializer):
    """A user's webhook; the secret is write-only (the HMAC key of X-Webhook-Signature)."""

    events = serializers.ListField(
        child=serializers.ChoiceField(choices=list(Webhook.EVENTS)),
        required=False,
        allow_empty=False,
        help_text="events to send; all of them when absent",
    )
    secret = serializers.CharField(
        write_only=True, min_length=8, max_length=200, help_text="the key the signature is computed with"
    )
    url = serializers.CharField(max_length=500, help_text="http:// or https:// endpoint; redirects are not followed")

    class Meta:
        model = Webhook
        fields = ["id", "url", "events", "secret", "enabled", "created_at"]
        read_only_fields = ["id", "enabled", "created_at"]


class WebhookDeliverySerializer(serializers.ModelSerializer):
    task = serializers.PrimaryKeyRelatedField(read_only=True)

    class Meta:
        model = WebhookDelivery
        fields = [
            "id",
            "event",
            "task",
            "status",
            "attempts",
            "created_at",
            "next_attempt_at",
            "last_attempt_at",
            "last_response_code",
            "last_error",
            "delivered_at",
        ]
        read_only_fields = fields
