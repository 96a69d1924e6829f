"""How long tasks wait: created -> started, per provider and type, over the last 24 hours.

OneClickVirt's "average response time": what a user feels between asking and the
work beginning (queueing behind the provider's limit, admission, the worker's
pick-up). The admin stats API answers p50/p95/avg per (provider, type); /metrics
exposes the same window as the histogram ``cloudhost_task_wait_seconds``.

The rows are the tasks started within the window. They are read through the
(completed_at, ...) index: a task started in the last 24 h has not finished or
finished within them, so the range on completed_at bounds the read however
large the table. The answer is kept per process for CACHE_SECONDS.
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

from django.db import connection
from django.db.models import Q
from django.utils import timezone

from tasks.models import Provider, Task

WINDOW = timedelta(hours=24)
CACHE_SECONDS = 15.0
# Upper bounds (seconds) of the wait histogram's buckets; the last is +Inf.
BUCKETS: tuple[float, ...] = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600)

_cache: dict[str, tuple[float, dict]] = {}
_lock = threading.Lock()


def _percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], 3)


def samples(now: datetime | None = None) -> dict[tuple[int, str], list[float]]:
    """(provider id, task type) -> sorted waits in seconds of the tasks started in the window."""
    now = now or timezone.now()
    since = now - WINDOW
    rows = (
        Task.objects.filter(Q(completed_at__isnull=True) | Q(completed_at__gte=since), started_at__gte=since)
        .order_by()
        .values_list("provider_id", "task_type", "created_at", "started_at")
    )
    out: dict[tuple[int, str], list[float]] = defaultdict(list)
    for provider_id, task_type, created, started in rows.iterator(chunk_size=5000):
        out[(provider_id, task_type)].append(max(0.0, (started - created).total_seconds()))
    for values in out.values():
        values.sort()
    return out


def wait_stats(now: datetime | None = None, *, cached: bool = True) -> dict[str, Any]:
    """``{"window_seconds", "by_provider_type": [{provider, task_type, count, avg, p50, p95}]}``."""
    key = connection.settings_dict["NAME"]
    if cached and now is None:
        with _lock:
            hit = _cache.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
    data = samples(now)
    names = dict(Provider.objects.filter(pk__in={p for p, _t in data}).values_list("id", "name"))
    rows = []
    for (provider_id, task_type), values in sorted(data.items(), key=lambda kv: (names.get(kv[0][0], ""), kv[0])):
        rows.append(
            {
                "provider": {"id": provider_id, "name": names.get(provider_id, "")},
                "task_type": task_type,
                "count": len(values),
                "avg": round(sum(values) / len(values), 3),
                "p50": _percentile(values, 0.50),
                "p95": _percentile(values, 0.95),
                "buckets": _buckets(values),
                "sum": round(sum(values), 3),
            }
        )
    result = {"window_seconds": int(WINDOW.total_seconds()), "by_provider_type": rows}
    if now is None:
        with _lock:
            _cache[key] = (time.monotonic() + CACHE_SECONDS, result)
    return result


def clear_cache() -> None:
    with _lock:
        _cache.clear()


def _buckets(values: list[float]) -> list[int]:
    """Non-cumulative counts per BUCKETS bound (+Inf last)."""
    counts = [0] * (len(BUCKETS) + 1)
    for value in values:
        for i, bound in enumerate(BUCKETS):
            if value <= bound:
                counts[i] += 1
                break
        else:
            counts[-1] += 1
    return counts
