"""Every change of a task's state, each one compare-and-set in one transaction.

Lock order, everywhere in the system (so two transactions never wait on each
other in a circle): user quota -> provider -> instance -> task. Admission takes
provider -> tasks; creating a task takes quota -> provider -> instance; a
terminal transition takes the whole chain because it may release quota and
capacity; a non-terminal one takes instance -> task.

A transition that loses (the task moved on, the lease was revoked) returns
False and changes nothing. Nothing here raises for a lost race.
"""

from __future__ import annotations

import functools
import logging
import secrets
import time
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import OperationalError, transaction
from django.utils.translation import gettext_noop

from tasks import crypto, live
from tasks.engine import clock, sql
from tasks.engine.states import (
    CANCELLED,
    CANCELLING,
    COMPLETED,
    EXECUTING,
    FAILED,
    FINAL,
    PENDING,
    RUNNING,
    TIMEOUT,
    ErrorCode,
    allowed_sources,
)
from tasks.models import Instance, Provider, Task, TaskEvent, TaskSecret, UserQuota, Worker
from tasks.operations import get_operation
from tasks.operations.base import Outcome

logger = logging.getLogger(__name__)

# MySQL/MariaDB: 1213 deadlock, 1205 lock wait timeout. The lock order makes the
# first rare; both are safe to retry because the whole transaction rolled back.
RETRYABLE_DB_ERRORS = {1213, 1205}


