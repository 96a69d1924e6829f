"""Task statistics for the API, the admin dashboard and /metrics; exact at a million rows.

``task_stats(now=None) -> dict`` is the whole answer of GET /api/v1/admin/tasks/stats/;
``task_counts(now=None)`` the aggregate under it (tasks.metrics reads it too) and
``count_tasks(statuses, task_types, owners)`` the admin list's count.

How it stays fast on large tables
---------------------------------
Counting every task by (status, type, provider, error code) means reading every
row: one to five seconds at 1M rows on MariaDB. But a finished task never changes
again, and every terminal transition stamps ``completed_at``. So the aggregate
is split at a boundary B, which trails the clock by BASE_MARGIN_SECONDS (room
for clocks that disagree between machines) and moves in BASE_STEP_SECONDS steps:

- base: tasks with ``completed_at < B`` and id <= M (the highest id when the base
  was last moved). Immutable, so it is kept per process and, when B moves, moved
  incrementally: only the tasks that finished in between are read.
- live: tasks still active (``completed_at IS NULL``) or finished since B, read
  through the (completed_at, task_type, status, owner) index: a few thousand rows.
- new: tasks with id > M that finished before B (inserted back-dated: imports, tests).

The three parts never overlap and cover the table, so the sum is exact. Only
deletions (a purge, the admin's delete) change the base: each adds to the
TaskDeletions count in its transaction, and a base built at another count, or
with another lowest id, is rebuilt from scratch; so is any base older than
FULL_REBUILD_SECONDS. Tables below SMALL_TABLE rows are counted in one query and
nothing is kept.

Counts per owner (the admin list filtered by username or user) are kept the
same way, by (owner, status), but only once a caller asks for them: the first
such count of a process reads the whole table once (about a second at 1M rows),
later ones read the owners' live rows only. Memory: about 200 bytes per user
who has tasks.

Durations (avg, p50, p95 per type) use a bounded recent window: completed tasks
finished in the last DURATION_WINDOW (24 h), at most DURATION_SAMPLE (200) of
the most recent per type. Percentiles are nearest-rank over that sample. The
base keeps the newest DURATION_SAMPLE durations per type finished before B, so a
call only reads the durations of tasks finished since B.

worker_utilization = tasks holding a provider slot (running or cancelling) /
the sum of the concurrency limits of enabled providers: the share of the
system's admission capacity in use. (Idle django-q2 processes are not a useful
denominator: each provider's queue has its own workers, and a busy provider's
limit, not the process count, bounds its throughput.) Live and busy worker
processes are reported beside it under ``workers``.
"""

from __future__ import annotations

import heapq
import math
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection
from django.db.models import Case, Count, DurationField, F, IntegerField, Q, Sum, Value, When
from django.utils import timezone

from tasks.engine.states import ALL_STATES, CANCELLING, COMPLETED, FAILED, FINAL, PENDING, RUNNING, TIMEOUT, TaskType
from tasks.lookups import owner_in
from tasks.models import Provider, Task, TaskDeletions, Worker

BASE_STEP_SECONDS = 60
BASE_MARGIN_SECONDS = 300
FULL_REBUILD_SECONDS = 3600
SMALL_TABLE = 20_000
DURATION_WINDOW = timedelta(hours=24)
DURATION_SAMPLE = 200
# Upper bounds (seconds) of the duration histogram buckets; the last bucket is +Inf.
HISTOGRAM_BUCKETS: tuple[float, ...] = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
NO_BUCKET = -1

# (status, task_type, provider_id, error_code, bucket) -> [count, duration seconds]
CountKey = tuple[str, str, int, str, int]
Counts = dict[CountKey, list[float]]
# (completed_at, seconds), newest first
Samples = dict[str, list[tuple[datetime, float]]]
# owner id -> task count per state, in ALL_STATES order
OwnerCounts = dict[int, tuple[int, ...]]
STATE_INDEX = {status: i for i, status in enumerate(ALL_STATES)}
# Owner counts: up to this many owners, their live rows are read by owner id;
# beyond, every live row is grouped by owner (see _owner_total).
OWNER_FILTER_MAX = 100


def live_worker_cutoff(now: datetime | None = None) -> datetime:
    """Workers that beat since then are alive (3 missed heartbeats + 10 s of slack)."""
    now = now or timezone.now()
    return now - timedelta(seconds=3 * settings.TASK_HEARTBEAT_SECONDS + 10)


