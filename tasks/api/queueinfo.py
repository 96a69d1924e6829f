"""queue_position / estimated_wait_seconds / blocked_reason for a page of tasks.

tasks.engine.dispatch.queue_info answers for one task with five queries (slots in use,
average duration, position). A list page holds up to 100 tasks on up to 100
providers, so this computes the same figures with one query for the slots of
every provider on the page, one query for the positions of every pending row, and the
providers' average durations kept for AVERAGE_TTL seconds per process (an
estimate of minutes needs no fresher input). Only pending rows cost anything.
The answers equal queue_info's (tests/api compare them).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from django.db import connection
from django.db.models import Count, Q

from tasks.engine import dispatch
from tasks.engine.states import EXECUTING, PENDING
from tasks.models import Task

EMPTY = {"blocked_reason": None, "queue_position": None, "estimated_wait_seconds": None}
AVERAGE_TTL = 60.0

_averages: dict[tuple[str, int], tuple[float, float]] = {}
_lock = threading.Lock()


def clear_cache() -> None:
    with _lock:
        _averages.clear()


def average_duration(provider_id: int) -> float:
    """dispatch.average_duration, remembered for AVERAGE_TTL seconds."""
    key = (connection.settings_dict["NAME"], provider_id)
    now = time.monotonic()
    with _lock:
        hit = _averages.get(key)
    if hit is not None and hit[0] > now:
        return hit[1]
    value = dispatch.average_duration(provider_id)
    with _lock:
        _averages[key] = (now + AVERAGE_TTL, value)
    return value


class QueueInfo:
    """Memoises per-provider figures across the rows of one response."""

    def __init__(self) -> None:
        self._in_use: dict[int, int] = {}
        self._positions: dict[int, int] = {}
        self._done: dict[int, dict] = {}

    def prefetch(self, tasks: Iterable[Task]) -> None:
        pending = [t for t in tasks if t.status == PENDING]
        missing = {t.provider_id for t in pending} - set(self._in_use)
        if missing:
            # dispatch.slots_in_use for every provider on the page in one query.
            self._in_use.update(dict.fromkeys(missing, 0))
            rows = (
                Task.objects.filter(provider_id__in=missing)
                .filter(Q(status__in=EXECUTING) | Q(status=PENDING, admitted_at__isnull=False))
                .order_by()
                .values("provider_id")
                .annotate(n=Count("id"))
            )
            for row in rows:
                self._in_use[row["provider_id"]] = row["n"]
        waiting = [t for t in pending if t.admitted_at is None and t.pk not in self._positions]
        if waiting:
            # Every row's position in one pass over the providers' backlogs.
            ahead = {
                f"p{t.pk}": Count(
                    "id",
                    filter=Q(provider_id=t.provider_id)
                    & (Q(created_at__lt=t.created_at) | Q(created_at=t.created_at, id__lt=t.id)),
                )
                for t in waiting
            }
            row = Task.objects.filter(
                provider_id__in={t.provider_id for t in waiting}, status=PENDING, admitted_at__isnull=True
            ).aggregate(**ahead)
            self._positions.update({t.pk: row[f"p{t.pk}"] or 0 for t in waiting})
        for task in pending:
            self.for_task(task)

    def _slots(self, provider_id: int) -> int:
        if provider_id not in self._in_use:
            self._in_use[provider_id] = dispatch.slots_in_use(provider_id)
        return self._in_use[provider_id]

    def for_task(self, task: Task) -> dict:
        if task.status != PENDING:
            return EMPTY
        if task.pk in self._done:
            return self._done[task.pk]
        position = self._positions.get(task.pk)
        if position is None:
            position = dispatch.queue_position(task)
        info = dispatch.wait_figures(
            task, task.provider, position=position, in_use=self._slots(task.provider_id), average=average_duration
        )
        self._done[task.pk] = info
        return info
