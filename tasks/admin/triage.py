"""Triage on the task list: the error column, why a pending task waits, and the filters an
operator reaches for first (error code, finished in the last 15 min / 1 h / 24 h, stuck).

Every filter here keeps the list on an index (docs/admin.md, "Lists at a million rows";
tests/admin/test_list_plans.py checks the plans on MariaDB):

- error code: only failed, timed-out and cancelled tasks carry one, so the list is read
  one final status at a time on (status, created_at, id) and the code is tested per row
  (TaskAdmin.index_branches);
- finished within: the list is ordered by completion, newest first, and read one final
  status at a time on (status, completed_at, id) (migration 0012);
- stuck: running and cancelling tasks only (a few hundred at most: the slots of every
  provider), each tested against its type's p95 and its last step.

The wait notes of pending rows are computed for the page's rows only, with a fixed number
of queries: three for the slots in use of the page's providers, and one per provider with
a waiting row on the page for the queue positions (each an index range, at most
POSITION_LIMIT ids).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib import admin
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django.utils.text import Truncator
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from tasks.admin.common import admin_link, change_url
from tasks.engine.states import CANCELLED, EXECUTING, FAILED, PENDING, TIMEOUT, ErrorCode
from tasks.models import Task, TaskEvent

# The statuses whose tasks carry an error code (a completed task's is cleared).
ERROR_STATUSES = frozenset({FAILED, TIMEOUT, CANCELLED})
# A waiting task further back than this shows as "#1000+".
POSITION_LIMIT = 1000
# Slot holders named in a wait note; more show as "…".
HOLDERS_SHOWN = 3
# How far the error column shows a message; the full text is in the title.
ERROR_CHARS = 60

WINDOWS = {
    "15m": (gettext_lazy("last 15 minutes"), timedelta(minutes=15)),
    "1h": (gettext_lazy("last hour"), timedelta(hours=1)),
    "24h": (gettext_lazy("last 24 hours"), timedelta(hours=24)),
}


# ------------------------------------------------------------------ filters


class ErrorCodeFilter(admin.SimpleListFilter):
    """Tasks that ended with this error code (fixed choices: no DISTINCT over the table)."""

    title = gettext_lazy("error code")
    parameter_name = "error_code"

    def lookups(self, request, model_admin):
        return ErrorCode.choices

    def queryset(self, request, queryset):
        if self.value() not in ErrorCode.values:
            return queryset
        return queryset.filter(error_code=self.value(), status__in=sorted(ERROR_STATUSES))


class FinishedWithinFilter(admin.SimpleListFilter):
    """Tasks finished in the last 15 min, hour or day; the list is then ordered by completion."""

    title = gettext_lazy("finish time")
    parameter_name = "finished"

    def lookups(self, request, model_admin):
        return [(key, label) for key, (label, _window) in WINDOWS.items()]

    def queryset(self, request, queryset):
        window = WINDOWS.get(self.value() or "")
        if window is None:
            return queryset
        return queryset.filter(completed_at__gte=timezone.now() - window[1])


class StuckFilter(admin.SimpleListFilter):
    """Running tasks that look stuck (stuck_condition)."""

    title = gettext_lazy("stuck tasks")
    parameter_name = "stuck"

    def lookups(self, request, model_admin):
        return [("yes", _("Stuck (running too long or no progress)"))]

    def queryset(self, request, queryset):
        if self.value() != "yes":
            return queryset
        return queryset.filter(status__in=sorted(EXECUTING)).filter(stuck_condition())


def finished_window(params) -> timedelta | None:
    window = WINDOWS.get(params.get("finished", ""))
    return window[1] if window else None


# ------------------------------------------------------------------ stuck tasks


def type_p95() -> dict[str, float]:
    """p95 run time (seconds) of recently completed tasks per type: the stats API's figures."""
    from tasks.admin.views import external_stats

    stats = external_stats()
    if stats is not None:
        return {t: f["p95"] for t, f in stats["durations"].items() if f.get("count") and f.get("p95")}
    from tasks.admin.views import durations

    return {d["task_type"]: d["p95"] for d in durations()}


def stuck_condition(now: datetime | None = None, p95: dict[str, float] | None = None) -> Q:
    """A running task is stuck when it has run more than STUCK_P95_FACTOR times its type's
    p95, or when it started more than STUCK_NO_PROGRESS_MINUTES ago and has written no
    step since (a step is a progress report with a message: TaskEvent kind "step")."""
    now = now or timezone.now()
    p95 = type_p95() if p95 is None else p95
    quiet = now - timedelta(minutes=settings.STUCK_NO_PROGRESS_MINUTES)
    recent_step = TaskEvent.objects.filter(task_id=OuterRef("pk"), at__gte=quiet)
    condition = Q(started_at__lt=quiet) & ~Exists(recent_step)
    for task_type, seconds in sorted(p95.items()):
        limit = timedelta(seconds=max(1.0, seconds) * settings.STUCK_P95_FACTOR)
        condition |= Q(task_type=task_type, started_at__lt=now - limit)
    return condition