def _seconds(value) -> float:
    if value is None:
        return 0.0
    if isinstance(value, timedelta):
        return value.total_seconds()
    return float(value) / 1e6  # MySQL and SQLite give temporal differences in microseconds


def _bucket_expression() -> Case:
    ran = Q(status=COMPLETED, started_at__isnull=False, completed_at__isnull=False)
    whens = [
        When(ran & Q(completed_at__lte=F("started_at") + timedelta(seconds=bound)), then=Value(i))
        for i, bound in enumerate(HISTOGRAM_BUCKETS)
    ]
    whens.append(When(ran, then=Value(len(HISTOGRAM_BUCKETS))))
    return Case(*whens, default=Value(NO_BUCKET), output_field=IntegerField())


def _aggregate(queryset) -> Counts:
    duration = Case(
        When(
            status=COMPLETED,
            started_at__isnull=False,
            completed_at__isnull=False,
            then=F("completed_at") - F("started_at"),
        ),
        output_field=DurationField(),
    )
    rows = (
        queryset.order_by()
        .annotate(bucket=_bucket_expression())
        .values("status", "task_type", "provider_id", "error_code", "bucket")
        .annotate(n=Count("id"), duration=Sum(duration))
    )
    counts: Counts = {}
    for row in rows:
        key = (row["status"], row["task_type"], row["provider_id"], row["error_code"] or "", row["bucket"])
        counts[key] = [row["n"], _seconds(row["duration"])]
    return counts


def _merge(*parts: Counts) -> Counts:
    total: Counts = defaultdict(lambda: [0, 0.0])
    for part in parts:
        for key, (n, seconds) in part.items():
            total[key][0] += n
            total[key][1] += seconds
    return dict(total)


def _completed(queryset):
    return queryset.filter(status=COMPLETED, started_at__isnull=False, completed_at__isnull=False)


def _samples_per_type(queryset) -> Samples:
    """The newest DURATION_SAMPLE durations per type in ``queryset`` (one indexed query per type)."""
    result: Samples = {}
    for task_type in TaskType.values:
        rows = (
            _completed(queryset.filter(task_type=task_type))
            .order_by("-completed_at")
            .values_list("completed_at", "started_at")[:DURATION_SAMPLE]
        )
        result[task_type] = [(done, max(0.0, (done - start).total_seconds())) for done, start in rows]
    return result


def _samples_of(queryset) -> Samples:
    """Durations of every completed task in a small queryset, grouped by type."""
    result: Samples = defaultdict(list)
    for task_type, done, start in _completed(queryset).values_list("task_type", "completed_at", "started_at"):
        result[task_type].append((done, max(0.0, (done - start).total_seconds())))
    return result


def _newest(*parts: Samples) -> Samples:
    result: Samples = {}
    for task_type in {t for part in parts for t in part}:
        merged = (item for part in parts for item in part.get(task_type, ()))
        result[task_type] = heapq.nlargest(DURATION_SAMPLE, merged, key=lambda item: item[0])
    return result


def _owner_status_counts(queryset) -> OwnerCounts:
    rows = queryset.order_by().values_list("owner_id", "status").annotate(n=Count("id"))
    result: dict[int, list[int]] = {}
    for owner, status, n in rows:
        result.setdefault(owner, [0] * len(ALL_STATES))[STATE_INDEX[status]] += n
    return {owner: tuple(counts) for owner, counts in result.items()}


def _merge_owners(*parts: OwnerCounts) -> OwnerCounts:
    total: dict[int, tuple[int, ...]] = {}
    for part in parts:
        for owner, counts in part.items():
            kept = total.get(owner)
            total[owner] = counts if kept is None else tuple(a + b for a, b in zip(kept, counts, strict=True))
    return total


@dataclass(frozen=True)
class _Base:
    boundary: datetime
    max_id: int
    min_id: int
    deleted: int
    built: float
    counts: Counts
    samples: Samples = field(default_factory=dict)
    by_owner: OwnerCounts | None = None  # built on first use (owner_counts)
    by_status_type: dict[tuple[str, str], int] = field(init=False)

    def __post_init__(self) -> None:
        reduced: dict[tuple[str, str], int] = defaultdict(int)
        for (status, task_type, _p, _c, _b), (n, _s) in self.counts.items():
            reduced[(status, task_type)] += int(n)
        object.__setattr__(self, "by_status_type", dict(reduced))


