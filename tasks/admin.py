"""Basic admin registrations (the operators' console builds on these)."""

from __future__ import annotations

from django.contrib import admin

from tasks.models import Instance, PortMapping, Provider, Task, TaskEvent, UserQuota, Worker


class TaskEventInline(admin.TabularInline):
    model = TaskEvent
    extra = 0
    can_delete = False
    readonly_fields = ("kind", "from_status", "to_status", "actor", "reason", "progress", "message", "at")

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Task)
class TaskAdmin(admin.ModelAdmin):
    list_display = ("id", "task_type", "status", "progress", "provider", "instance", "owner", "created_at")
    list_filter = ("status", "task_type", "provider")
    search_fields = ("uuid", "owner__username", "instance__name")
    readonly_fields = [f.name for f in Task._meta.fields]
    inlines = [TaskEventInline]

    def has_add_permission(self, request):
        return False


@admin.register(Instance)
class InstanceAdmin(admin.ModelAdmin):
    list_display = ("id", "name", "owner", "provider", "instance_type", "status", "cpu", "memory_mb", "disk_mb")
    list_filter = ("status", "instance_type", "provider")
    search_fields = ("name", "owner__username", "uuid")
    readonly_fields = ("status", "active_task", "holds_resources", "addresses", "provider_ref", "live_name")


@admin.register(Provider)
class ProviderAdmin(admin.ModelAdmin):
    list_display = ("name", "provider_type", "enabled", "allow_concurrent_tasks", "max_concurrent_tasks")
    readonly_fields = ("cpu_used", "memory_used_mb", "disk_used_mb", "containers_used", "vms_used")


@admin.register(PortMapping)
class PortMappingAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "instance",
        "provider",
        "protocol",
        "host_port_start",
        "host_port_end",
        "guest_port_start",
        "status",
    )
    list_filter = ("status", "protocol", "provider")


@admin.register(UserQuota)
class UserQuotaAdmin(admin.ModelAdmin):
    list_display = ("user", "used_instances", "max_instances", "used_cpu", "max_cpu", "used_memory_mb", "max_memory_mb")
    readonly_fields = ("used_instances", "used_cpu", "used_memory_mb", "used_disk_mb")


@admin.register(Worker)
class WorkerAdmin(admin.ModelAdmin):
    list_display = ("name", "node", "queue", "role", "last_heartbeat", "current_task", "tasks_run")


@admin.register(TaskEvent)
class TaskEventAdmin(admin.ModelAdmin):
    list_display = ("task", "from_status", "to_status", "actor", "reason", "at")
    readonly_fields = [f.name for f in TaskEvent._meta.fields]