def retry_on_deadlock(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        for attempt in range(5):
            try:
                return func(*args, **kwargs)
            except OperationalError as exc:
                code = exc.args[0] if exc.args else None
                if code not in RETRYABLE_DB_ERRORS or attempt == 4 or transaction.get_connection().in_atomic_block:
                    raise
                logger.warning("%s: database error %s, retrying (attempt %d)", func.__name__, code, attempt + 1)
                time.sleep(0.05 * (attempt + 1))
        return None

    return wrapper


def new_token() -> str:
    return secrets.token_hex(16)


def lease_deadline(now=None):
    """When a lease taken or renewed at ``now`` (database clock) runs out."""
    return (now or clock.now()) + timedelta(seconds=settings.TASK_LEASE_SECONDS)


def _event(task: Task, from_status: str, to_status: str, actor: str, reason: str = "", message: str = "", at=None):
    sql.insert(
        TaskEvent(
            task_id=task.pk,
            from_status=from_status,
            to_status=to_status,
            actor=actor[:200],
            reason=reason[:500],
            progress=task.progress,
            message=message,
            at=at or clock.now(),
        )
    )
    live.publish(task.pk, task.owner_id)  # after commit; nothing with the ORM broker


def _lock_instance(instance_id: int | None) -> Instance | None:
    if instance_id is None:
        return None
    return sql.get(Instance, instance_id, lock=True)


def claim(task_id: int, *, token: str, worker: str) -> bool:
    """pending (admitted, with this token) -> running: the worker starts the task."""
    return claim_task(task_id, token=token, worker=worker) is not None


@retry_on_deadlock
def claim_task(task_id: int, *, token: str, worker: str, registry: dict | None = None) -> Task | None:
    """The claim, returning the running task (its instance and provider attached), or None when it lost.

    ``registry``: when given, the worker's registry row is written in the same
    transaction (one commit): it names the task, and ``tasks_run`` grows by
    registry["tasks_run"]; the other keys create the row when it does not exist.
    """
    if not token:
        return None
    t, p = sql.table(Task), sql.table(Provider)
    with sql.atomic():
        # One read for everything the worker needs; the claim below re-checks under lock.
        row = sql.fetchone(
            f"SELECT {t.columns('t')}, {p.columns('p')} FROM {t.name} t"
            f" JOIN {p.name} p ON p.{p.quoted['id']} = t.{t.quoted['provider_id']}"
            f" WHERE t.{t.quoted['id']} = %s",
            [task_id],
        )
        if row is None:
            return None
        task = t.build(row)
        if task.status != PENDING or task.lease_token != token or task.admitted_at is None:
            return None
        provider = p.build(row, len(t.fields))
        where = f"{t.quoted['id']} = %s AND {t.quoted['status']} = %s AND {t.quoted['lease_token']} = %s"
        return claim_locked(
            task,
            provider,
            worker=worker,
            now=clock.now(),
            where=where,
            params=[task_id, PENDING, token],
            registry=registry,
        )


def claim_locked(
    task: Task,
    provider: Provider,
    *,
    worker: str,
    now,
    where: str,
    params: list,
    extra: dict | None = None,
    registry: dict | None = None,
) -> Task | None:
    """The claim's writes inside the caller's transaction, the task's row read and its
    provider's known: lock the instance, then ``pending -> running`` guarded by
    ``where`` (with ``extra`` fields), its event, the instance's change, the
    worker's registry row (see claim_task). Returns the task or None when it lost.
    """
    instance = _lock_instance(task.instance_id)
    lease = lease_deadline(now)
    claimed = {
        **(extra or {}),
        "status": RUNNING,
        # A resumed task keeps its first start: its deadline counts from there.
        "started_at": task.started_at or now,
        "heartbeat_at": now,
        "lease_expires_at": lease,
        "worker": worker[:200],
        "attempt_count": sql.Inc(1),
        "status_message": "started",
    }
    if sql.update(Task, claimed, where, params) != 1:
        return None
    for name, value in claimed.items():
        setattr(task, name, getattr(task, name) + value.n if isinstance(value, sql.Inc) else value)
    task.provider = provider
    _event(task, PENDING, RUNNING, f"worker:{worker}", at=now)
    if instance is not None:
        before = sql.snapshot(instance)
        get_operation(task.task_type).on_running(task, instance)
        sql.save_changes(instance, before, now=now)
        instance.provider = provider
        task.instance = instance
    if registry is not None:
        registry = dict(registry)
        done = registry.pop("tasks_run", 1)
        named = sql.update(
            Worker,
            {"current_task": task.pk, "last_heartbeat": now, "tasks_run": sql.Inc(done)},
            f"{sql.col(Worker, 'name')} = %s",
            [worker],
        )
        if not named:
            Worker.objects.create(name=worker, current_task_id=task.pk, last_heartbeat=now, tasks_run=done, **registry)
    return task


@retry_on_deadlock
def request_cancel(task_id: int, *, actor: str, reason: str = "", by_admin: bool = False) -> bool:
    """User or admin cancel: pending ends cancelled at once, running goes cancelling."""
    code = ErrorCode.CANCELLED_BY_ADMIN if by_admin else ErrorCode.CANCELLED_BY_USER
    status = Task.objects.filter(pk=task_id).values_list("status", flat=True).first()
    if status == PENDING:
        if finish(
            task_id, CANCELLED, token=None, actor=actor, sources={PENDING}, error_code=code, cancel_reason=reason
        ):
            return True
        status = Task.objects.filter(pk=task_id).values_list("status", flat=True).first()
    if status != RUNNING:
        return False
    return set_cancelling(task_id, actor=actor, reason=reason, error_code=code)


@retry_on_deadlock
def set_cancelling(
    task_id: int, *, actor: str, reason: str = "", error_code: str = ErrorCode.CANCELLED_BY_USER
) -> bool:
    """running -> cancelling: the worker sees it at its next cancel check."""
    with sql.atomic():
        head = Task.objects.filter(pk=task_id).values("instance_id").first()
        if head is None:
            return False
        _lock_instance(head["instance_id"])
        task = Task.objects.select_for_update().filter(pk=task_id).first()
        if task is None or task.status not in allowed_sources(CANCELLING):
            return False
        rows = Task.objects.filter(pk=task_id, status=task.status).update(
            status=CANCELLING, cancel_reason=reason[:500], error_code=error_code, status_message="cancel requested"
        )
        if rows != 1:
            return False
        _event(task, task.status, CANCELLING, actor, reason=reason)
        return True


@retry_on_deadlock
def finish(
    task_id: int,
    target: str,
    *,
    token: str | None,
    actor: str,
    sources: set[str] | frozenset[str] | None = None,
    error_code: str = "",
    error_message: str = "",
    cancel_reason: str | None = None,
    message: str = "",
    instance_status: str | None = None,
    instance_updates: dict[str, Any] | None = None,
    task_data_update: dict[str, Any] | None = None,
    progress: int | None = None,
    require_lease_expired: bool = False,
    revoke_lease: bool = False,
    needs_reconcile: bool = False,
    secret: str | None = None,
    known: Task | None = None,
    handoff=None,
) -> bool:
    """Move a task to a terminal state and apply the outcome to its instance.

    ``token``: the worker's lease token (its writes are fenced by it); None for
    users, admins and recovery, which name their sources instead.
    ``require_lease_expired``: recovery acts only on a lease that has run out.
    ``known``: the task as its worker claimed it (owner, provider, instance and type
    never change), which saves reading them again.
    ``handoff``: the finishing worker's offer to run the task this admits
    (see dispatch.admit_locked).
    """
    if target not in FINAL:
        raise ValueError(f"{target} is not a terminal state")
    allowed = frozenset(sources) & allowed_sources(target) if sources else allowed_sources(target)

    def write(task: Task | None, now) -> tuple[str, dict[str, Any]] | None:
        """The guarded write of the task row: (source, fields written), or None when the
        task (as given) may not make this transition or the row no longer matches it."""
        if task is None or task.status not in allowed:
            return None
        if token is not None and task.lease_token != token:
            return None
        if require_lease_expired and (task.lease_expires_at is None or task.lease_expires_at >= now):
            return None
        source = task.status
        fields: dict[str, Any] = {"status": target, "completed_at": now}
        if target == COMPLETED:
            fields.update(error_code="", error_message="", progress=100)
        else:
            if error_code or not task.error_code:
                fields["error_code"] = (
                    error_code
                    or {
                        FAILED: ErrorCode.PROVIDER_ERROR,
                        TIMEOUT: ErrorCode.TIMEOUT,
                        CANCELLED: ErrorCode.CANCELLED_BY_USER,
                    }[target]
                )
            if error_message:
                fields["error_message"] = error_message
        if progress is not None:
            fields["progress"] = max(0, min(100, progress))
        if cancel_reason is not None:
            fields["cancel_reason"] = cancel_reason[:500]
        if message:
            fields["status_message"] = message[:255]
        if task_data_update:
            fields["task_data"] = {**task.task_data, **task_data_update}
        if token is None and source in EXECUTING and task.lease_expires_at is not None and task.lease_expires_at > now:
            # Ended by someone else while its worker may still be inside a provider call:
            # the terminal status fences the worker's writes, and the task keeps its slot
            # and its instance until that worker reports its exit (release_hold, by its
            # token) or its revoked lease has run out (release_expired_holds).
            fields["held_until"] = task.lease_expires_at
        elif revoke_lease or token is None:
            # Nobody may write for this task any more: a late worker is fenced off.
            fields.update(lease_token="", lease_expires_at=None)
        t = sql.table(Task)
        where, params = f"{t.quoted['id']} = %s AND {t.quoted['status']} = %s", [task_id, source]
        if token is not None:
            where, params = f"{where} AND {t.quoted['lease_token']} = %s", [*params, token]
        if sql.update(Task, fields, where, params) != 1:
            return None
        return source, fields

    with sql.atomic():
        if known is not None:
            owner_id, provider_id, instance_id, task_type = (
                known.owner_id,
                known.provider_id,
                known.instance_id,
                known.task_type,
            )
        else:
            head = sql.values(Task, task_id, ["owner", "provider", "instance", "status", "task_type"])
            if head is None or head[3] not in allowed:
                return False
            owner_id, provider_id, instance_id, _, task_type = head
        # Lock order: quota -> provider -> instance -> task.
        if get_operation(task_type).touches_quota:
            q = sql.table(UserQuota)
            sql.fetchone(
                f"SELECT {q.quoted['id']} FROM {q.name} WHERE {q.quoted['user_id']} = %s{sql.for_update()}", [owner_id]
            )
        provider = sql.get(Provider, provider_id, lock=True)
        instance = _lock_instance(instance_id)
        now = clock.now()
        # A worker completing the task it claimed: what the outcome needs from the row
        # cannot have changed while it is still running under this token (progress goes
        # to 100, errors are cleared), so the guarded update alone decides, without
        # reading the row first. It loses when the row moved on (a cancel request, a
        # revoked lease), and then the row is read, as for everyone else.
        assume = (
            known is not None
            and known.status == RUNNING
            and token is not None
            and target == COMPLETED
            and not (task_data_update or require_lease_expired)
        )
        task = known if assume else None
        done = write(task, now)
        if done is None:
            task = sql.get(Task, task_id, lock=True)
            # (The time once the row is ours: a worker's step committed while we waited
            # for it comes before this transition on the timeline too.)
            now = clock.now()
            done = write(task, now)
        if done is None:
            return False
        source, fields = done
        # A resumed task waiting in pending has run before (started_at is kept): what its
        # earlier attempt did on the provider is unknown, as for a running task.
        ran = source in EXECUTING or task.started_at is not None
        held = fields.get("held_until")
        for name, value in fields.items():
            setattr(task, name, value)
        reason = fields.get("error_code", "") or ""
        if cancel_reason:
            reason = f"{reason}: {cancel_reason}" if reason else cancel_reason
        note = error_message or message
        if held is not None:
            note = f"{note}; its worker is stopping: slot and instance held" if note else "its worker is stopping"
        _event(task, source, target, actor, reason=reason, message=note, at=now)
        if secret and target == COMPLETED:
            TaskSecret.objects.create(
                task=task,
                ciphertext=crypto.encrypt(secret),
                expires_at=now + timedelta(seconds=settings.PASSWORD_READ_WINDOW_SECONDS),
            )
        if instance is not None:
            before = sql.snapshot(instance)
            outcome = Outcome(
                status=target,
                ran=ran,
                instance_status=instance_status,
                instance_updates=instance_updates or {},
                reason=task.error_code,
            )
            get_operation(task.task_type).on_finished(task, instance, outcome)
            if needs_reconcile and ran:
                instance.needs_reconcile = True
            if instance.active_task_id == task.pk and held is None:
                instance.active_task = None
            sql.save_changes(instance, before, now=now)
        if held is not None:
            logger.warning(
                "task %s: %s -> %s by %s; slot and instance held until its worker stops (at the latest %s)",
                task_id,
                source,
                target,
                actor,
                held,
            )
            return True
        if (ran or task.admitted_at is not None) and provider is not None:
            # The slot is free: admit the next task in this same transaction (the
            # provider row is locked already).
            from tasks.engine.dispatch import admit_locked

            admit_locked(provider, handoff)
        logger.info("task %s: %s -> %s by %s %s", task_id, source, target, actor, reason)
        return True


def save_checkpoints(task_id: int, *, token: str, checkpoints: dict) -> bool:
    """The worker records the steps done so far (Task.checkpoints); False when its lease is gone."""
    return bool(
        Task.objects.filter(pk=task_id, lease_token=token, status__in=EXECUTING).update(checkpoints=checkpoints)
    )


def report_progress(task_id: int, *, token: str, progress: int, message: str, step: bool = False) -> bool:
    """The worker's progress write; False when its lease is gone (stop working).

    A step event is written in the same transaction as the guarded update, which
    locks the task row: a force-stop (or any transition) either comes before it
    and the update changes nothing, or waits for its commit, so the timeline never
    shows a worker step after the task ended.
    """
    fields: dict[str, Any] = {"progress": max(0, min(100, int(progress)))}
    if message:
        fields["status_message"] = message[:255]
    t = sql.table(Task)
    running, cancelling = sorted(EXECUTING)
    where = f"{t.quoted['id']} = %s AND {t.quoted['lease_token']} = %s AND {t.quoted['status']} IN (%s, %s)"
    params = [task_id, token, running, cancelling]
    if not (step and message):
        if sql.update(Task, fields, where, params) != 1:
            return False
        live.publish(task_id)
        return True
    with sql.atomic():
        if sql.update(Task, fields, where, params) != 1:
            return False
        status = sql.values(Task, task_id, ["status"])[0]  # (row locked by the update: as written)
        sql.insert(
            TaskEvent(
                task_id=task_id,
                kind=TaskEvent.KIND_STEP,
                from_status=status,
                to_status=status,
                actor="worker",
                progress=fields["progress"],
                message=message,
                at=clock.now(),
            )
        )
    live.publish(task_id)
    return True


def renew_lease(task_id: int, *, token: str) -> str | None:
    """Extend the lease (database clock); return the task's status (cancelling means: stop), None if lost."""
    now = clock.now()
    t = sql.table(Task)
    running, cancelling = sorted(EXECUTING)
    rows = sql.update(
        Task,
        {"heartbeat_at": now, "lease_expires_at": lease_deadline(now)},
        f"{t.quoted['id']} = %s AND {t.quoted['lease_token']} = %s AND {t.quoted['status']} IN (%s, %s)",
        [task_id, token, running, cancelling],
    )
    if rows != 1:
        return None
    return read_status(task_id, token=token)


def read_status(task_id: int, *, token: str) -> str | None:
    """Cheap cancel check: the status if this token still holds the task, else None."""
    row = sql.values(Task, task_id, ["status", "lease_token"])
    if row is None or row[1] != token or row[0] not in EXECUTING:
        return None
    return row[0]


@retry_on_deadlock
def release_hold(task_id: int, *, token: str | None = None, expired_before=None) -> bool:
    """End a task's "stopping" hold: its slot and its instance are free again, and
    admission runs in the same transaction.

    ``token``: the worker reporting that it has stopped (only the worker that held
    the lease may). ``expired_before``: the sweep, for a hold whose revoked lease has
    run out by then (database clock). True when this call released it.
    """
    head = sql.values(Task, task_id, ["provider", "instance", "held_until"])
    if head is None or head[2] is None:
        return False
    provider_id, instance_id, _ = head
    t = sql.table(Task)
    where, params = f"{t.quoted['id']} = %s AND {t.quoted['held_until']} IS NOT NULL", [task_id]
    if token is not None:
        where, params = f"{where} AND {t.quoted['lease_token']} = %s", [*params, token]
    if expired_before is not None:
        where, params = f"{where} AND {t.quoted['held_until']} < %s", [*params, expired_before]
    with sql.atomic():
        provider = sql.get(Provider, provider_id, lock=True)  # lock order: provider -> instance -> task
        instance = _lock_instance(instance_id)
        if sql.update(Task, {"held_until": None, "lease_token": "", "lease_expires_at": None}, where, params) != 1:
            return False
        if instance is not None and instance.active_task_id == task_id:
            sql.update(Instance, {"active_task": None}, f"{sql.col(Instance, 'id')} = %s", [instance.pk])
        why = "its worker stopped" if token is not None else "its revoked lease ran out"
        logger.info("task %s: hold released (%s): slot and instance free", task_id, why)
        if provider is not None:
            from tasks.engine.dispatch import admit_locked

            admit_locked(provider)
    return True


def release_expired_holds(now=None) -> list[int]:
    """The sweep: release every hold whose revoked lease has run out (database clock)."""
    now = now or clock.now()
    ids = list(Task.objects.filter(held_until__lt=now).values_list("pk", flat=True)[:500])
    return [pk for pk in ids if release_hold(pk, expired_before=now)]


def force_stop(task_id: int, *, actor: str, reason: str) -> bool:
    """Admin: end any non-terminal task at once as cancelled, revoke its lease."""
    return finish(
        task_id,
        CANCELLED,
        token=None,
        actor=actor,
        sources={PENDING, RUNNING, CANCELLING},
        error_code=ErrorCode.FORCE_STOPPED,
        cancel_reason=reason,
        message="force-stopped",
        revoke_lease=True,
        needs_reconcile=True,
    )


# Reasons on the event of a task that went back to pending (metrics count them).
RESUMED_LOST = "resumed:worker_lost"
RESUMED_HANDBACK = "resumed:handback"


def recover_lost(task_id: int, *, actor: str = "system:recovery") -> bool:
    """A running or cancelling task whose lease expired (database clock): its worker is gone.

    Recovery never acts before the lease has run out, so the task's slot and
    instance stay held until then: a worker that lost its database stops its own
    operation before that (its local lease deadline, providers.base.LeaseClock).
    What becomes of the task is decided by :func:`recovery_outcome` alone: a
    running task is usually resumed (back to pending, see :func:`resume`).
    """
    task = (
        Task.objects.filter(pk=task_id)
        .only("status", "started_at", "timeout_seconds", "task_type", "attempt_count", "worker")
        .first()
    )
    if task is None:
        return False
    outcome = recovery_outcome(task, clock.now(), lost_attempts=lost_attempts(task))
    if outcome["target"] == PENDING:
        return resume(task_id, actor=actor, reason=RESUMED_LOST, message=outcome["message"])
    return finish(
        task_id,
        token=None,
        actor=actor,
        sources=EXECUTING,
        require_lease_expired=True,
        needs_reconcile=True,
        **outcome,
    )


def lost_attempts(task: Task) -> int:
    """Attempts of this task that ended with its worker lost: its claims, less those it
    handed back on a planned shutdown (which cost it nothing)."""
    handed_back = TaskEvent.objects.filter(task_id=task.pk, reason=RESUMED_HANDBACK).count()
    return max(0, task.attempt_count - handed_back)


def recovery_outcome(task: Task, now, *, lost_attempts: int | None = None) -> dict[str, Any]:
    """What recovery does with a task whose lease ran out: the target and its error.

    Past its deadline it ends ``timeout`` (the hard backstop killed it). A
    ``cancelling`` task ends ``cancelled``, as its owner asked. A running task goes
    back to ``pending`` (target PENDING, resumed by another worker) unless it has
    lost its worker TASK_MAX_ATTEMPTS times: then it ends ``failed``/worker_lost
    (a task that kills its worker cannot loop).
    """
    deadline = task.deadline
    if deadline is not None and deadline <= now:
        return {
            "target": TIMEOUT,
            "error_code": ErrorCode.TIMEOUT,
            "error_message": f"timed out after {task.effective_timeout} s; the worker did not stop and was killed",
        }
    if task.status == CANCELLING:
        return {"target": CANCELLED, "message": "cancelled; its worker was lost while stopping"}
    lost = task.attempt_count if lost_attempts is None else lost_attempts
    if task.status == RUNNING and lost < settings.TASK_MAX_ATTEMPTS:
        return {"target": PENDING, "message": f"resumed after worker {task.worker or '?'} was lost"}
    return {
        "target": FAILED,
        "error_code": ErrorCode.WORKER_LOST,
        "error_message": (
            f"the worker running this task stopped renewing its lease ({lost} of {settings.TASK_MAX_ATTEMPTS} attempts)"
        ),
    }


@retry_on_deadlock
def resume(task_id: int, *, actor: str, reason: str, message: str, token: str | None = None) -> bool:
    """running -> pending: the task goes back to the head of its provider's queue and
    another worker resumes it. Its instance stays its own (active_task unchanged); its
    slot is free (pending and not admitted), so admission runs in the same transaction.
    ``started_at`` is kept: the deadline counts from the first start.

    ``token``: a planned handback by the lease holder (graceful shutdown); without it,
    recovery, which acts only on a lease that has run out (database clock).
    """
    head = sql.values(Task, task_id, ["provider", "instance", "status"])
    if head is None or head[2] != RUNNING:
        return False
    provider_id, instance_id, _ = head
    with sql.atomic():
        provider = sql.get(Provider, provider_id, lock=True)  # lock order: provider -> instance -> task
        _lock_instance(instance_id)
        task = sql.get(Task, task_id, lock=True)
        now = clock.now()
        if task is None or task.status not in allowed_sources(PENDING):
            return False
        if token is not None and task.lease_token != token:
            return False
        if token is None and (task.lease_expires_at is None or task.lease_expires_at >= now):
            return False
        fields = {
            "status": PENDING,
            "admitted_at": None,
            "lease_token": "",
            "lease_expires_at": None,
            "worker": "",
            "status_message": gettext_noop("waiting for a worker"),  # stored in English, shown translated
        }
        t = sql.table(Task)
        where = f"{t.quoted['id']} = %s AND {t.quoted['status']} = %s AND {t.quoted['lease_token']} = %s"
        if sql.update(Task, fields, where, [task_id, RUNNING, task.lease_token]) != 1:
            return False
        for name, value in fields.items():
            setattr(task, name, value)
        _event(task, RUNNING, PENDING, actor, reason=reason, message=message, at=now)
        logger.warning("task %s: running -> pending by %s (%s): %s", task_id, actor, reason, message)
        if provider is not None:
            from tasks.engine.dispatch import admit_locked

            admit_locked(provider)
    return True


def release_lease(task_id: int, *, token: str, actor: str = "system:shutdown") -> bool:
    """Graceful shutdown: hand a task whose operation has stopped back to the queue at
    once (running -> pending, resumed elsewhere). A planned handback does not count
    against TASK_MAX_ATTEMPTS. A task that is cancelling by then has its lease given up
    instead, so recovery ends it cancelled without waiting."""
    if resume(task_id, actor=actor, reason=RESUMED_HANDBACK, message="handed back at shutdown", token=token):
        return True
    past = clock.now() - timedelta(seconds=1)
    return bool(Task.objects.filter(pk=task_id, lease_token=token, status__in=EXECUTING).update(lease_expires_at=past))


def apply(task_id: int, target: str, *, actor: str, token: str | None = None, worker: str = "") -> bool:
    """Route a requested target state to its guarded transition (admin tools, tests)."""
    if target == RUNNING:
        return claim(task_id, token=token or "", worker=worker or actor)
    if target == CANCELLING:
        return set_cancelling(task_id, actor=actor)
    if target == PENDING:
        return resume(task_id, actor=actor, reason=RESUMED_HANDBACK, message="handed back", token=token or "")
    if target in FINAL:
        return finish(task_id, target, token=token, actor=actor)
    return False
