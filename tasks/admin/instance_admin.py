"""Instances and port mappings in the console.

Instances are read-only here: their status, resources and ports change only
through tasks, and their quota/capacity counters must match what live instances
hold. The actions (start, stop, restart, reset, delete) queue tasks through
tasks.services.request_operation, exactly as the API does.
"""

from __future__ import annotations

import logging

from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.db.models import Prefetch, Q, QuerySet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _

from tasks import services, traffic_counters
from tasks.admin.common import (
    BulkResult,
    ConsolePageMixin,
    ReasonForm,
    SafeSelectionMixin,
    admin_link,
    age,
    confirm_action,
    instance_badge,
    log_console_action,
    progress_bar,
    run_bulk,
    status_badge,
)
from tasks.admin.lists import (
    IndexedListMixin,
    ids_matching,
    moment_field,
    related_match,
    search_by_identity,
    users_matching,
)
from tasks.engine.states import ALLOWED_INSTANCE_STATUS, TaskType
from tasks.models import BusyHostPort, Instance, InstanceTraffic, PortMapping, Task

logger = logging.getLogger(__name__)

LINKED_TASKS = 10  # new tasks linked one by one in the report of an instance action


class PortMappingInline(admin.TabularInline):
    model = PortMapping
    extra = 0
    can_delete = False
    show_change_link = False
    fields = ("protocol", "host_ports", "guest_ports", "is_ssh", "status", "description")
    readonly_fields = fields

    @admin.display(description=_("host ports"))
    def host_ports(self, mapping: PortMapping) -> str:
        return _port_range(mapping.host_port_start, mapping.host_port_end)

    @admin.display(description=_("guest ports"))
    def guest_ports(self, mapping: PortMapping) -> str:
        return _port_range(mapping.guest_port_start, mapping.guest_port_end)

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


def _port_range(start: int, end: int) -> str:
    return str(start) if start == end else f"{start}-{end}"


def _memory(mb: int) -> str:
    return f"{mb / 1024:g} GB" if mb >= 1024 and mb % 256 == 0 else f"{mb} MB"


