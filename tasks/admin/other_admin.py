"""Quotas, workers and the raw event log in the console."""

from __future__ import annotations

import logging
from datetime import timedelta

from django import forms
from django.conf import settings
from django.contrib import admin
from django.db.models import Q
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html
from django.utils.translation import gettext_lazy as _

from tasks.admin.common import SCRIPTS, STYLES, BulkResult, SafeSelectionMixin, admin_link, age, status_badge
from tasks.admin.lists import (
    Branches,
    IndexedListMixin,
    choices_filter,
    identity,
    related_match,
    search_by_identity,
    users_matching,
)
from tasks.engine.states import EXECUTING, TaskStatus
from tasks.messages import translate as translate_message
from tasks.models import TaskEvent, UserQuota, Worker

logger = logging.getLogger(__name__)


def worker_alive_cutoff():
    """A worker whose last heartbeat is older than this is presumed gone."""
    return timezone.now() - timedelta(seconds=max(60.0, 4 * settings.TASK_LEASE_SECONDS))


@admin.register(UserQuota)
class UserQuotaAdmin(SafeSelectionMixin, IndexedListMixin, admin.ModelAdmin):
    list_display = (
        "user",
        "instances",
        "cpu",
        "memory",
        "disk",
        "traffic_limit",
    )
    search_fields = ("user__username",)  # get_search_results: through the user table
    search_help_text = "Username."
    list_select_related = ("user",)
    ordering = ("-id",)
    sortable_by = ()
    readonly_fields = ("used_instances", "used_cpu", "used_memory_mb", "used_disk_mb", "ports_in_use")
    raw_id_fields = ("user",)

    def get_search_results(self, request: HttpRequest, queryset, search_term: str):
        term = search_term.strip()
        if not term:
            return queryset, False
        return queryset.filter(related_match("user_id", users_matching(term), Q(user__username__icontains=term))), False

    @admin.display(description=_("instances"))
    def instances(self, q: UserQuota) -> str:
        return f"{q.used_instances} / {q.max_instances}"

    @admin.display(description=_("CPU"))
    def cpu(self, q: UserQuota) -> str:
        return f"{q.used_cpu} / {q.max_cpu}"

    @admin.display(description=_("memory (MB)"))
    def memory(self, q: UserQuota) -> str:
        return f"{q.used_memory_mb} / {q.max_memory_mb}"

    @admin.display(description=_("disk (MB)"))
    def disk(self, q: UserQuota) -> str:
        return f"{q.used_disk_mb} / {q.max_disk_mb}"

    @admin.display(description=_("traffic per instance per month"), ordering="max_traffic_gb")
    def traffic_limit(self, q: UserQuota) -> str:
        return "—" if q.max_traffic_gb is None else f"{q.max_traffic_gb} GB"

    @admin.display(description=_("host ports in use (of max ports)"))
    def ports_in_use(self, q: UserQuota) -> str:
        from tasks.resources import ports_used

        return f"{ports_used(q.user_id)} / {q.max_ports}" if q.user_id else "—"

    def has_delete_permission(self, request, obj=None) -> bool:
        # The row carries the user's live usage; a new one would start from zero.
        return False

    def save_model(self, request: HttpRequest, obj: UserQuota, form: forms.ModelForm, change: bool) -> None:
        if not change:
            obj.save()
            return
        # The used_* counters move under the quota row lock while the form is open:
        # write back only the limits the operator changed.
        fields = [name for name in form.changed_data if name.startswith("max_")]
        if fields:
            obj.save(update_fields=fields)
            logger.info("quota of user %s: %s changed by %s", obj.user_id, ", ".join(fields), request.user)


class AliveFilter(admin.SimpleListFilter):
    title = _("liveness")
    parameter_name = "alive"

    def lookups(self, request, model_admin):
        return [("yes", _("Alive (recent heartbeat)")), ("no", _("Stale"))]

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.filter(last_heartbeat__gte=worker_alive_cutoff())
        if self.value() == "no":
            return queryset.filter(last_heartbeat__lt=worker_alive_cutoff())
        return queryset