_bases: dict[str, _Base] = {}
_lock = threading.Lock()


def reset_cache() -> None:
    """Forget the kept base aggregates (tests; after bulk changes to old rows)."""
    with _lock:
        _bases.clear()
    from tasks.waitstats import clear_cache

    clear_cache()


def _target_boundary(now: datetime) -> datetime:
    epoch = int(now.timestamp()) - BASE_MARGIN_SECONDS
    return datetime.fromtimestamp(epoch - epoch % BASE_STEP_SECONDS, tz=UTC)


def _base_rows(boundary: datetime, max_id: int):
    """The tasks a base holds: finished before its boundary, up to its highest id."""
    return Task.objects.filter(completed_at__lt=boundary, id__lte=max_id)


def _current_base(now: datetime, lo: int, hi: int, deleted: int) -> _Base:
    key = connection.settings_dict["NAME"]
    with _lock:
        base = _bases.get(key)
    boundary = _target_boundary(now)
    stale = (
        base is None
        or base.min_id != lo
        or base.deleted != deleted
        or base.max_id > hi
        or boundary < base.boundary
        or time.monotonic() - base.built > FULL_REBUILD_SECONDS
    )
    if stale:
        everything = _base_rows(boundary, hi)
        window = everything.filter(completed_at__gte=now - DURATION_WINDOW)
        base = _Base(boundary, hi, lo, deleted, time.monotonic(), _aggregate(everything), _samples_per_type(window))
    elif boundary > base.boundary:
        # Move the base over what finished between the two boundaries, and over rows
        # inserted since that finished before the new boundary (back-dated inserts).
        between = Task.objects.filter(completed_at__gte=base.boundary, completed_at__lt=boundary, id__lte=hi)
        newer = Task.objects.filter(id__gt=base.max_id, id__lte=hi, completed_at__lt=base.boundary)
        by_owner = base.by_owner
        if by_owner is not None:
            by_owner = _merge_owners(by_owner, _owner_status_counts(between), _owner_status_counts(newer))
        base = _Base(
            boundary,
            hi,
            lo,
            deleted,
            base.built,
            _merge(base.counts, _aggregate(between), _aggregate(newer)),
            _newest(base.samples, _samples_per_type(between), _samples_of(newer)),
            by_owner,
        )
    else:
        return base
    with _lock:
        _bases[key] = base
    return base


def _table_bounds() -> tuple[int | None, int | None, int]:
    """The lowest and highest task id, and the TaskDeletions count, in one round trip."""
    qn = connection.ops.quote_name
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT MIN({qn('id')}), MAX({qn('id')}), "
            f"(SELECT {qn('deleted')} FROM {qn(TaskDeletions._meta.db_table)} WHERE {qn('id')} = 1) "
            f"FROM {qn(Task._meta.db_table)}"
        )
        lo, hi, deleted = cursor.fetchone()
    return lo, hi, deleted or 0


def _base_or_none(now: datetime) -> tuple[_Base | None, bool]:
    """The kept base for a large table; (None, False) for a small one; (None, True) for an empty one."""
    lo, hi, deleted = _table_bounds()
    if hi is None:
        return None, True
    if hi - lo + 1 < SMALL_TABLE:
        return None, False
    return _current_base(now, lo, hi, deleted), False


def _outside(base: _Base):
    """The two querysets that hold every task the base does not: live, and inserted back-dated."""
    recent = Task.objects.filter(Q(completed_at__isnull=True) | Q(completed_at__gte=base.boundary))
    newer = Task.objects.filter(id__gt=base.max_id, completed_at__lt=base.boundary)
    return recent, newer


def task_counts(now: datetime | None = None) -> Counts:
    """Exact counts of every task by (status, type, provider, error code, duration bucket)."""
    base, empty = _base_or_none(now or timezone.now())
    if empty:
        return {}
    if base is None:
        return _aggregate(Task.objects.all())
    recent, newer = _outside(base)
    return _merge(base.counts, _aggregate(recent), _aggregate(newer))