@admin.register(Instance)
class InstanceAdmin(IndexedListMixin, ConsolePageMixin, admin.ModelAdmin):
    list_display = (
        "name",
        "id",
        "owner",
        "provider",
        "instance_type",
        "status_col",
        "resources",
        "ssh_port",
        "traffic_col",
        "active_task_col",
        "needs_reconcile",
        "created_at",
    )
    list_filter = ("status", "instance_type", "provider", "needs_reconcile")
    search_fields = ("name", "owner__username")  # get_search_results
    search_help_text = _("Instance name, owner's username, instance id (42 or #42) or uuid.")
    list_select_related = ("owner", "provider", "active_task")
    # Newest first by the primary key (ids follow creation): no sort of the table.
    ordering = ("-id",)
    sortable_by = ("id",)
    list_per_page = 50
    actions = ("start_instances", "stop_instances", "restart_instances", "reset_instances", "delete_instances")
    inlines = (PortMappingInline,)
    readonly_fields = (
        "uuid",
        "name",
        "owner",
        "provider",
        "instance_type",
        "image",
        "status_col",
        "resources",
        "bandwidth_mbps",
        "addresses",
        "ssh_port",
        "traffic_detail",
        "provider_ref",
        "guest_name",
        "active_task_detail",
        "recent_tasks",
        "needs_reconcile",
        "holds_resources",
        "created_time",
        "updated_time",
        "deleted_time",
    )
    fieldsets = (
        (None, {"fields": ("uuid", "name", "owner", "provider", "instance_type", "image", "status_col")}),
        (_("Resources"), {"fields": ("resources", "bandwidth_mbps", "holds_resources")}),
        (_("Network"), {"fields": ("addresses", "ssh_port", "traffic_detail")}),
        (_("Provider"), {"fields": ("guest_name", "provider_ref", "needs_reconcile")}),
        (_("Tasks"), {"fields": ("active_task_detail", "recent_tasks")}),
        (_("Dates"), {"fields": ("created_time", "updated_time", "deleted_time")}),
    )

    created_time = moment_field("created_at", _("created"))
    updated_time = moment_field("updated_at", _("updated"))
    deleted_time = moment_field("deleted_at", _("deleted"))

    def has_delete_permission(self, request: HttpRequest, obj: Instance | None = None) -> bool:
        # Rows are never deleted (status=deleted); the delete action queues a delete task.
        return False

    def get_actions(self, request: HttpRequest):
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)
        return actions

    # (action, task type, button) of the instance page; shown only when the instance's
    # state allows the operation (the rules request_operation refuses by: no active task,
    # a status in ALLOWED_INSTANCE_STATUS), so a button never leads to a refusal.
    PAGE_ACTIONS = (
        ("start_instances", TaskType.START, _("Start")),
        ("stop_instances", TaskType.STOP, _("Stop")),
        ("restart_instances", TaskType.RESTART, _("Restart")),
        ("reset_instances", TaskType.RESET, _("Reset…")),
        ("delete_instances", TaskType.DELETE, _("Delete…")),
    )

    @staticmethod
    def allowed_operations(instance: Instance) -> set[str]:
        if instance.active_task_id is not None:
            return set()
        return {task_type for task_type, statuses in ALLOWED_INSTANCE_STATUS.items() if instance.status in statuses}

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra = dict(extra_context or {})
        instance = self.get_object(request, unquote(object_id))
        if instance is not None and self.has_change_permission(request):
            allowed = self.allowed_operations(instance)
            actions = [
                (name, label, reverse("admin:tasks_instance_action", args=[instance.pk, name]))
                for name, task_type, label in self.PAGE_ACTIONS
                if task_type in allowed
            ]
            extra["has_instance_actions"] = bool(actions)
            extra["instance_actions"] = actions
        return super().change_view(request, object_id, form_url, extra_context=extra)

    def get_urls(self):
        wrap = self.admin_site.admin_view
        return [
            path("<path:object_id>/action/<str:action>/", wrap(self.page_action_view), name="tasks_instance_action"),
            *super().get_urls(),
        ]

    def page_action_view(self, request: HttpRequest, object_id: str, action: str) -> HttpResponse:
        """An action from the instance page: the same action (and confirmation) as the
        list's, on this one instance; then back to the instance page, whose message
        links the new task (as Proxmox opens its task viewer)."""
        if not self.has_change_permission(request):
            raise PermissionDenied
        if action not in {name for name, _type, _label in self.PAGE_ACTIONS}:
            raise Http404
        instance = self.get_object(request, unquote(object_id))
        if instance is None:
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)
        page = reverse("admin:tasks_instance_change", args=[instance.pk])
        if request.method != "POST":
            return HttpResponseRedirect(page)
        response = getattr(self, action)(request, Instance.objects.filter(pk=instance.pk))
        return response if response is not None else HttpResponseRedirect(page)

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        this_month = Prefetch("traffic", queryset=traffic_counters.this_month(), to_attr="traffic_this_month")
        return super().get_queryset(request).prefetch_related(this_month)

    def get_search_results(self, request: HttpRequest, queryset: QuerySet, search_term: str):
        """An id or uuid exactly; else the name, or the owner's username through the user table."""
        term = search_term.strip()
        if not term:
            return queryset, False
        exact = search_by_identity(term)
        if exact is not None:
            return queryset.filter(exact), False
        owners = related_match("owner_id", users_matching(term), Q(owner__username__icontains=term))
        return queryset.filter(Q(name__icontains=term) | owners), False

    # ------------------------------------------------------------ columns

    @admin.display(description=_("status"), ordering="status")
    def status_col(self, instance: Instance):
        return instance_badge(instance.pk, instance.status)

    @admin.display(description=_("resources"))
    def resources(self, instance: Instance) -> str:
        return _("%(cpu)s CPU · %(memory)s RAM · %(disk)s disk") % {
            "cpu": instance.cpu,
            "memory": _memory(instance.memory_mb),
            "disk": _memory(instance.disk_mb),
        }

    @admin.display(description=_("traffic this month"))
    def traffic_col(self, instance: Instance) -> str:
        used = traffic_counters.current(instance)
        return f"↓ {traffic_counters.human(used['rx_bytes'])} ↑ {traffic_counters.human(used['tx_bytes'])}"

    @admin.display(description=_("traffic"))
    def traffic_detail(self, instance: Instance):
        rows = list(InstanceTraffic.objects.filter(instance=instance).order_by("-period")[:12])
        limit = traffic_counters.limit_bytes(instance)
        head = format_html(
            "<p>{}</p>",
            _("monthly limit: %(limit)s (received + sent)")
            % {"limit": traffic_counters.human(limit) if limit is not None else _("none")},
        )
        if not rows:
            return format_html("{}<p>{}</p>", head, _("no sample yet"))
        body = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    f"{r.period:%Y-%m}",
                    traffic_counters.human(r.rx_bytes),
                    traffic_counters.human(r.tx_bytes),
                    traffic_counters.human(r.rx_bytes + r.tx_bytes),
                )
                for r in rows
            ),
        )
        return format_html(
            '{}<table class="tc-table"><thead><tr><th>{}</th><th>{}</th><th>{}</th><th>{}</th></tr></thead>'
            "<tbody>{}</tbody></table>",
            head,
            _("month"),
            _("received"),
            _("sent"),
            _("total"),
            body,
        )

    @admin.display(description=_("active task"))
    def active_task_col(self, instance: Instance):
        task = instance.active_task
        if task is None:
            return "—"
        return format_html(
            '<div class="tc-active">{} {} {}</div>',
            admin_link(task, f"#{task.pk} {task.task_type}"),
            status_badge(task.pk, task.status, task.get_status_display()),
            progress_bar(task.pk, task.status, task.progress, task.status_message),
        )

    @admin.display(description=_("active task"))
    def active_task_detail(self, instance: Instance):
        return self.active_task_col(instance)

    @admin.display(description=_("recent tasks"))
    def recent_tasks(self, instance: Instance):
        tasks = list(Task.objects.filter(instance=instance).order_by("-created_at", "-id")[:10])
        if not tasks:
            return "—"
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    admin_link(t, f"#{t.pk}"),
                    t.task_type,
                    status_badge(t.pk, t.status, t.get_status_display()),
                    t.error_code or "",
                    age(t.created_at),
                )
                for t in tasks
            ),
        )
        return format_html('<table class="tc-table"><tbody>{}</tbody></table>', rows)

    # ------------------------------------------------------------ actions

    def _queue(
        self, request: HttpRequest, queryset: QuerySet, task_type: str, verb: str, reason: str = ""
    ) -> BulkResult:
        queued: list[tuple[Instance, Task]] = []

        def queue(instance: Instance) -> None:
            task = services.request_operation(request.user, instance.pk, task_type, admin=True, reason=reason)
            queued.append((instance, task))
            logger.info(
                "task %s: %s of instance %s queued by %s in the console", task.pk, task_type, instance.pk, request.user
            )
            message = gettext("%(type)s queued as task #%(id)s") % {"type": task_type, "id": task.pk}
            if reason:
                message += " " + gettext("(reason: %(reason)s)") % {"reason": reason}
            log_console_action(self, request, instance, message)

        result = run_bulk(verb, queryset.order_by("pk"), queue, label=lambda i: i.name)
        # Each new task linked, as Proxmox opens its task viewer (a few; the report counts the rest).
        for instance, task in queued[:LINKED_TASKS]:
            self.message_user(
                request,
                format_html(
                    "{}: {}",
                    instance.name,
                    format_html(
                        '{} <a href="{}">#{}</a>',
                        gettext("%(type)s queued as task") % {"type": task_type},
                        reverse("admin:tasks_task_change", args=[task.pk]),
                        task.pk,
                    ),
                ),
                messages.SUCCESS,
            )
        return result

    def _queue_now(self, request: HttpRequest, queryset: QuerySet, task_type: str, verb: str) -> None:
        self._queue(request, queryset, task_type, verb).report(self, request)

    @admin.action(description=_("Start selected instances"), permissions=["change"])
    def start_instances(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._queue_now(request, queryset, TaskType.START, _("Start"))

    @admin.action(description=_("Stop selected instances"), permissions=["change"])
    def stop_instances(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._queue_now(request, queryset, TaskType.STOP, _("Stop"))

    @admin.action(description=_("Restart selected instances"), permissions=["change"])
    def restart_instances(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._queue_now(request, queryset, TaskType.RESTART, _("Restart"))

    @admin.action(description=_("Reset selected instances (reinstall; asks to confirm)"), permissions=["change"])
    def reset_instances(self, request: HttpRequest, queryset: QuerySet):
        return confirm_action(
            self,
            request,
            queryset,
            action="reset_instances",
            title=_("Reset instances"),
            explanation=_(
                "Reset reinstalls each instance from its image: everything on its disk is lost. The "
                "instance keeps its name, resources and ports. Busy instances are skipped."
            ),
            perform=lambda data: self._queue(request, queryset, TaskType.RESET, _("Reset"), data["reason"]),
            form_class=ReasonForm,
            danger=True,
            button=_("Reset these instances"),
        )

    @admin.action(description=_("Delete selected instances (asks to confirm)"), permissions=["change"])
    def delete_instances(self, request: HttpRequest, queryset: QuerySet):
        return confirm_action(
            self,
            request,
            queryset,
            action="delete_instances",
            title=_("Delete instances"),
            explanation=_(
                "Delete removes each guest from its provider, frees its ports, quota and capacity. "
                "It cannot be undone. Busy instances are skipped."
            ),
            perform=lambda data: self._queue(request, queryset, TaskType.DELETE, _("Delete"), data["reason"]),
            form_class=ReasonForm,
            danger=True,
            button=_("Delete these instances"),
        )


@admin.register(PortMapping)
class PortMappingAdmin(SafeSelectionMixin, IndexedListMixin, admin.ModelAdmin):
    list_display = ("id", "instance_link", "provider", "protocol", "host_ports", "guest_ports", "is_ssh", "status")
    list_filter = ("status", "protocol", "provider", "is_ssh")
    search_fields = ("instance__name", "host_port_start__exact")  # get_search_results
    search_help_text = "Instance name or id (#42), or a host port."
    list_select_related = ("instance", "provider")
    ordering = ("-id",)
    sortable_by = ("id",)
    readonly_fields = [f.name for f in PortMapping._meta.fields]

    def get_search_results(self, request: HttpRequest, queryset: QuerySet, search_term: str):
        """A host port (a number) or an instance id (#42); else instances by name, through
        the instance table, then their mappings by the (instance, status) index."""
        term = search_term.strip()
        if not term:
            return queryset, False
        if term.isdigit():
            return queryset.filter(host_port_start__lte=int(term), host_port_end__gte=int(term)), False
        if term.startswith("#") and term[1:].isdigit():
            return queryset.filter(instance_id=int(term[1:])), False
        instances = ids_matching(Instance.objects.all(), "name", term)
        return queryset.filter(related_match("instance_id", instances, Q(instance__name__icontains=term))), False

    @admin.display(description=_("instance"), ordering="instance__name")
    def instance_link(self, mapping: PortMapping):
        return admin_link(mapping.instance, mapping.instance.name)

    @admin.display(description=_("host ports"), ordering="host_port_start")
    def host_ports(self, mapping: PortMapping) -> str:
        return _port_range(mapping.host_port_start, mapping.host_port_end)

    @admin.display(description=_("guest ports"))
    def guest_ports(self, mapping: PortMapping) -> str:
        return _port_range(mapping.guest_port_start, mapping.guest_port_end)

    # Mappings change only through create-port / delete-port tasks (overlap checks,
    # provider-side rules); the console shows them.
    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(BusyHostPort)
class BusyHostPortAdmin(SafeSelectionMixin, IndexedListMixin, admin.ModelAdmin):
    """Host ports the host refused to bind (tasks.ports.record_busy). Automatic allocation
    skips them until "skipped until"; deleting a row makes its port eligible again at once
    (for an operator who freed the port on the host)."""

    list_display = ("port", "provider", "seen_at", "expires_at", "message")
    list_filter = ("provider",)
    search_fields = ("port__exact",)
    search_help_text = _("A host port.")
    list_select_related = ("provider",)
    ordering = ("-id",)
    sortable_by = ()
    readonly_fields = [f.name for f in BusyHostPort._meta.fields]

    def get_search_results(self, request: HttpRequest, queryset: QuerySet, search_term: str):
        term = search_term.strip()
        if not term:
            return queryset, False
        return (queryset.filter(port=int(term)) if term.isdigit() else queryset.none()), False

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False
