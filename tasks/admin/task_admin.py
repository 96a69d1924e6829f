"""Tasks in the console: the list with live badges and bars, the detail page with the
timeline and the lease, and the cancel / force-stop actions.

Nothing here writes a task's state: every change goes through tasks.services
(the same calls the API makes), and the detail page is read-only, so a form
save can never write back a stale status over a worker's update.
"""

from __future__ import annotations

import json
import logging

from django.contrib import admin
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.db.models import OuterRef, Q, QuerySet, Subquery
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.template.loader import render_to_string
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _

from tasks import services
from tasks.admin import views as admin_views
from tasks.admin.common import (
    BulkResult,
    ConsolePageMixin,
    admin_link,
    age,
    confirm_action,
    human_duration,
    log_console_action,
    progress_bar,
    redact,
    run_bulk,
    status_badge,
)
from tasks.admin.lists import (
    Branches,
    IndexedListMixin,
    StateGroupFilter,
    ids_matching,
    moment_field,
    related_match,
    search_by_identity,
    users_matching,
)
from tasks.admin.localtime import moment
from tasks.admin.permissions import FORCE_STOP_PERMISSION
from tasks.admin.triage import (
    ERROR_STATUSES,
    ErrorCodeFilter,
    FinishedWithinFilter,
    StuckFilter,
    error_cell,
    error_summary,
    finished_window,
    wait_notes,
)
from tasks.engine import clock, dispatch
from tasks.engine.states import (
    ALL_STATES,
    CANCELLABLE,
    CANCELLING,
    EXECUTING,
    FAILED,
    FINAL,
    PENDING,
    TIMEOUT,
    TaskStatus,
    word,
)
from tasks.errors import NotCancellable
from tasks.messages import translate as translate_message
from tasks.models import Instance, InstanceType, Task, TaskEvent

logger = logging.getLogger(__name__)

TIMELINE_LIMIT = 500


def _task_label(task: Task) -> str:
    return _("task %(id)s") % {"id": task.pk}


def _shown(event: TaskEvent) -> TaskEvent:
    """The event with its step message in the reader's language (stored in English, tasks/messages.py)."""
    event.message = translate_message(event.message)
    return event


def actor_label(actor: str) -> str:
    """One style for who acted: "worker machine-a/3", "admin root", "user alice", "system (sweep)".

    Stored as ``kind:detail`` (tasks.services.actor_of, the engine's ``worker:<node>:<pid>``,
    ``system:timeout-sweep``, ``supervisor:<name>``); shown as a kind and a name.
    """
    kind, _sep, detail = (actor or "").partition(":")
    if kind == "worker":
        node, _sep, pid = detail.rpartition(":")
        name = f"{node}/{pid}" if node and pid.isdigit() else detail
        return gettext("worker %(name)s") % {"name": name} if name else gettext("worker")
    if kind == "admin":
        return gettext("admin %(name)s") % {"name": detail}
    if kind == "user":
        return gettext("user %(name)s") % {"name": detail}
    if kind == "supervisor":
        return gettext("supervisor %(name)s") % {"name": detail}
    if kind == "system":
        what = detail.removesuffix("-sweep").replace("-", " ") if detail else ""
        return gettext("system (%(what)s)") % {"what": what} if what else gettext("system")
    return actor or "—"


def timeline_rows(task: Task, events: list[TaskEvent], following: TaskEvent | None = None) -> list[tuple]:
    """(event, offset from creation, duration until the next event, actor, time) per event;
    the time to the millisecond in the console's zone, the UTC instant on hover.

    The last event's duration runs to the task's end, or is open ("" while it runs).
    """
    rows = []
    for i, event in enumerate(events):
        nxt = events[i + 1] if i + 1 < len(events) else following
        if nxt is not None:
            took = human_duration(nxt.at - event.at)
        elif task.status in FINAL and task.completed_at is not None and task.completed_at > event.at:
            took = human_duration(task.completed_at - event.at)
        else:
            took = ""
        local = timezone.localtime(event.at)
        at = moment(event.at, f"{local:%Y-%m-%d %H:%M:%S}.{local.microsecond // 1000:03d}")
        rows.append((_shown(event), human_duration(event.at - task.created_at), took, actor_label(event.actor), at))
    return rows