def stuck_count(now: datetime | None = None, p95: dict[str, float] | None = None) -> int:
    return Task.objects.filter(status__in=sorted(EXECUTING)).filter(stuck_condition(now, p95)).count()


# ------------------------------------------------------------------ the error column


def error_summary(task: Task) -> str:
    """The error's text: its message, else the cancel reason, else the code's label."""
    return task.error_message or task.cancel_reason or (task.get_error_code_display() if task.error_code else "")


def error_cell(task: Task) -> SafeString | str:
    """Code and message, the message cut short; the full text in the title (on hover)."""
    if not task.error_code and not task.error_message:
        return "—"
    text = error_summary(task)
    return format_html(
        '<span class="tc-error" title="{}: {}"><code>{}</code> {}</span>',
        task.error_code or "—",
        text,
        task.error_code or "—",
        Truncator(text).chars(ERROR_CHARS),
    )


# ------------------------------------------------------------------ why a pending task waits


def _slot_holders(provider_ids: list[int]) -> dict[int, list[int]]:
    """Per provider, the tasks holding one of its slots (dispatch.slots_in_use, by id):
    three index ranges, never the backlog."""
    holders: dict[int, list[int]] = defaultdict(list)
    if not provider_ids:
        return holders
    base = Task.objects.order_by().values_list("provider_id", "pk")
    queries = (
        base.filter(provider_id__in=provider_ids, status__in=sorted(EXECUTING)),
        base.filter(provider_id__in=provider_ids, status=PENDING, admitted_at__isnull=False),
        base.filter(held_until__isnull=False, provider_id__in=provider_ids),
    )
    for query in queries:
        for provider_id, pk in query[:POSITION_LIMIT]:
            if pk not in holders[provider_id]:
                holders[provider_id].append(pk)
    for ids in holders.values():
        ids.sort()
    return holders


def _positions(rows: list[Task]) -> dict[int, int | None]:
    """Place in line (1 = next) of each waiting row; None beyond POSITION_LIMIT. One
    index range per provider: (provider, status, admitted_at, created_at, id)."""
    by_provider: dict[int, list[Task]] = defaultdict(list)
    for task in rows:
        by_provider[task.provider_id].append(task)
    places: dict[int, int | None] = {}
    for provider_id, tasks in by_provider.items():
        last = max(t.created_at for t in tasks)
        line = list(
            Task.objects.filter(provider_id=provider_id, status=PENDING, admitted_at__isnull=True, created_at__lte=last)
            .order_by("created_at", "id")
            .values_list("pk", flat=True)[:POSITION_LIMIT]
        )
        index = {pk: i + 1 for i, pk in enumerate(line)}
        for task in tasks:
            places[task.pk] = index.get(task.pk)
    return places


def _task_links(ids: list[int]) -> SafeString:
    shown = format_html_join(
        ", ", '<a href="{}">#{}</a>', ((change_url(Task._meta, pk), pk) for pk in ids[:HOLDERS_SHOWN])
    )
    return format_html("{}{}", shown, ", …" if len(ids) > HOLDERS_SHOWN else "")


def wait_notes(tasks: list[Task]) -> dict[int, SafeString]:
    """Why each pending task of a page waits, with links to the provider and to the
    tasks holding its slots: {task id: note}. A fixed number of queries (module doc)."""
    pending = [t for t in tasks if t.status == PENDING]
    if not pending:
        return {}
    holders = _slot_holders(sorted({t.provider_id for t in pending}))
    waiting = [
        t for t in pending if t.admitted_at is None and t.provider.enabled and t.provider.unreachable_since is None
    ]
    places = _positions(waiting)
    notes: dict[int, SafeString] = {}
    for task in pending:
        provider = task.provider
        link = admin_link(provider, provider.name)
        if task.admitted_at is not None:
            notes[task.pk] = format_html("{} · {}", _("admitted, waiting for a worker"), link)
        elif not provider.enabled:
            notes[task.pk] = format_html('<span class="tc-wait tc-wait--bad">{} {}</span>', link, _("disabled"))
        elif provider.unreachable_since is not None:
            notes[task.pk] = format_html(
                '<span class="tc-wait tc-wait--bad">{} {}</span>', link, _("unreachable (queue held)")
            )
        else:
            held = holders.get(provider.pk, [])
            limit = provider.concurrency_limit
            place = places.get(task.pk)
            place_text = f"#{place}" if place is not None else f"#{POSITION_LIMIT}+"
            if len(held) >= limit:
                notes[task.pk] = format_html(
                    '<span class="tc-wait">{} · {} ({}), {}</span>',
                    link,
                    _("slot %(used)s/%(limit)s") % {"used": len(held), "limit": limit},
                    _task_links(held),
                    place_text,
                )
            else:
                notes[task.pk] = format_html(
                    '<span class="tc-wait">{} · {}, {}</span>',
                    link,
                    _("slot %(used)s/%(limit)s") % {"used": len(held), "limit": limit},
                    place_text,
                )
    return notes
