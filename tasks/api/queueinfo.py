"""queue_position / estimated_wait_seconds / blocked_reason for a page of tasks.

tasks.dispatch.queue_info answers for one task with several queries (slots in
use, average duration, position). A list page holds up to 100 tasks, so this
computes the per-provider parts once per page and one position query per
pending row; the answers are the same as queue_info's (tests/api compare them).
Only pending rows get any query at all.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from django.db.models import Q

from tasks import dispatch
from tasks.models import Task
from tasks.states import PENDING

EMPTY = {"blocked_reason": None, "queue_position": None, "estimated_wait_seconds": None}


class QueueInfo:
    """Memoises per-provider figures across the rows of one response."""

    def __init__(self) -> None:
        self._in_use: dict[int, int] = {}
        self._avg: dict[int, float] = {}
        self._done: dict[int, dict] = {}

    def prefetch(self, tasks: Iterable[Task]) -> None:
        for task in tasks:
            self.for_task(task)

    def _slots(self, provider_id: int) -> int:
        if provider_id not in self._in_use:
            self._in_use[provider_id] = dispatch.slots_in_use(provider_id)
        return self._in_use[provider_id]

    def _average(self, provider_id: int) -> float:
        if provider_id not in self._avg:
            self._avg[provider_id] = dispatch.average_duration(provider_id)
        return self._avg[provider_id]

    def for_task(self, task: Task) -> dict:
        if task.status != PENDING:
            return EMPTY
        if task.pk in self._done:
            return self._done[task.pk]
        provider = task.provider
        limit = provider.concurrency_limit
        in_use = self._slots(task.provider_id)
        if task.admitted_at is not None:
            position = 0
            reason = "admitted, waiting for a worker of the provider's queue"
        else:
            position = Task.objects.filter(
                Q(created_at__lt=task.created_at) | Q(created_at=task.created_at, id__lt=task.id),
                provider_id=task.provider_id,
                status=PENDING,
                admitted_at__isnull=True,
            ).count()
            if not provider.enabled:
                reason = "provider disabled"
            elif in_use >= limit:
                reason = f"provider at its limit {in_use}/{limit}"
            elif position > 0:
                reason = f"waiting behind {position} earlier task(s) of this provider"
            else:
                reason = "waiting for admission"
        if task.admitted_at is not None or (in_use < limit and position == 0):
            wait = 0.0
        else:
            wait = math.ceil((position + 1) / max(1, limit)) * self._average(task.provider_id)
        info = {"blocked_reason": reason, "queue_position": position, "estimated_wait_seconds": round(wait, 1)}
        self._done[task.pk] = info
        return info
