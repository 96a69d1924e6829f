"""Console pages beyond the model admins: the dashboard and the progress JSON view.

Both are routed through TaskAdmin.get_urls (tasks/admin/task_admin.py):
``/admin/tasks/task/dashboard/`` and ``/admin/tasks/task/progress/?ids=1,2,3``.

The time series are computed here with portable ORM queries: finished tasks are
grouped per minute in the database (at most 360 rows per status over 6 hours,
whatever the volume) and folded into 5-minute buckets in Python, so no
database-specific date arithmetic or time-zone tables are needed.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django import forms
from django.conf import settings
from django.contrib.admin import ModelAdmin
from django.db.models import Count
from django.db.models.functions import TruncMinute
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.translation import gettext_lazy as _
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from tasks.admin import charts
from tasks.admin.common import SCRIPTS, STYLES, age, human_duration, progress_bar, status_badge
from tasks.admin.localtime import utc_text
from tasks.admin.other_admin import worker_alive_cutoff
from tasks.engine.states import (
    ACTIVE,
    ALL_STATES,
    CANCELLED,
    COMPLETED,
    EXECUTING,
    FAILED,
    FINAL,
    PENDING,
    TIMEOUT,
    InstanceStatus,
    TaskStatus,
    TaskType,
    word,
)
from tasks.messages import translate as translate_message
from tasks.models import Instance, Provider, Task, Worker

logger = logging.getLogger(__name__)

MAX_PROGRESS_IDS = 200
BUCKET_MINUTES = 5
WINDOW_HOURS = 6
DURATION_WINDOW_HOURS = 24
DURATION_SAMPLE = 20_000


# ------------------------------------------------------------------- progress JSON


def _may_view_tasks(user) -> bool:
    return bool(
        user.is_active and user.is_staff and (user.has_perm("tasks.view_task") or user.has_perm("tasks.change_task"))
    )


@never_cache
@require_GET
def progress_json(request: HttpRequest) -> JsonResponse:
    """``{id: {status, progress, status_message, ...}}`` for the task ids asked (staff only)."""
    if not _may_view_tasks(request.user):
        return JsonResponse({"code": "forbidden", "detail": _("staff with task view permission only")}, status=403)
    raw = request.GET.get("ids", "")
    parts = [p for p in raw.split(",") if p.strip()]
    # Ids are positive 64-bit integers; anything else is bad input, not a database error.
    if not parts or not all(p.strip().isdigit() and 0 < int(p) < 2**63 for p in parts):
        return JsonResponse(
            {"code": "invalid", "field": "ids", "detail": _("ids: a comma-separated list of task ids")}, status=400
        )
    if len(parts) > MAX_PROGRESS_IDS:
        return JsonResponse(
            {
                "code": "invalid",
                "field": "ids",
                "detail": _("ids: at most %(max)s per request") % {"max": MAX_PROGRESS_IDS},
            },
            status=400,
        )
    ids = {int(p) for p in parts}
    rows = Task.objects.filter(pk__in=ids).values_list(
        "pk", "status", "progress", "status_message", "instance_id", "instance__status", "error_message"
    )
    return JsonResponse(
        {
            str(pk): {
                "status": status,
                "status_display": str(TaskStatus(status).label) if status in TaskStatus.values else status,
                "progress": progress,
                # A failed task's bar says why it failed, not its last cleanup step (as the list).
                "status_message": error
                if status in (FAILED, TIMEOUT) and error
                else translate_message(message),  # stored in English (tasks/messages.py)
                "final": status in FINAL,
                "instance_id": instance_id,
                "instance_status": instance_status,
                "instance_status_display": str(InstanceStatus(instance_status).label)
                if instance_status in InstanceStatus.values
                else instance_status,
            }
            for pk, status, progress, message, instance_id, instance_status, error in rows
        }
    )


# ------------------------------------------------------------------- statistics


@dataclass
class ProviderQueue:
    id: int
    name: str
    enabled: bool
    running: int
    pending: int
    admitted: int
    limit: int
    unreachable_since: datetime | None = None  # held until it answers (tasks.engine.health)


def status_counts() -> dict[str, int]:
    counts = dict.fromkeys(ALL_STATES, 0)
    for status, n in Task.objects.order_by().values_list("status").annotate(n=Count("pk")):
        counts[status] = n
    return counts


def provider_queues() -> list[ProviderQueue]:
    per: dict[int, dict[str, int]] = defaultdict(lambda: {"running": 0, "pending": 0, "admitted": 0})
    rows = (
        Task.objects.filter(status__in=ACTIVE)
        .order_by()
        .values_list("provider_id", "status")
        .annotate(n=Count("pk"), admitted=Count("admitted_at"))
    )
    for provider_id, status, n, admitted in rows:
        if status in EXECUTING:
            per[provider_id]["running"] += n
        else:
            per[provider_id]["pending"] += n
            per[provider_id]["admitted"] += admitted
    return [
        ProviderQueue(
            p.pk, p.name, p.enabled, limit=p.concurrency_limit, unreachable_since=p.unreachable_since, **per[p.pk]
        )
        for p in Provider.objects.order_by("name")
    ]


def _bucket_start(now: datetime, minutes: int, count: int) -> datetime:
    now = now.astimezone(UTC)
    floor = now.replace(second=0, microsecond=0) - timedelta(minutes=now.minute % minutes)
    return floor - timedelta(minutes=minutes * (count - 1))


def throughput(now: datetime | None = None, hours: int = WINDOW_HOURS, minutes: int = BUCKET_MINUTES) -> list[dict]:
    """Per bucket: tasks created, and tasks finished by final status, plus the error rate.

    The error rate is the share of failed + timed-out among finished tasks (the
    API's definition); None when nothing finished in the bucket.
    """
    now = now or timezone.now()
    count = hours * 60 // minutes
    start = _bucket_start(now, minutes, count)
    buckets = [
        {"start": start + timedelta(minutes=minutes * i), "created": 0, **dict.fromkeys(FINAL, 0)} for i in range(count)
    ]

    def index(moment: datetime) -> int | None:
        i = int((moment - start).total_seconds() // (minutes * 60))
        return i if 0 <= i < count else None

    finished = (
        Task.objects.filter(completed_at__gte=start, status__in=FINAL)
        .order_by()
        .annotate(minute=TruncMinute("completed_at", tzinfo=UTC))
        .values_list("minute", "status")
        .annotate(n=Count("pk"))
    )
    for minute, status, n in finished:
        i = index(minute)
        if i is not None:
            buckets[i][status] += n
    created = (
        Task.objects.filter(created_at__gte=start)
        .order_by()
        .annotate(minute=TruncMinute("created_at", tzinfo=UTC))
        .values_list("minute")
        .annotate(n=Count("pk"))
    )
    for minute, n in created:
        i = index(minute)
        if i is not None:
            buckets[i]["created"] += n
    for b in buckets:
        done = sum(b[s] for s in FINAL)
        b["finished"] = done
        b["error_rate"] = round(100 * (b[FAILED] + b[TIMEOUT]) / done, 1) if done else None
        b["label"] = f"{b['start']:%H:%M}–{b['start'] + timedelta(minutes=minutes):%H:%M} UTC"
    return buckets


def error_rate(since: datetime) -> float | None:
    rows = dict(
        Task.objects.filter(completed_at__gte=since, status__in=FINAL)
        .order_by()
        .values_list("status")
        .annotate(n=Count("pk"))
    )
    done = sum(rows.values())
    return round(100 * (rows.get(FAILED, 0) + rows.get(TIMEOUT, 0)) / done, 1) if done else None


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    k = (len(sorted_values) - 1) * q
    low = int(k)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (k - low)


def durations(now: datetime | None = None, hours: int = DURATION_WINDOW_HOURS) -> list[dict]:
    """avg, p50, p95 and max run time (started -> completed) of completed tasks per type."""
    since = (now or timezone.now()) - timedelta(hours=hours)
    samples: dict[str, list[float]] = defaultdict(list)
    rows = (
        Task.objects.filter(status=COMPLETED, completed_at__gte=since, started_at__isnull=False)
        .order_by("-completed_at")
        .values_list("task_type", "started_at", "completed_at")[:DURATION_SAMPLE]
    )
    for task_type, started, completed in rows:
        samples[task_type].append(max(0.0, (completed - started).total_seconds()))
    out = []
    for task_type in TaskType.values:
        values = sorted(samples.get(task_type, []))
        if not values:
            continue
        out.append(
            {
                "task_type": task_type,
                "count": len(values),
                "avg": sum(values) / len(values),
                "p50": _percentile(values, 0.5),
                "p95": _percentile(values, 0.95),
                "max": values[-1],
            }
        )
    return out


def live_workers(provider_names: dict[int, str] | None = None) -> list[Worker]:
    """Workers with a recent heartbeat; each with ``queue_label``: its provider's name for a
    provider queue ("provider-3" is sim-b's), else the queue's own name."""
    workers = list(
        Worker.objects.filter(last_heartbeat__gte=worker_alive_cutoff())
        .select_related("current_task")
        .order_by("queue", "name")
    )
    names = provider_names if provider_names is not None else dict(Provider.objects.values_list("pk", "name"))
    for worker in workers:
        worker.queue_label = queue_label(worker.queue, names)
        worker.heartbeat_age = age(worker.last_heartbeat)
    return workers


def queue_label(queue: str, names: dict[int, str]) -> str:
    prefix, _sep, number = queue.rpartition("-")
    if prefix == "provider" and number.isdigit() and int(number) in names:
        return names[int(number)]
    return queue


@dataclass
class HealthItem:
    key: str
    label: str
    value: str
    url: str
    bad: bool
    title: str = ""


def health_strip(now: datetime, p95: dict[str, float] | None = None) -> list[HealthItem]:
    """What needs an operator now, each linking to the filtered list that shows it.

    ``p95``: run time per task type (the dashboard's figures), for the stuck count.
    """
    from tasks.admin.task_admin import TaskAdmin
    from tasks.admin.triage import stuck_count

    tasks_url = reverse("admin:tasks_task_changelist")
    unreachable = Provider.objects.filter(unreachable_since__isnull=False).count()
    stuck = stuck_count(now, p95)
    # (status, created_at, id) read from its oldest end: one index entry.
    oldest = Task.objects.filter(status=PENDING).order_by("created_at", "id").values_list("pk", "created_at").first()
    reconcile = Instance.objects.filter(needs_reconcile=True).count()
    age_column = 1 + TaskAdmin.list_display.index("age_col")  # the list's ?o= counts the checkbox as 0
    return [
        HealthItem(
            "unreachable",
            _("providers held unreachable"),
            str(unreachable),
            reverse("admin:tasks_provider_changelist") + "?reachable=no",
            unreachable > 0,
        ),
        HealthItem(
            "stuck",
            _("stuck tasks"),
            str(stuck),
            tasks_url + "?stuck=yes",
            stuck > 0,
            _("running more than %(factor)s× their type's p95, or no progress reported for %(minutes)s min")
            % {"factor": f"{settings.STUCK_P95_FACTOR:g}", "minutes": settings.STUCK_NO_PROGRESS_MINUTES},
        ),
        HealthItem(
            "oldest-pending",
            _("oldest pending task"),
            human_duration(now - oldest[1]) if oldest else "—",
            f"{tasks_url}?status__exact={PENDING}&o={age_column}",
            bool(oldest) and (now - oldest[1]).total_seconds() > 60 * settings.STUCK_NO_PROGRESS_MINUTES,
            _("task %(id)s, created %(when)s") % {"id": oldest[0], "when": utc_text(oldest[1])} if oldest else "",
        ),
        HealthItem(
            "reconcile",
            _("instances needing reconciliation"),
            str(reconcile),
            reverse("admin:tasks_instance_changelist") + "?needs_reconcile__exact=1",
            reconcile > 0,
        ),
    ]


def external_stats(now: datetime | None = None) -> dict | None:
    """tasks.stats.task_stats() (the API's figures, exact and cached at scale), if it loads.

    The dashboard shows the same counts, error rates and durations as
    GET /api/v1/admin/tasks/stats/; its own queries are the fallback.
    """
    try:
        from tasks.stats import task_stats
    except ImportError:
        return None
    try:
        return task_stats(now)
    except Exception:
        logger.exception("task_stats() failed; the dashboard uses its own figures")
        return None


def _percent(rate: float | None) -> float | None:
    return None if rate is None else round(100 * rate, 1)


# ------------------------------------------------------------------- dashboard

FINISHED_SERIES = [
    charts.Series(COMPLETED, TaskStatus.COMPLETED.label, "tc-s-completed"),
    charts.Series(FAILED, TaskStatus.FAILED.label, "tc-s-failed"),
    charts.Series(TIMEOUT, TaskStatus.TIMEOUT.label, "tc-s-timeout"),
    charts.Series(CANCELLED, TaskStatus.CANCELLED.label, "tc-s-cancelled"),
]


def dashboard_context(now: datetime | None = None) -> dict:
    now = now or timezone.now()
    stats = external_stats(now)
    queues = provider_queues()
    series = throughput(now)
    workers = live_workers({q.id: q.name for q in queues})
    if stats is not None:
        counts = {status: stats["by_status"].get(status, 0) for status in ALL_STATES}
        error_rate_1h = _percent(stats["error_rate"]["last_hour"]["rate"])
        error_rate_24h = _percent(stats["error_rate"]["last_24h"]["rate"])
        per_type = [
            {"task_type": task_type, "max": None, **figures}
            for task_type, figures in stats["durations"].items()
            if figures["count"]
        ]
        utilization = _percent(stats.get("worker_utilization"))
    else:
        counts = status_counts()
        error_rate_1h = error_rate(now - timedelta(hours=1))
        error_rate_24h = error_rate(now - timedelta(hours=24))
        per_type = durations(now)
        utilization = None
    p95 = {d["task_type"]: d["p95"] for d in per_type if d.get("p95")}
    # An x label every hour, on the bucket that starts the hour.
    x_labels = {i: f"{b['start']:%H:%M}" for i, b in enumerate(series) if b["start"].minute == 0}
    status_bars = [
        charts.Bar(TaskStatus(s).label, counts[s], css=f"tc-s-{s}", title=f"{counts[s]} {word(TaskStatus, s)}")
        for s in ALL_STATES
    ]
    duration_bars = []
    for d in per_type:
        duration_bars.append(
            charts.Bar(
                d["task_type"],
                d["p95"],
                css="tc-s-running",
                title=_("%(type)s: %(count)s completed; avg %(avg)s, p50 %(p50)s, p95 %(p95)s")
                % {
                    "type": d["task_type"],
                    "count": d["count"],
                    "avg": human_duration(d["avg"]),
                    "p50": human_duration(d["p50"]),
                    "p95": human_duration(d["p95"]),
                },
                text=f"p95 {human_duration(d['p95'])} · p50 {human_duration(d['p50'])}",
            )
        )
    finished_6h = sum(b["finished"] for b in series)
    return {
        "now": now,
        "health": health_strip(now, p95),
        "counts": counts,
        "active": sum(counts[s] for s in ACTIVE),
        "queues": queues,
        "queue_length": sum(q.pending for q in queues),
        "series": series,
        "per_type": per_type,
        "workers": workers,
        "busy_workers": sum(1 for w in workers if w.current_task_id),
        "finished_6h": finished_6h,
        "error_rate_1h": error_rate_1h,
        "error_rate_24h": error_rate_24h,
        "utilization": utilization,
        "running_tasks": [
            (t, status_badge(t.pk, t.status), progress_bar(t.pk, t.status, t.progress, t.status_message))
            for t in Task.objects.filter(status__in=ACTIVE)
            .select_related("provider", "instance", "owner")
            .order_by("created_at", "id")[:20]
        ],
        "pending_count": counts[PENDING],
        "from_stats_api": stats is not None,
        "chart_status": charts.hbars(status_bars, label=_("Tasks by status")),
        "chart_queues": charts.queues(
            [charts.QueueRow(q.name, q.running, q.pending, q.limit, q.enabled) for q in queues],
            label=_("Running and pending tasks per provider against its limit"),
        )
        if queues
        else None,
        "chart_throughput": charts.columns(
            series,
            FINISHED_SERIES,
            label=_("Tasks finished per %(minutes)s minutes over the last %(hours)s hours")
            % {"minutes": BUCKET_MINUTES, "hours": WINDOW_HOURS},
            x_labels=x_labels,
        ),
        "chart_errors": charts.line(
            [b["error_rate"] for b in series],
            label=_("Error rate per %(minutes)s minutes over the last %(hours)s hours")
            % {"minutes": BUCKET_MINUTES, "hours": WINDOW_HOURS},
            x_labels=x_labels,
            tips=[
                f"{b['label']}: "
                + (
                    _("no task finished")
                    if b["error_rate"] is None
                    else _("%(rate)s%% failed") % {"rate": b["error_rate"]}
                )
                for b in series
            ],
        ),
        "chart_durations": charts.hbars(
            duration_bars, label=_("Run time per task type (p95)"), label_width=110, value_width=190
        )
        if duration_bars
        else None,
        "bucket_minutes": BUCKET_MINUTES,
        "window_hours": WINDOW_HOURS,
        "duration_hours": DURATION_WINDOW_HOURS,
    }


def dashboard(request: HttpRequest, model_admin: ModelAdmin) -> HttpResponse:
    context = {
        **model_admin.admin_site.each_context(request),
        **dashboard_context(),
        "title": _("Task dashboard"),
        "subtitle": None,
        "opts": model_admin.model._meta,
        "media": forms.Media(css={"all": STYLES}, js=(*SCRIPTS, "tasks/dashboard.js")),
    }
    return TemplateResponse(request, "admin/tasks/dashboard.html", context)
