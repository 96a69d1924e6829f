"""Admission: pending tasks become runnable only when their provider has a slot.

The limit holds across every process and machine because it is enforced here,
in the database: lock the provider row, count the tasks holding a slot
(running, cancelling, or admitted and not yet claimed), and admit the oldest
pending ones into the free slots (FIFO per provider). Each admitted task gets a
lease token; the job sent to the provider's django-q2 queue carries only
(task id, token), and the worker's claim is a compare-and-set on both, so a
lost, duplicated or late job never changes the outcome.

Admission runs on every event that can free or create work (task created, task
finished, limit raised, provider enabled) and from the periodic sweep, so a lost
wake-up only delays.
"""

from __future__ import annotations

import logging
import math
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Avg, F, Q
from django.utils.translation import gettext as _
from django.utils.translation import gettext_noop

from tasks.engine import clock, sql
from tasks.engine.states import COMPLETED, EXECUTING, PENDING
from tasks.engine.transitions import claim_locked, new_token, retry_on_deadlock
from tasks.models import Provider, Task, effective_timeout, provider_queue

logger = logging.getLogger(__name__)

JOB_FUNC = "tasks.engine.worker.run_job"
_brokers: dict[str, object] = {}


def _broker(queue: str):
    # async_task builds a new broker (a new Redis connection) per call unless given one.
    broker = _brokers.get(queue)
    if broker is None:
        from django_q.brokers import get_broker

        broker = _brokers[queue] = get_broker(queue)
    return broker


def job_seconds(timeout_seconds: int) -> int:
    """django-q2's timeout of a job whose first task has this timeout.

    The worker arms its own alarm at each task's deadline + TASK_HARD_KILL_GRACE_SECONDS;
    django-q2's timer is the outer backstop, TASK_HANDOFF_SECONDS longer so the tasks a
    job runs after its first (hand-over, see tasks.engine.worker.run_job) fit in it.
    """
    return timeout_seconds + settings.TASK_HARD_KILL_GRACE_SECONDS + settings.TASK_HANDOFF_SECONDS


def enqueue_job(task_id: int, token: str, queue: str, timeout_seconds: int) -> None:
    """Send the job for an admitted task. Failure here only delays: the sweep re-sends."""
    from django_q.tasks import async_task

    seconds = job_seconds(timeout_seconds)
    try:
        async_task(
            JOB_FUNC,
            task_id,
            token,
            seconds,
            cluster=queue,
            broker=_broker(queue),
            timeout=seconds,
            task_name=f"task-{task_id}-{token[:8]}",
            save=False,
        )
    except Exception:
        _brokers.pop(queue, None)
        logger.exception("task %s: could not enqueue its job on %s; the sweep will retry", task_id, queue)


def _slot_sql() -> tuple[str, str]:
    """(slots in use, some task waiting) as SQL expressions over the task table; 6 + 2 params."""
    t = sql.table(Task)
    provider, status, admitted = sql.col(Task, "provider"), sql.col(Task, "status"), sql.col(Task, "admitted_at")
    held = sql.col(Task, "held_until")
    used = (
        f"(SELECT COUNT(*) FROM {t.name} WHERE {provider} = %s AND {status} IN (%s, %s))"
        f" + (SELECT COUNT(*) FROM {t.name} WHERE {provider} = %s AND {status} = %s AND {admitted} IS NOT NULL)"
        # Ended tasks whose worker may still be inside a provider call ("stopping" holds).
        f" + (SELECT COUNT(*) FROM {t.name} WHERE {held} IS NOT NULL AND {provider} = %s)"
    )
    waiting = f"EXISTS(SELECT 1 FROM {t.name} WHERE {provider} = %s AND {status} = %s AND {admitted} IS NULL)"
    return used, waiting


def _used_params(provider_id: int) -> list:
    running, cancelling = sorted(EXECUTING)
    return [provider_id, running, cancelling, provider_id, PENDING, provider_id]


def slots_in_use(provider_id: int) -> int:
    """Tasks holding one of the provider's slots: running, cancelling, admitted and not yet
    claimed, or ended while their worker still stops (Task.held_until)."""
    return slot_state(provider_id)[0]


def slot_state(provider_id: int) -> tuple[int, bool]:
    """(slots in use, whether any task waits for admission): one statement on the admission index."""
    used, waiting = _slot_sql()
    row = sql.fetchone(f"SELECT {used}, {waiting}", [*_used_params(provider_id), provider_id, PENDING])
    return int(row[0]), bool(row[1])


@retry_on_deadlock
def admit(provider_id: int) -> list[int]:
    """Admit as many pending tasks of the provider as it has free slots; return their ids."""
    with sql.atomic():
        provider = sql.get(Provider, provider_id, lock=True)
        if provider is None:
            return []
        return admit_locked(provider)