def _status_type_counts(queryset) -> dict[tuple[str, str], int]:
    # (status, task_type) only: the (completed_at, task_type, status, owner) index answers
    # this for the live part without reading a row.
    rows = queryset.order_by().values("status", "task_type").annotate(n=Count("id"))
    return {(row["status"], row["task_type"]): row["n"] for row in rows}


def _by_status_type(base: _Base | None, empty: bool) -> dict[tuple[str, str], int]:
    if empty:
        return {}
    if base is None:
        return _status_type_counts(Task.objects.all())
    recent, newer = _outside(base)
    total: dict[tuple[str, str], int] = defaultdict(int)
    for part in (base.by_status_type, _status_type_counts(recent), _status_type_counts(newer)):
        for key, n in part.items():
            total[key] += n
    return dict(total)


def _recent_samples(now: datetime, base: _Base | None, empty: bool) -> Samples:
    if empty:
        return {}
    window = Task.objects.filter(completed_at__gte=now - DURATION_WINDOW)
    if base is None:
        return _samples_per_type(window)
    _recent, newer = _outside(base)
    since_boundary = window.filter(completed_at__gte=base.boundary)
    return _newest(base.samples, _samples_per_type(since_boundary), _samples_of(newer))


def _with_owner_counts(base: _Base) -> _Base:
    """``base`` with its per-owner counts, reading the whole base once if it has none yet."""
    if base.by_owner is not None:
        return base
    counted = replace(base, by_owner=_owner_status_counts(_base_rows(base.boundary, base.max_id)))
    key = connection.settings_dict["NAME"]
    with _lock:
        if _bases.get(key) is base:
            _bases[key] = counted
    return counted


def _owner_total(base: _Base | None, empty: bool, owners: list[int], statuses: list[str] | None) -> int:
    if empty or not owners:
        return 0
    base = _with_owner_counts(base)
    wanted = [STATE_INDEX[s] for s in statuses] if statuses else range(len(ALL_STATES))
    found = [counts for counts in map(base.by_owner.get, owners) if counts is not None]
    total = sum(sum(column) for i, column in enumerate(zip(*found, strict=True)) if i in wanted)
    recent, newer = _outside(base)
    if statuses:
        recent, newer = recent.filter(status__in=statuses), newer.filter(status__in=statuses)
    if len(owners) <= OWNER_FILTER_MAX:
        # A few owners: their live rows only. Many: counting every live row by owner
        # and keeping theirs was faster (1,000 and 5,000 owners at a million tasks).
        match = owner_in(owners)
        recent, newer = recent.filter(match), newer.filter(match)
    wanted_owners = set(owners)
    for part in (recent, newer):
        rows = part.order_by().values_list("owner_id").annotate(n=Count("id")).values_list("owner_id", "n")
        total += sum(n for owner, n in rows if owner in wanted_owners)
    return total


def count_tasks(
    statuses: list[str] | None = None,
    task_types: list[str] | None = None,
    owners: list[int] | None = None,
    now: datetime | None = None,
) -> int | None:
    """Exact number of tasks with these states, types and owners; None when COUNT(*) is the cheaper way.

    For the admin list: COUNT(*) over 900,000 "completed" rows takes a second on
    MariaDB, and over the 200,000 tasks of the 1,000 users a username fragment
    matches 100 ms; the kept base plus the live part takes a few milliseconds.
    None on a small table, and for owners and types together (not kept).
    """
    if owners is not None and task_types:
        return None
    base, empty = _base_or_none(now or timezone.now())
    if base is None and not empty:
        return None
    if owners is not None:
        return _owner_total(base, empty, sorted(set(owners)), statuses)
    return sum(
        n
        for (status, task_type), n in _by_status_type(base, empty).items()
        if (not statuses or status in statuses) and (not task_types or task_type in task_types)
    )


def _percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def durations(now: datetime | None = None, samples: Samples | None = None) -> dict[str, dict[str, Any]]:
    """avg/p50/p95 seconds of recently completed tasks per type (see the module doc)."""
    now = now or timezone.now()
    if samples is None:
        samples = _recent_samples(now, *_base_or_none(now))
    since = now - DURATION_WINDOW
    result = {}
    for task_type in TaskType.values:
        recent = [seconds for done, seconds in samples.get(task_type, ()) if done >= since][:DURATION_SAMPLE]
        values = sorted(recent)
        avg = sum(values) / len(values) if values else None
        result[task_type] = {
            "count": len(values),
            "avg": round(avg, 3) if avg is not None else None,
            "p50": _percentile(values, 0.50),
            "p95": _percentile(values, 0.95),
        }
    return result