@admin.register(Worker)
class WorkerAdmin(SafeSelectionMixin, IndexedListMixin, admin.ModelAdmin):
    list_display = (
        "name",
        "state",
        "node",
        "queue",
        "role",
        "heartbeat",
        "current",
        "tasks_run",
        "draining",
    )
    list_filter = (AliveFilter, "role", "queue", "draining")
    search_fields = ("name", "node", "host", "queue")
    list_select_related = ("current_task",)
    # (last_heartbeat) index; a few rows per machine, so the counts of "show counts" are cheap.
    ordering = ("-last_heartbeat", "-id")
    sortable_by = ("heartbeat",)
    show_facets = admin.ShowFacets.ALLOW
    actions = ("delete_stale",)

    class Media:
        css = {"all": STYLES}
        js = SCRIPTS

    @admin.display(description=_("alive"), boolean=True)
    def alive(self, worker: Worker) -> bool:
        return worker.last_heartbeat >= worker_alive_cutoff()

    @admin.display(description=_("state"))
    def state(self, worker: Worker):
        """running a task / idle / stale. An idle worker's row is kept fresh by its
        supervisor (tasks.engine.supervisor.refresh_workers); only a dead one goes stale."""
        if not self.alive(worker):
            return format_html('<span class="tc-badge tc-badge--failed">{}</span>', _("stale"))
        task = worker.current_task
        if task is not None and task.status in EXECUTING and task.worker == worker.name:
            return format_html(
                '<span class="tc-badge tc-badge--running">{}</span>',
                _("running task #%(id)s") % {"id": task.pk},
            )
        if worker.role == "supervisor":
            return format_html('<span class="tc-badge tc-badge--completed">{}</span>', _("supervising"))
        return format_html('<span class="tc-badge tc-badge--completed">{}</span>', _("idle"))

    @admin.display(description=_("last heartbeat"), ordering="last_heartbeat")
    def heartbeat(self, worker: Worker) -> str:
        return age(worker.last_heartbeat)

    @admin.display(description=_("last task"))
    def current(self, worker: Worker):
        task = worker.current_task
        if task is None:
            return "—"
        return format_html(
            "{} {}", admin_link(task, f"#{task.pk} {task.task_type}"), status_badge(task.pk, task.status)
        )

    # Workers write their own rows; a stale row may be removed, nothing else.
    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        if obj is not None and obj.last_heartbeat >= worker_alive_cutoff():
            return False
        return super().has_delete_permission(request, obj)

    def get_actions(self, request: HttpRequest):
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # it would delete live workers' rows too
        return actions

    @admin.action(description=_("Delete selected stale worker rows"), permissions=["delete"])
    def delete_stale(self, request: HttpRequest, queryset) -> None:
        result = BulkResult(_("Delete"))
        for worker in queryset.order_by("name"):
            # Guarded: a worker that beat meanwhile is alive and keeps its row.
            if Worker.objects.filter(pk=worker.pk, last_heartbeat__lt=worker_alive_cutoff()).delete()[0]:
                result.done.append(worker.name)
            else:
                result.skipped.append((worker.name, _("alive (recent heartbeat)")))
        result.report(self, request)


EVENT_KINDS = [(TaskEvent.KIND_TRANSITION, "Transition"), (TaskEvent.KIND_STEP, "Step")]


@admin.register(TaskEvent)
class TaskEventAdmin(SafeSelectionMixin, IndexedListMixin, admin.ModelAdmin):
    """The audit trail across tasks (each task's page shows its own timeline).

    Newest first by id (the primary key: events are appended); filtered by one task,
    by that task's (task, at, id) index; the kind and to-status filters by the
    (kind, to_status, id) index. No filter on dates: nothing orders or narrows
    millions of events by time without sorting them (a task's page has its timeline).
    """

    list_display = ("at", "task_link", "kind", "transition", "actor", "reason", "progress", "message_col")
    list_filter = (
        choices_filter("kind", _("kind"), EVENT_KINDS),
        choices_filter("to_status", _("to status"), TaskStatus.choices),
    )
    search_fields = ("task__uuid",)  # get_search_results
    search_help_text = _("Task id (42 or #42) or task uuid: that task's events.")
    list_select_related = ("task",)
    ordering = ("-id",)
    sortable_by = ()
    readonly_fields = [f.name for f in TaskEvent._meta.fields]

    # URL parameters that narrow the list to one task (links from a task's page use the first).
    ONE_TASK_PARAMS = ("task__id__exact", "task", "task__exact", "task_id", "task_id__exact")

    def get_ordering(self, request: HttpRequest):
        # One task's events (a filter, or a search by its id or uuid): its (task, at, id)
        # index, newest first; ordering that task's few rows by id would sort them.
        one_task = any(name in request.GET for name in self.ONE_TASK_PARAMS)
        if one_task or identity(request.GET.get("q", "")) is not None:
            return ("-at", "-id")
        return super().get_ordering(request)

    def index_branches(self, request: HttpRequest) -> Branches | None:
        """One of kind / to-status filtered: a branch per value of the other, each a prefix
        of the (kind, to_status, id) index, read newest first."""
        if any(name in request.GET for name in self.ONE_TASK_PARAMS) or request.GET.get("q"):
            return None  # one task's events: its own index
        kind, to_status = request.GET.get("kind"), request.GET.get("to_status")
        if kind and not to_status:
            return Branches([Q(to_status=value) for value, _ in TaskStatus.choices])
        if to_status and not kind:
            return Branches([Q(kind=value) for value, _ in EVENT_KINDS])
        return None

    def get_search_results(self, request: HttpRequest, queryset, search_term: str):
        term = search_term.strip()
        if not term:
            return queryset, False
        exact = search_by_identity(term, pk="task_id", uuid="task__uuid")
        return (queryset.filter(exact) if exact is not None else queryset.none()), False

    class Media:
        css = {"all": STYLES}

    @admin.display(description=_("task"), ordering="task_id")
    def task_link(self, event: TaskEvent):
        return admin_link(event.task, f"#{event.task_id} {event.task.task_type}")

    @admin.display(description=_("transition"))
    def transition(self, event: TaskEvent):
        if event.kind == TaskEvent.KIND_STEP:
            return _("step")
        if not event.from_status:
            return format_html("→ {}", status_badge(None, event.to_status))
        return format_html("{} → {}", status_badge(None, event.from_status), status_badge(None, event.to_status))

    @admin.display(description=_("message"))
    def message_col(self, event: TaskEvent) -> str:
        return translate_message(event.message)  # stored in English (tasks/messages.py)

    # The audit trail is append-only.
    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False