def admit_locked(provider: Provider, handoff=None) -> list[int]:
    """Admission with the provider row already locked by the caller's transaction.

    Creating a task and finishing one hold that lock anyway, so they admit in
    the same transaction (one commit less per task); the jobs go out on commit.

    ``handoff``: a finishing worker's offer to run the next task itself
    (tasks.engine.worker.Handoff). The oldest task it has room for is admitted and
    claimed for that worker right here, and given to it on commit; it sends no
    job and needs no claim transaction of its own.
    """
    if not provider.accepts_work:
        return []
    limit = provider.concurrency_limit
    # The oldest waiting tasks (at most `limit`), each row carrying the slots in use:
    # usually nobody waits, and then that is the whole cost.
    t = sql.table(Task)
    used, _ = _slot_sql()
    provider_col, status, admitted = sql.col(Task, "provider"), sql.col(Task, "status"), sql.col(Task, "admitted_at")
    candidates = sql.fetchall(
        f"SELECT {t.columns()}, {used}"
        f" FROM {t.name} WHERE {provider_col} = %s AND {status} = %s AND {admitted} IS NULL"
        f" ORDER BY {sql.col(Task, 'created_at')}, {sql.col(Task, 'id')} LIMIT %s",
        [*_used_params(provider.pk), provider.pk, PENDING, limit],
    )
    if not candidates:
        return []
    free = limit - int(candidates[0][len(t.fields)])
    if free <= 0:
        return []
    now = clock.now()
    jobs: list[tuple[int, str, int]] = []
    taken: Task | None = None
    where = f"{sql.col(Task, 'id')} = %s AND {status} = %s AND {admitted} IS NULL"
    for row in candidates[:free]:
        task = t.build(row)
        timeout = effective_timeout(task.task_type, task.timeout_seconds)
        values = admission_values(now)
        values["dispatch_count"] = sql.Inc(1)
        if taken is None and handoff is not None and handoff.fits(timeout):
            taken = claim_locked(
                task,
                provider,
                worker=handoff.worker,
                now=now,
                where=where,
                params=[task.pk, PENDING],
                extra=values,
                registry=handoff.registry,
            )
            if taken is not None:
                continue
        if sql.update(Task, values, where, [task.pk, PENDING]) == 1:
            jobs.append((task.pk, values["lease_token"], timeout))
    if taken is not None:
        transaction.on_commit(lambda: handoff.accept(taken))
    if jobs:
        send_on_commit(provider.queue_name, jobs)
    admitted_ids = ([taken.pk] if taken is not None else []) + [j[0] for j in jobs]
    if admitted_ids:
        logger.debug("provider %s: admitted %s", provider.pk, admitted_ids)
    return admitted_ids


def admission_values(now) -> dict:
    """What admission writes on a task: the time, a fresh lease token, the message."""
    return {
        "admitted_at": now,
        "dispatched_at": now,
        "lease_token": new_token(),
        "status_message": gettext_noop("waiting for a worker"),  # stored in English, shown translated
    }


def send_on_commit(queue: str, jobs: list[tuple[int, str, int]]) -> None:
    """Send (task id, token, timeout) jobs once the admitting transaction commits."""
    transaction.on_commit(lambda: [enqueue_job(tid, tok, queue, tmo) for tid, tok, tmo in jobs])


def admit_soon(provider_id: int) -> None:
    """Event-driven admission (after a commit). Errors only delay: the sweep retries."""
    try:
        admit(provider_id)
    except Exception:
        logger.exception("provider %s: admission failed; the sweep will retry", provider_id)


def redispatch_stale(cutoff=None, provider_ids=None) -> list[int]:
    """Re-send jobs of tasks admitted before ``cutoff`` but never claimed (the broker lost the job).

    The token stays the same: whichever copy arrives first claims the task, the
    other finds it no longer pending and does nothing. Only providers that accept
    work: a disabled or unreachable provider's admitted tasks wait for it without
    a copy each sweep. Without ``cutoff`` (the sweep) each task's re-sends back off
    while its provider's queue holds jobs: after n sends the next waits
    TASK_DISPATCH_TIMEOUT_SECONDS x 2^(n-1), up to TASK_REDISPATCH_MAX_SECONDS, so a
    queue no machine serves gains a copy per task a few times an hour, not every
    sweep. An empty queue has no copy left to wait for, so its tasks are sent again
    TASK_DISPATCH_TIMEOUT_SECONDS after the last send, however many sends came before
    (startup re-sends by several machines, a resumption, a job its worker failed
    during a database outage would otherwise put minutes between the outage and the
    run). Times are the database's (tasks.engine.clock).
    """
    now = clock.now()
    base = float(settings.TASK_DISPATCH_TIMEOUT_SECONDS)
    backoff = cutoff is None
    if cutoff is None:
        cutoff = now - timedelta(seconds=base)
    sent = []
    stale = Task.objects.filter(
        status=PENDING,
        admitted_at__isnull=False,
        dispatched_at__lt=cutoff,
        provider__enabled=True,
        provider__unreachable_since__isnull=True,
    )
    if provider_ids is not None:
        stale = stale.filter(provider_id__in=provider_ids)
    fields = ("id", "lease_token", "timeout_seconds", "task_type", "provider_id", "dispatched_at", "dispatch_count")
    candidates = list(stale.order_by("dispatch_count", "dispatched_at").only(*fields)[:500])
    waiting = jobs_waiting({task.provider_id for task in candidates}) if backoff and candidates else {}
    for task in candidates:
        # An empty queue holds no copy of the job: it was lost (a broker restart) or its
        # worker failed before the claim. Only copies that may still wait there back off.
        if backoff and waiting.get(task.provider_id, 1) > 0:
            wait = min(float(settings.TASK_REDISPATCH_MAX_SECONDS), base * 2 ** max(0, task.dispatch_count - 1))
            if task.dispatched_at > now - timedelta(seconds=wait):
                continue
        rows = Task.objects.filter(
            pk=task.pk, status=PENDING, lease_token=task.lease_token, dispatched_at=task.dispatched_at
        ).update(dispatched_at=now, dispatch_count=F("dispatch_count") + 1)
        if rows == 1:
            logger.warning("task %s: job sent %s ago but never claimed; sent again", task.pk, now - task.dispatched_at)
            enqueue_job(task.pk, task.lease_token, provider_queue(task.provider_id), task.effective_timeout)
            sent.append(task.pk)
    return sent