def confirm_detail(task: Task) -> str:
    """What an operator checks before cancelling or force-stopping: instance, owner, runtime."""
    if task.started_at is not None:
        runtime = _("running for %(duration)s") % {
            "duration": human_duration((task.completed_at or timezone.now()) - task.started_at)
        }
    else:
        runtime = _("queued for %(duration)s") % {"duration": human_duration(timezone.now() - task.created_at)}
    return _("%(type)s, %(status)s · instance %(instance)s · owner %(owner)s · %(runtime)s") % {
        "type": task.task_type,
        "status": word(TaskStatus, task.status),
        "instance": task.instance.name if task.instance is not None else "—",
        "owner": task.owner.get_username() if task.owner is not None else "—",
        "runtime": runtime,
    }


def _with_hold(task: Task, badge):
    """The status badge, and a "stopping" badge while an ended task still holds its slot and instance."""
    if task.held_until is None:
        return badge
    return format_html(
        '{} <span class="tc-badge tc-badge--cancelling" title="{}">{}</span>',
        badge,
        _("ended, but its worker may still be inside a provider call: its slot and instance stay held"),
        _("stopping"),
    )


class InstanceTypeFilter(admin.SimpleListFilter):
    """The instance's type, tested per task row (a dependent lookup by the instance's
    primary key) while the list walks its (created_at, id) index.

    As a join, MariaDB drove the query from tasks_instance (every vm or container) and
    sorted their tasks: a temporary table and a filesort over 200,000 (or 800,000) rows.
    """

    title = _("instance type")
    parameter_name = "instance_type"

    def lookups(self, request, model_admin):
        return InstanceType.choices

    def queryset(self, request, queryset):
        if self.value() not in InstanceType.values:
            return queryset
        instance_type = Subquery(Instance.objects.filter(pk=OuterRef("instance_id")).values("instance_type")[:1])
        return queryset.alias(instance_type=instance_type).filter(instance_type=self.value())