def error_rates(now: datetime | None = None) -> dict[str, dict[str, Any]]:
    """Share of finished tasks that failed or timed out, over the last hour and 24 hours."""
    now = now or timezone.now()
    hour_ago, day_ago = now - timedelta(hours=1), now - timedelta(hours=24)
    rows = (
        Task.objects.filter(completed_at__gte=day_ago, status__in=FINAL)
        .order_by()
        .values("status")
        .annotate(day=Count("id"), hour=Count("id", filter=Q(completed_at__gte=hour_ago)))
    )
    windows = {"last_hour": defaultdict(int), "last_24h": defaultdict(int)}
    for row in rows:
        windows["last_hour"][row["status"]] += row["hour"]
        windows["last_24h"][row["status"]] += row["day"]
    result = {}
    for name, by_status in windows.items():
        finished = sum(by_status.values())
        errors = by_status[FAILED] + by_status[TIMEOUT]
        result[name] = {
            "rate": round(errors / finished, 4) if finished else None,
            "failed": by_status[FAILED],
            "timeout": by_status[TIMEOUT],
            "finished": finished,
        }
    return result


def worker_counts(now: datetime | None = None) -> dict[str, int]:
    live = Worker.objects.filter(last_heartbeat__gte=live_worker_cutoff(now))
    row = live.aggregate(live=Count("id"), busy=Count("id", filter=Q(current_task__isnull=False)))
    return {"live": row["live"] or 0, "busy": row["busy"] or 0}


def task_stats(now: datetime | None = None) -> dict[str, Any]:
    """Everything GET /api/v1/admin/tasks/stats/ answers (see the module doc)."""
    now = now or timezone.now()
    base, empty = _base_or_none(now)
    by_status = dict.fromkeys(ALL_STATES, 0)
    by_type = dict.fromkeys(TaskType.values, 0)
    for (status, task_type), n in _by_status_type(base, empty).items():
        by_status[status] = by_status.get(status, 0) + n
        by_type[task_type] = by_type.get(task_type, 0) + n
    # Active tasks are never in the base (they have no completed_at): few rows, read directly.
    per_provider: dict[int, dict[str, int]] = defaultdict(lambda: {"pending": 0, "running": 0})
    active = Task.objects.filter(status__in=(PENDING, RUNNING, CANCELLING)).order_by()
    for row in active.values("provider_id", "status").annotate(n=Count("id")):
        per_provider[row["provider_id"]]["pending" if row["status"] == PENDING else "running"] += row["n"]
    providers = []
    slots = 0
    for provider in Provider.objects.order_by("name", "id"):
        limit = provider.concurrency_limit
        if provider.enabled:
            slots += limit
        providers.append(
            {
                "id": provider.pk,
                "name": provider.name,
                "type": provider.provider_type,
                "enabled": provider.enabled,
                "pending": per_provider[provider.pk]["pending"],
                "running": per_provider[provider.pk]["running"],
                "limit": limit,
            }
        )
    running = by_status[RUNNING] + by_status[CANCELLING]
    return {
        "generated_at": now,
        "total": sum(by_status.values()),
        "by_status": by_status,
        "by_type": by_type,
        "by_provider": providers,
        "durations": durations(now, _recent_samples(now, base, empty)),
        "duration_window": {"seconds": int(DURATION_WINDOW.total_seconds()), "max_samples_per_type": DURATION_SAMPLE},
        "error_rate": error_rates(now),
        "queue_length": by_status[PENDING],
        "running": running,
        "slots": slots,
        "worker_utilization": round(running / slots, 4) if slots else None,
        "workers": worker_counts(now),
        "wait": _wait(),
    }


def _wait() -> dict[str, Any]:
    """created -> started per provider and type, last 24 h (tasks.waitstats), without the histogram's buckets."""
    from tasks.waitstats import wait_stats

    data = wait_stats()
    keep = ("provider", "task_type", "count", "avg", "p50", "p95")
    return {**data, "by_provider_type": [{k: row[k] for k in keep} for row in data["by_provider_type"]]}