def jobs_waiting(provider_ids) -> dict[int, int]:
    """Jobs waiting in the broker to be pulled, per provider queue, where the broker can
    say (this package's brokers can; django-q2's own, or a broker that is away, cannot:
    those providers are left out)."""
    names = {provider_queue(pid): pid for pid in provider_ids}
    if not names:
        return {}
    try:
        counts = getattr(_broker(next(iter(names))), "ready_counts", None)
        if counts is None:
            return {}
        found = counts(list(names))
    except Exception:
        logger.warning("re-dispatch: the broker's queue lengths could not be read", exc_info=True)
        return {}
    return {pid: int(found.get(name, 0)) for name, pid in names.items()}


def queue_info(task: Task, provider: Provider | None = None) -> dict:
    """blocked_reason, queue_position and estimated_wait_seconds of a pending task."""
    if task.status != PENDING:
        return {"blocked_reason": None, "queue_position": None, "estimated_wait_seconds": None}
    return wait_figures(
        task,
        provider or task.provider,
        position=queue_position(task),
        in_use=slots_in_use(task.provider_id),
        average=average_duration,
    )


def queue_position(task: Task) -> int:
    """How many pending tasks of its provider wait for admission ahead of this one (FIFO); 0 once admitted."""
    if task.admitted_at is not None:
        return 0
    return Task.objects.filter(
        Q(created_at__lt=task.created_at) | Q(created_at=task.created_at, id__lt=task.id),
        provider_id=task.provider_id,
        status=PENDING,
        admitted_at__isnull=True,
    ).count()


def wait_figures(task: Task, provider: Provider, *, position: int, in_use: int, average) -> dict:
    """Why a pending task waits and for about how long, from its position and the slots in use.

    ``average(provider_id)`` gives the provider's mean run time; it is only asked
    when the task really has to wait.
    """
    limit = provider.concurrency_limit
    if task.admitted_at is not None:
        reason, position = _("admitted, waiting for a worker of the provider's queue"), 0
    elif not provider.enabled:
        reason = _("provider disabled")
    elif provider.unreachable_since is not None:
        since = provider.unreachable_since.strftime("%Y-%m-%d %H:%M:%S UTC")
        # Without the error itself: users see this, and it may name the host's address.
        reason = _("provider unreachable since %(since)s; waiting for it to answer") % {"since": since}
    elif in_use >= limit:
        reason = _("provider at its limit %(in_use)s/%(limit)s") % {"in_use": in_use, "limit": limit}
    elif position > 0:
        reason = _("waiting behind %(n)s earlier task(s) of this provider") % {"n": position}
    else:
        reason = _("waiting for admission")
    if task.admitted_at is None and not provider.accepts_work:
        # Held or disabled: nothing runs until it answers (or is enabled); no honest figure.
        wait = None
    elif task.admitted_at is not None or (in_use < limit and position == 0):
        wait = 0.0
    else:
        # Everything ahead of it drains `limit` at a time, each round taking about the average.
        wait = math.ceil((position + 1) / max(1, limit)) * average(task.provider_id)
    return {
        "blocked_reason": reason,
        "queue_position": position,
        "estimated_wait_seconds": None if wait is None else round(wait, 1),
    }


def average_duration(provider_id: int) -> float:
    """Mean run time of the provider's last 50 completed tasks (seconds); 30 s when unknown."""
    recent = (
        Task.objects.filter(provider_id=provider_id, status=COMPLETED, started_at__isnull=False)
        # Newest by creation, not by completion: (provider, status, created_at, id) is an
        # index, so this reads 50 rows instead of sorting all of the provider's completed
        # tasks (~100 ms per provider at a million rows).
        .order_by("-created_at", "-id")
        .values_list("id", flat=True)[:50]
    )
    ids = list(recent)
    if not ids:
        return 30.0
    avg = Task.objects.filter(id__in=ids).aggregate(d=Avg(F("completed_at") - F("started_at")))["d"]
    if avg is None:
        return 30.0
    return avg.total_seconds() if hasattr(avg, "total_seconds") else float(avg) / 1e6