@admin.register(Task)
class TaskAdmin(IndexedListMixin, ConsolePageMixin, admin.ModelAdmin):
    list_display = (
        "id",
        "task_type",
        "status_col",
        "progress_col",
        "provider",
        "instance_col",
        "owner_col",
        "age_col",
        "duration_col",
        "note_col",
    )
    list_display_links = ("id", "task_type")
    list_filter = (
        StateGroupFilter,
        "status",
        "task_type",
        "provider",
        ErrorCodeFilter,
        FinishedWithinFilter,
        StuckFilter,
        InstanceTypeFilter,
        ("created_at", admin.DateFieldListFilter),
    )
    # get_search_results reads them: owner username, instance name, task id or uuid.
    search_fields = ("owner__username", "instance__name")
    search_help_text = _("Owner's username, instance name, task id (42 or #42) or task uuid.")
    list_select_related = ("provider", "instance", "owner", "initiator")
    # The (created_at DESC, id DESC) index, read backwards or forwards; every other
    # column would sort the whole (filtered) table.
    ordering = ("-created_at", "-id")
    sortable_by = ("age_col",)
    list_per_page = 50
    actions = ("cancel_selected", "force_stop_selected", "retry_selected", "delete_finished")
    readonly_fields = (
        "uuid",
        "task_type",
        "status_detail",
        "progress_detail",
        "provider",
        "instance_detail",
        "owner",
        "initiator",
        "timeout_detail",
        "queue_detail",
        "created_time",
        "admitted_time",
        "started_time",
        "completed_time",
        "duration_col",
        "error_code",
        "error_message",
        "cancel_reason",
        "retry_of",
        "worker",
        "heartbeat_time",
        "lease_expires_time",
        "lease_detail",
        "attempt_count",
        "dispatch_count",
        "task_data_redacted",
    )
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "uuid",
                    "task_type",
                    "status_detail",
                    "progress_detail",
                    "provider",
                    "instance_detail",
                    "owner",
                    "initiator",
                    "timeout_detail",
                    "queue_detail",
                )
            },
        ),
        (_("Timing"), {"fields": ("created_time", "admitted_time", "started_time", "completed_time", "duration_col")}),
        (_("Error"), {"fields": ("error_code", "error_message", "cancel_reason", "retry_of")}),
        (
            _("Lease"),
            {
                "fields": (
                    "worker",
                    "heartbeat_time",
                    "lease_expires_time",
                    "lease_detail",
                    "attempt_count",
                    "dispatch_count",
                )
            },
        ),
        (_("Task data (secrets redacted)"), {"fields": ("task_data_redacted",)}),
    )

    # ------------------------------------------------------------ permissions

    def has_delete_permission(self, request: HttpRequest, obj: Task | None = None) -> bool:
        if obj is not None and obj.status not in FINAL:
            return False
        return super().has_delete_permission(request, obj)

    def has_force_stop_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(FORCE_STOP_PERMISSION)

    def get_actions(self, request: HttpRequest):
        actions = super().get_actions(request)
        # The stock bulk delete would delete running tasks; delete_finished replaces it.
        actions.pop("delete_selected", None)
        return actions

    # ------------------------------------------------------------ list columns

    @admin.display(description=_("status"), ordering="status")
    def status_col(self, task: Task):
        return _with_hold(task, status_badge(task.pk, task.status, task.get_status_display()))

    @admin.display(description=_("progress"), ordering="progress")
    def progress_col(self, task: Task):
        # A failed task's bar says why it failed, not the last cleanup step it reported.
        message = error_summary(task) if task.status in (FAILED, TIMEOUT) else task.status_message
        return progress_bar(task.pk, task.status, task.progress, message)

    @admin.display(description=_("error / waits for"))
    def note_col(self, task: Task):
        """The error of an ended task; why a pending one waits (get_changelist_instance)."""
        if task.status == PENDING:
            return getattr(task, "wait_note", None) or "—"
        return error_cell(task)

    def get_changelist_instance(self, request: HttpRequest):
        changelist = super().get_changelist_instance(request)
        # The page's rows only, in a fixed number of queries (tasks.admin.triage).
        notes = wait_notes(changelist.result_list)
        for task in changelist.result_list:
            task.wait_note = notes.get(task.pk)
        return changelist

    def get_ordering(self, request: HttpRequest):
        # "Finished in the last ...": newest finished first, on (status, completed_at, id).
        if finished_window(request.GET) is not None:
            return ("-completed_at", "-id")
        return super().get_ordering(request)

    def get_sortable_by(self, request: HttpRequest):
        # Sorting by age would sort the finished window's rows (no index serves both).
        if finished_window(request.GET) is not None:
            return ()
        return super().get_sortable_by(request)

    @admin.display(description=_("instance"), ordering="instance__name")
    def instance_col(self, task: Task):
        if task.instance is None:
            return "—"
        return admin_link(task.instance, task.instance.name)

    @admin.display(description=_("owner"))
    def owner_col(self, task: Task):
        """The owner, and who asked when it was someone else (an administrator): one column
        for both keeps the list within 1440 px."""
        if task.initiator_id is None or task.initiator_id == task.owner_id:
            return task.owner.get_username()
        return format_html(
            '{} <span class="tc-muted">{}</span>',
            task.owner.get_username(),
            _("by %(user)s") % {"user": task.initiator.get_username()},
        )

    @admin.display(description=_("age"), ordering="created_at")
    def age_col(self, task: Task):
        return moment(task.created_at, age(task.created_at))

    @admin.display(description=_("duration"))
    def duration_col(self, task: Task) -> str:
        if task.started_at is None:
            if task.status == PENDING:
                return _("queued %(duration)s") % {"duration": human_duration(timezone.now() - task.created_at)}
            return _("never ran")
        end = task.completed_at or timezone.now()
        text = human_duration(end - task.started_at)
        return text if task.completed_at else _("%(duration)s so far") % {"duration": text}

    # ------------------------------------------------------------ detail fields

    created_time = moment_field("created_at", _("created"))
    admitted_time = moment_field("admitted_at", _("admitted"))
    started_time = moment_field("started_at", _("started"))
    completed_time = moment_field("completed_at", _("completed"))
    heartbeat_time = moment_field("heartbeat_at", _("last heartbeat"))
    lease_expires_time = moment_field("lease_expires_at", _("lease expires"))

    @admin.display(description=_("status"))
    def status_detail(self, task: Task):
        return _with_hold(task, status_badge(task.pk, task.status, task.get_status_display()))

    @admin.display(description=_("progress"))
    def progress_detail(self, task: Task):
        return progress_bar(task.pk, task.status, task.progress, task.status_message, wide=True)

    @admin.display(description=_("instance"))
    def instance_detail(self, task: Task):
        if task.instance is None:
            return "—"
        inst = task.instance
        return format_html(
            "{} · {} · {}", admin_link(inst, inst.name), inst.get_instance_type_display(), inst.get_status_display()
        )

    @admin.display(description=_("timeout"))
    def timeout_detail(self, task: Task) -> str:
        if task.timeout_seconds:
            text = _("%(n)s s") % {"n": task.effective_timeout}
        else:
            text = _("%(n)s s (type default)") % {"n": task.effective_timeout}
        if task.status in EXECUTING and task.deadline is not None:
            left = (task.deadline - timezone.now()).total_seconds()
            if left > 0:
                text += _("; %(duration)s left") % {"duration": human_duration(left)}
            else:
                text += _("; past its deadline")
        return text

    @admin.display(description=_("queue"))
    def queue_detail(self, task: Task) -> str:
        if task.status != PENDING:
            return "—"
        info = dispatch.queue_info(task)
        if info["estimated_wait_seconds"] is None:
            # Held (or disabled): it waits for the provider, not for a slot; no figure is honest.
            wait = (
                _("wait unknown while the provider is unreachable")
                if task.provider.unreachable_since is not None
                else _("wait unknown while the provider is disabled")
            )
            return _("%(reason)s; position %(position)s, %(wait)s") % {
                "reason": info["blocked_reason"],
                "position": info["queue_position"],
                "wait": wait,
            }
        return _("%(reason)s; position %(position)s, about %(wait)s to wait") % {
            "reason": info["blocked_reason"],
            "position": info["queue_position"],
            "wait": human_duration(info["estimated_wait_seconds"]),
        }

    @admin.display(description=_("lease"))
    def lease_detail(self, task: Task) -> str:
        # The token itself is a fencing credential: say whether one exists, not what it is.
        if task.held_until is not None:
            left = (task.held_until - clock.now()).total_seconds()
            return (
                "revoked; its worker may still be stopping: the provider slot and the instance stay held"
                f" until it reports its exit, at the latest when the lease runs out"
                f" ({'in ' + human_duration(left) if left >= 0 else 'now, at the next sweep'})"
            )
        if task.status in FINAL:
            return _("none: the task has finished")
        if not task.lease_token:
            return _("none: waiting for admission")
        if task.lease_expires_at is None:
            return _("granted at admission, waiting for a worker to claim it")
        left = (task.lease_expires_at - timezone.now()).total_seconds()
        if left >= 0:
            return _("held, expires in %(duration)s") % {"duration": human_duration(left)}
        return _("EXPIRED %(duration)s ago: recovery will act") % {"duration": human_duration(-left)}

    @admin.display(description=_("task data"))
    def task_data_redacted(self, task: Task):
        if not task.task_data:
            return "—"
        return format_html(
            '<pre class="tc-json">{}</pre>', json.dumps(redact(task.task_data), indent=2, sort_keys=True, default=str)
        )

    # ------------------------------------------------------------ counting

    # List parameters under which the page's count is a sum of tasks.stats'
    # aggregate (by status and type) instead of a COUNT(*) over the table.
    COUNTABLE_PARAMS = frozenset({"status__exact", "task_type__exact", "state", "p", "o"})

    def exact_count(self, request, changelist) -> int | None:
        """The result count from tasks.stats.count_tasks, or None for a bounded count.

        COUNT(*) of a million-row table (or of its 900,000 completed tasks) takes about a
        second on MariaDB at every page view; the stats aggregate answers in milliseconds,
        exactly. Only for plain status/type/state filters; search, dates, providers and
        instance types get a bounded count (lists.IndexedChangeList). None on small tables.
        """
        params = request.GET
        if not set(params) <= self.COUNTABLE_PARAMS:
            return None
        statuses: set[str] | None = None
        if "status__exact" in params:
            statuses = {params["status__exact"]}
        if "state" in params:
            group = StateGroupFilter.GROUPS.get(params["state"])
            if group is None:
                return None
            statuses = set(group[1]) if statuses is None else statuses & group[1]
            if not statuses:
                return 0
        types = [params["task_type__exact"]] if "task_type__exact" in params else None
        from tasks.stats import count_tasks

        return count_tasks(sorted(statuses) if statuses is not None else None, types)

    # ------------------------------------------------------------ search

    def get_search_results(self, request: HttpRequest, queryset: QuerySet, search_term: str):
        """An id or uuid exactly; else the owners whose username and the instances whose
        name contain the term, found in their own (small) tables, then their tasks by the
        (owner, created_at, id) and (instance, created_at, id) indexes. A term matching more
        than lists.MATCH_LIMIT users or instances is matched with a join instead."""
        term = search_term.strip()
        if not term:
            return queryset, False
        exact = search_by_identity(term)
        if exact is not None:
            return queryset.filter(exact), False
        owners, instances = self._search_matches(request, term)
        match = related_match("owner_id", owners, Q(owner__username__icontains=term)) | related_match(
            "instance_id", instances, Q(instance__name__icontains=term)
        )
        return queryset.filter(match), False

    @staticmethod
    def _search_matches(request: HttpRequest, term: str) -> tuple[list[int] | None, list[int] | None]:
        """(owner ids, instance ids) matching a search term; kept on the request (search and branches)."""
        kept = getattr(request, "_task_search_matches", None)
        if kept is None or kept[0] != term:
            kept = (term, users_matching(term), ids_matching(Instance.objects.all(), "name", term))
            request._task_search_matches = kept
        return kept[1], kept[2]

    def index_branches(self, request: HttpRequest) -> Branches | None:
        """A search: one branch per matched owner and instance (their indexes). Else a state
        group, or a provider without a status: one branch per status, by the (status,
        created_at, id) and (provider, status, created_at, id) indexes."""
        params = request.GET
        term = params.get("q", "").strip()
        if term:
            if search_by_identity(term) is not None:
                return None
            owners, instances = self._search_matches(request, term)
            if owners is None or instances is None or len(owners) + len(instances) < 2:
                return None
            # an owner's task on a matched instance is in two branches
            return Branches([Q(owner_id=pk) for pk in owners] + [Q(instance_id=pk) for pk in instances], disjoint=False)
        narrowed = self._triage_statuses(params)
        if narrowed is not None:
            # One status at a time: (status, completed_at, id) for a finished window,
            # (status, created_at, id) for an error code or stuck; the rest is tested per row.
            return Branches([Q(status=status) for status in narrowed]) if len(narrowed) > 1 else None
        if "status__exact" in params:
            return None
        group = StateGroupFilter.GROUPS.get(params.get("state", ""))
        if group is not None:
            return Branches([Q(status=status) for status in sorted(group[1])])
        if "provider__id__exact" in params:
            return Branches([Q(status=status) for status in ALL_STATES])
        return None

    @staticmethod
    def _triage_statuses(params) -> list[str] | None:
        """The statuses a finished window, an error code or the stuck filter leaves (with the
        status and state filters), or None when none of them is set."""
        statuses: set[str] | None = None
        if finished_window(params) is not None:
            statuses = set(FINAL)
        if params.get("error_code"):
            statuses = set(ERROR_STATUSES) if statuses is None else statuses & ERROR_STATUSES
        if params.get("stuck") == "yes":
            statuses = set(EXECUTING) if statuses is None else statuses & EXECUTING
        if statuses is None:
            return None
        if "status__exact" in params:
            statuses &= {params["status__exact"]}
        group = StateGroupFilter.GROUPS.get(params.get("state", ""))
        if group is not None:
            statuses &= group[1]
        return sorted(statuses)

    # ------------------------------------------------------------ pages

    def get_urls(self):
        prefix = f"{self.opts.app_label}_{self.opts.model_name}"
        wrap = self.admin_site.admin_view
        return [
            path("dashboard/", wrap(self.dashboard_view), name=f"{prefix}_dashboard"),
            # Not wrapped by admin_view: a script gets a JSON 403, not a login page.
            path("progress/", admin_views.progress_json, name=f"{prefix}_progress"),
            path("<path:object_id>/events/", wrap(self.events_view), name=f"{prefix}_events"),
            path("<path:object_id>/cancel/", wrap(self.cancel_view), name=f"{prefix}_cancel"),
            path("<path:object_id>/force-stop/", wrap(self.force_stop_view), name=f"{prefix}_force_stop"),
            *super().get_urls(),
        ]

    def dashboard_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        return admin_views.dashboard(request, self)

    def change_view(self, request, object_id, form_url="", extra_context=None):
        task = self.get_object(request, unquote(object_id))
        extra = dict(extra_context or {})
        if task is not None:
            events = list(TaskEvent.objects.filter(task=task).order_by("at", "id")[: TIMELINE_LIMIT + 1])
            extra.update(
                timeline=timeline_rows(task, events[:TIMELINE_LIMIT]),
                timeline_truncated=len(events) > TIMELINE_LIMIT,
                timeline_url=reverse("admin:tasks_task_events", args=[task.pk]),
                timeline_last_id=events[-1].pk if events and len(events) <= TIMELINE_LIMIT else 0,
                timeline_live=task.status not in FINAL and len(events) <= TIMELINE_LIMIT,
                can_cancel=task.status in CANCELLABLE and self.has_change_permission(request),
                can_force_stop=task.status not in FINAL and self.has_force_stop_permission(request),
                cancel_url=reverse("admin:tasks_task_cancel", args=[task.pk]),
                force_stop_url=reverse("admin:tasks_task_force_stop", args=[task.pk]),
            )
        return super().change_view(request, object_id, form_url, extra_context=extra)

    def events_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """The timeline rows after ``?after=<event id>`` (the open task page appends them),
        the finished duration of that last shown row, and whether the task has ended."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        after = request.GET.get("after", "0")
        if not (after.isascii() and after.isdigit() and int(after) < 2**63):
            return JsonResponse(
                {"code": "invalid", "field": "after", "detail": gettext("after: an event id")}, status=400
            )
        task = self.get_object(request, unquote(object_id))
        if task is None:
            return JsonResponse({"code": "not_found", "detail": gettext("no such task")}, status=404)
        after_id = int(after)
        events = list(TaskEvent.objects.filter(task=task, pk__gt=after_id).order_by("at", "id")[:TIMELINE_LIMIT])
        previous = TaskEvent.objects.filter(task=task, pk=after_id).first() if after_id else None
        rows = timeline_rows(task, events)
        html = render_to_string("admin/tasks/task/timeline_rows.html", {"timeline": rows}, request=request)
        took = ""
        if previous is not None:
            took = timeline_rows(task, [previous], following=events[0] if events else None)[0][2]
        return JsonResponse(
            {
                "rows": html,
                "last_id": events[-1].pk if events else after_id,
                "previous_id": after_id or None,
                "previous_duration": took,
                "final": task.status in FINAL,
            }
        )

    def _single_task_view(self, request: HttpRequest, object_id: str, action) -> HttpResponse:
        task = self.get_object(request, unquote(object_id))
        if task is None:
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)
        response = action(request, Task.objects.filter(pk=task.pk))
        if response is None:
            return HttpResponseRedirect(reverse("admin:tasks_task_change", args=[task.pk]))
        return response

    def cancel_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        if not self.has_change_permission(request):
            raise PermissionDenied
        return self._single_task_view(request, object_id, self.cancel_selected)

    def force_stop_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        if not self.has_force_stop_permission(request):
            raise PermissionDenied
        return self._single_task_view(request, object_id, self.force_stop_selected)

    # ------------------------------------------------------------ actions

    @admin.action(description=_("Cancel selected tasks (asks for a reason)"), permissions=["change"])
    def cancel_selected(self, request: HttpRequest, queryset: QuerySet):
        def perform(data: dict) -> BulkResult:
            reason = data["reason"]

            def cancel(task: Task) -> None:
                if task.status == CANCELLING:  # the API answers 200; the report says skipped
                    raise NotCancellable(gettext("already cancelling"))
                services.cancel_task(request.user, task.pk, admin=True, reason=reason)
                logger.info("task %s: cancel requested by %s in the console: %s", task.pk, request.user, reason)
                log_console_action(self, request, task, gettext("Cancel requested: %(reason)s") % {"reason": reason})

            return run_bulk(_("Cancel"), queryset.order_by("pk"), cancel, label=_task_label)

        return confirm_action(
            self,
            request,
            queryset,
            action="cancel_selected",
            title=_("Cancel tasks"),
            explanation=_(
                "Pending tasks end cancelled at once. Running tasks are asked to stop: their worker "
                "sees the request within about a second and stops at its next safe point. Tasks "
                "that have already finished (or are already cancelling) are skipped and left as they are."
            ),
            perform=perform,
            button=_("Cancel these tasks"),
            describe=confirm_detail,
        )

    @admin.action(description=_("Force-stop selected tasks: DANGEROUS (asks for a reason)"), permissions=["force_stop"])
    def force_stop_selected(self, request: HttpRequest, queryset: QuerySet):
        def perform(data: dict) -> BulkResult:
            reason = data["reason"]

            def force_stop(task: Task) -> None:
                services.force_stop_task(request.user, task.pk, reason=reason)
                logger.warning("task %s: force-stopped by %s in the console: %s", task.pk, request.user, reason)
                log_console_action(self, request, task, gettext("Force-stopped: %(reason)s") % {"reason": reason})

            return run_bulk(_("Force-stop"), queryset.order_by("pk"), force_stop, label=_task_label)

        return confirm_action(
            self,
            request,
            queryset,
            action="force_stop_selected",
            title=_("Force-stop tasks"),
            explanation=_(
                "Force-stop ends each task NOW as cancelled (reason force_stopped) without waiting for "
                "its worker: the lease is revoked, the provider slot freed, and the instance marked "
                "for reconciliation. The operation may still be running on the provider; its late "
                "writes are ignored. Use it only for a task that is stuck. Finished tasks are skipped."
            ),
            perform=perform,
            danger=True,
            button=_("Force-stop these tasks"),
            describe=confirm_detail,
        )

    @admin.action(description=_("Retry selected failed, timed-out or cancelled tasks"), permissions=["change"])
    def retry_selected(self, request: HttpRequest, queryset: QuerySet):
        def retry(task: Task) -> None:
            new = services.retry_task(request.user, task.pk, admin=True)
            logger.info("task %s: retried as task %s by %s in the console", task.pk, new.pk, request.user)
            log_console_action(self, request, task, gettext("Retried as task #%(id)s") % {"id": new.pk})

        run_bulk(_("Retry"), queryset.order_by("pk"), retry, label=_task_label).report(self, request)

    @admin.action(description=_("Delete selected finished tasks"), permissions=["delete"])
    def delete_finished(self, request: HttpRequest, queryset: QuerySet):
        result = BulkResult(_("Delete"))
        for task in queryset.order_by("pk"):
            # Guarded delete: a task that is still active (or became active) stays.
            if Task.objects.filter(pk=task.pk, status__in=FINAL).delete()[0]:
                result.done.append(_task_label(task))
            else:
                result.skipped.append(
                    (_task_label(task), _("%(status)s, not finished") % {"status": word(TaskStatus, task.status)})
                )
        result.report(self, request)
