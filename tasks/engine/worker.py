"""The django-q2 entry point: claim, heartbeat, run, finish. Safe to run twice.

A job carries (task id, lease token, its django-q2 timeout) and nothing else.
``execute`` claims the task with a compare-and-set on both; a duplicate, late
or revoked job finds nothing to claim and returns. While the operation runs,
the process's heartbeat thread renews the lease, watches for a cancel request
(within TASK_CANCEL_POLL_SECONDS), and enforces the deadline by setting the
cancel token; the operation stops at its next safe point. If it ignores the
token, the alarm armed at the task's deadline + TASK_HARD_KILL_GRACE_SECONDS
(django-q2's own per-job SIGALRM, re-armed per task) raises in it; if it runs
on 2 s after that, the heartbeat records ``timeout`` and kills the process;
django-q2's process timer and recovery stay behind both.

``run_job`` is django-q2's entry point: after a task it runs the next one its
finish admitted on the same provider (hand-over), without a broker round trip.

A worker that cannot prove its lease stops by itself: the cancel token carries
the lease's local deadline (providers.base.LeaseClock, TASK_LEASE_SECONDS -
TASK_HEARTBEAT_SECONDS after the last renewal was sent, which is before the
database's lease runs out), checked at every safe point, so a hung database
call or a dead heartbeat stops the operation as surely as a revoked lease. A
task ended by someone else (force-stop, the timeout sweep) keeps its slot and
instance until this worker reports its exit (transitions.release_hold) or its
revoked lease runs out; its writes are fenced by the token anyway.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import threading
import time

from django.conf import settings
from django.db import InterfaceError, OperationalError, connection
from django.utils import timezone
from django_q.timeout import TimeoutHandler

from providers.base import (
    CANCEL_LEASE_LOST,
    CANCEL_SHUTDOWN,
    CANCEL_TIMEOUT,
    CANCEL_USER,
    CancelToken,
    LeaseClock,
    OperationCancelled,
    ProviderConfig,
    ProviderError,
    UnreachableError,
    build_driver,
)
from tasks.engine import clock, health, transitions
from tasks.engine.states import CANCELLED, CANCELLING, COMPLETED, FAILED, TIMEOUT, ErrorCode
from tasks.models import Task, Worker
from tasks.operations import get_operation
from tasks.operations.base import ExecutionContext

logger = logging.getLogger(__name__)

_current: dict[int, CancelToken] = {}
# The heartbeat kills the process this long after the alarm should have stopped the operation.
HARD_KILL_SLACK = 2.0
# What a task killed at its hard timeout records, by the alarm or by the heartbeat.
HARD_TIMEOUT = {"error_code": ErrorCode.TIMEOUT, "error_message": "killed at the hard timeout"}
# How long the end of a task waits for a heartbeat tick in progress (normally milliseconds;
# a tick stuck in a hung database call is left behind: its writes are fenced anyway).
UNWATCH_WAIT_SECONDS = 2.0


def lease_margin() -> float:
    """How long after sending a renewal (or the claim) the worker still counts its lease as
    proven: the lease minus a heartbeat, so it stops before the database's lease runs out."""
    return float(settings.TASK_LEASE_SECONDS - settings.TASK_HEARTBEAT_SECONDS)


def draining_since() -> float | None:
    """When this machine's supervisor started draining (its drain file's mtime), or None."""
    path = os.environ.get("WORKER_DRAIN_FILE")
    if not path:
        return None
    try:
        return os.stat(path).st_mtime
    except FileNotFoundError:
        return None


def worker_name() -> str:
    return f"{settings.WORKER_NODE}:{os.getpid()}"


def provider_config(provider) -> ProviderConfig:
    return ProviderConfig(
        provider_id=provider.pk,
        name=provider.name,
        provider_type=provider.provider_type,
        connection=dict(provider.connection or {}),
        secrets=provider.get_secrets(),
    )


class Watch:
    """One running task as the heartbeat sees it."""

    def __init__(self, task_id: int, token: str, cancel: CancelToken, worker: str):
        self.task_id, self.token, self.cancel, self.worker = task_id, token, cancel, worker
        self.lock = threading.Lock()  # held by a tick; unwatch waits for it
        self.active = True
        self.last_renewed = time.monotonic()
        self.next_beat = self.last_renewed + settings.TASK_HEARTBEAT_SECONDS
        self.next_check = self.last_renewed + settings.TASK_CANCEL_POLL_SECONDS

    def tick(self, now: float) -> None:
        """Renew the lease when due, else read the status (the cancel check); fence when lost."""
        # Reading the flag fires the deadline even while the operation is stuck in a
        # call; the lease keeps being renewed while it winds down, so nobody recovers it.
        _ = self.cancel.cancelled
        deadline = self.cancel.deadline
        if deadline is not None and now >= deadline + settings.TASK_HARD_KILL_GRACE_SECONDS + HARD_KILL_SLACK:
            self.kill()
        if now < self.next_check:
            return
        self.next_check = now + settings.TASK_CANCEL_POLL_SECONDS
        try:
            if now >= self.next_beat:
                self.next_beat = now + settings.TASK_HEARTBEAT_SECONDS
                status = transitions.renew_lease(self.task_id, token=self.token)
                if status is not None:
                    self.last_renewed = now
                    # (``now`` was taken before the renewal was sent: the database's new
                    # lease runs out at least a margin after this local deadline.)
                    if self.cancel.lease is not None:
                        self.cancel.lease.extend(now + lease_margin())
                    Worker.objects.filter(name=self.worker).update(last_heartbeat=timezone.now())
            else:
                status = transitions.read_status(self.task_id, token=self.token)
        except Exception as exc:  # database unreachable: self-fence once the lease must have run out
            connection.close()
            if now - self.last_renewed >= settings.TASK_LEASE_SECONDS - settings.TASK_HEARTBEAT_SECONDS:
                logger.error("task %s: cannot renew the lease (%s); stopping the operation", self.task_id, exc)
                self.cancel.cancel(CANCEL_LEASE_LOST)
            return
        if status is None:
            if not self.cancel.cancelled:
                logger.warning("task %s: lease lost (force-stopped or recovered); stopping the operation", self.task_id)
            self.cancel.cancel(CANCEL_LEASE_LOST)
        elif status == CANCELLING:
            self.cancel.cancel(CANCEL_USER)
        since = draining_since()
        if since is not None and time.time() - since >= settings.TASK_SHUTDOWN_GRACE_SECONDS:
            self.cancel.cancel(CANCEL_SHUTDOWN)

    def kill(self) -> None:
        """The operation outlived its deadline + grace and the alarm did not stop it
        (it blocks SIGALRM, or sits in a call that never returns to Python): record
        ``timeout`` and end the process, as django-q2's own timer would later."""
        if not in_job():
            return  # (not a django-q2 worker: tests run operations in their own process)
        logger.error("task %s: still running past its hard timeout; killing the worker process", self.task_id)
        try:
            transitions.finish(
                self.task_id,
                TIMEOUT,
                token=self.token,
                actor=f"worker:{self.worker}",
                needs_reconcile=True,
                **HARD_TIMEOUT,
            )
        except Exception:  # recovery records it once the lease runs out
            logger.exception("task %s: could not record the hard timeout", self.task_id)
        os.kill(os.getpid(), signal.SIGKILL)


class Heartbeat(threading.Thread):
    """One thread per worker process watching the tasks it runs (django-q2 runs one at a time).

    It renews each lease every TASK_HEARTBEAT_SECONDS, carries the cancel check
    every TASK_CANCEL_POLL_SECONDS, fires deadlines and fences a worker that lost
    its lease. It lives as long as the process: a thread per task would cost a
    start and a join per task, which short tasks notice.
    """

    _instance: Heartbeat | None = None
    _instance_lock = threading.Lock()

    def __init__(self):
        super().__init__(name="task-heartbeat", daemon=True)
        self._watches: dict[int, Watch] = {}
        self._lock = threading.Lock()

    @classmethod
    def get(cls) -> Heartbeat:
        with cls._instance_lock:
            # (a forked child inherits the object but not the thread)
            if cls._instance is None or not cls._instance.is_alive():
                cls._instance = cls()
                cls._instance.start()
            return cls._instance

    def watch(self, task_id: int, token: str, cancel: CancelToken, worker: str) -> Watch:
        w = Watch(task_id, token, cancel, worker)
        with self._lock:
            self._watches[id(w)] = w
        return w

    def unwatch(self, w: Watch) -> None:
        """Stop watching: waits for a tick in progress, but not for long.

        A tick stuck in a hung database call (a half-open connection) is left to
        the read timeout: the operation has ended, and whatever that tick still
        writes is fenced by the token (a renewal needs the task still executing).
        """
        got = w.lock.acquire(timeout=UNWATCH_WAIT_SECONDS)
        w.active = False
        if got:
            w.lock.release()
        else:
            logger.warning("task %s: heartbeat stuck in a database call; not waiting for it", w.task_id)
        with self._lock:
            self._watches.pop(id(w), None)

    def run(self) -> None:
        idle = True
        while True:
            time.sleep(min(0.1, settings.TASK_CANCEL_POLL_SECONDS))
            with self._lock:
                watches = list(self._watches.values())
            if not watches:
                if not idle:
                    connection.close()  # no connection held between tasks
                    idle = True
                continue
            idle = False
            for w in watches:
                with w.lock:
                    if not w.active:
                        continue
                    try:
                        w.tick(time.monotonic())
                    except Exception:  # never let one task's surprise stop the others' heartbeats
                        logger.exception("task %s: heartbeat failed", w.task_id)


class ProgressReporter:
    """Progress writes, throttled to a few a second; a new message is always written."""

    def __init__(self, task_id: int, token: str, cancel: CancelToken):
        self.task_id, self.token, self.cancel = task_id, token, cancel
        self.last_at = 0.0
        self.last = (-1, "")

    def __call__(self, percent: int, message: str) -> None:
        if self.cancel.cancelled and self.cancel.reason == CANCEL_LEASE_LOST:
            return  # fenced: nothing to write, and a hung database must not hold the operation up
        percent = max(0, min(100, int(percent)))
        now = time.monotonic()
        step = message != self.last[1]
        if not step and (percent == self.last[0] or now - self.last_at < settings.TASK_PROGRESS_MIN_INTERVAL):
            return
        self.last_at, self.last = now, (percent, message)
        try:
            ok = transitions.report_progress(
                self.task_id, token=self.token, progress=percent, message=message, step=step
            )
        except Exception:
            logger.warning("task %s: progress write failed", self.task_id, exc_info=True)
            return
        if not ok:
            self.cancel.cancel(CANCEL_LEASE_LOST)


# The registry row (tasks.models.Worker) is written by a claim at most once a
# second per process: short tasks would otherwise add a statement each to the
# hot path. tasks_run catches up on the claims in between.
_registry: dict = {"written_at": None, "unreported": 0}


def _registry_due() -> dict | None:
    """The registry fields when this claim should write the row, else None."""
    last = _registry["written_at"]
    if last is not None and time.monotonic() - last < settings.WORKER_REGISTRY_INTERVAL_SECONDS:
        return None
    return {
        "node": settings.WORKER_NODE,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "queue": os.environ.get("WORKER_POOL_NAME", "default"),
        "tasks_run": _registry["unreported"] + 1,
    }


def _registry_claimed(registry: dict | None) -> None:
    """After a claim that won: it wrote the row (``registry`` given) or is one more to report."""
    if registry is not None:
        _registry["written_at"] = time.monotonic()
        _registry["unreported"] = 0
    else:
        _registry["unreported"] += 1


def in_job() -> bool:
    """Whether this process runs a django-q2 job now (its timeout handler is set)."""
    return isinstance(getattr(signal.getsignal(signal.SIGALRM), "__self__", None), TimeoutHandler)


def arm_hard_kill(seconds: float) -> None:
    """(Re-)arm django-q2's alarm in its worker process: its TimeoutException in ``seconds``.

    django-q2 arms SIGALRM once per job; a job running several tasks re-arms it for
    each. Outside a django-q2 worker's main thread (tests, threads) this does nothing.
    """
    if threading.current_thread() is threading.main_thread() and in_job():
        signal.alarm(max(1, math.ceil(seconds)))


class Handoff:
    """A finishing worker's offer to run the next task of its provider itself.

    Admission (dispatch.admit_locked) asks ``fits`` with the next task's timeout,
    claims the task for ``worker`` in the finishing transaction when it does, and
    hands it over by ``accept`` on commit.
    """

    def __init__(self, worker: str, until: float | None):
        self.worker = worker
        self.until = until  # (monotonic) end of the job's django-q2 timeout; None: no room
        self.registry: dict | None = None
        self.task: Task | None = None
        self.offered_at = time.monotonic()  # when the finish that may claim for us began

    def fits(self, timeout_seconds: int) -> bool:
        """Room for the task's whole timeout and grace in this job, and this worker is not stopping."""
        if self.until is None or draining_since() is not None:
            return False
        return time.monotonic() + timeout_seconds + settings.TASK_HARD_KILL_GRACE_SECONDS + 1 <= self.until

    def accept(self, task: Task) -> None:
        self.task = task
        _registry_claimed(self.registry)


def run_job(task_id: int, token: str, seconds: int | None = None) -> str:
    """django-q2's entry point: run the task, then the ones its finish hands over.

    A task's finish admits the next task of its provider in the same transaction;
    rather than send that job through the broker and wait for a worker to pick it
    up and claim it, the finish claims it for this worker, which runs it at once:
    while the job's django-q2 timeout (``seconds``, dispatch.job_seconds) still
    has room for the next task's whole timeout and hard-kill grace, and not while
    the machine drains or the process shuts down. Limits, FIFO and fencing are
    those of any claim.
    """
    handoff = Handoff(worker_name(), time.monotonic() + seconds if seconds else None)
    outcome = execute(task_id, token, handoff=handoff)
    handed = 0
    while handoff.task is not None:
        task, handoff.task = handoff.task, None
        run_claimed(task, handoff=handoff, leased_at=handoff.offered_at)
        handed += 1
        arm_hard_kill(handoff.until - time.monotonic())  # the job's own limit between two tasks
    return f"{outcome}, then {handed} handed over" if handed else outcome


def execute(task_id: int, token: str, *, heartbeat: bool = True, handoff: Handoff | None = None) -> str:
    """Claim and run one admitted task. Returns what happened (for logs and tests).

    ``heartbeat=False`` only for in-process runs inside an open transaction (tests):
    the heartbeat thread's own connection could not see the uncommitted task and
    would take that for a lost lease. The deadline still holds (the cancel token).
    ``handoff``: the offer to run the task this one's finish admits (run_job).
    """
    name = worker_name()
    if draining_since() is not None:
        # This machine is shutting down: claim nothing; the supervisor re-sends the job.
        logger.info("task %s: worker draining; job left for others", task_id)
        return "draining"
    registry = _registry_due()
    leased_at = time.monotonic()
    task = _claim(task_id, token, name, registry)
    if task is None:
        logger.info("task %s: job not claimable (duplicate, late or revoked); dropped", task_id)
        return "dropped"
    _registry_claimed(registry)
    return run_claimed(task, heartbeat=heartbeat, handoff=handoff, leased_at=leased_at)


# MySQL client errors that mean the connection is gone, not that the statement was wrong:
# can't connect (2002 socket, 2003 TCP), server has gone away, lost connection during
# a query, lost connection at handshake.
DISCONNECTED = frozenset({2002, 2003, 2006, 2013, 2055})


def disconnected(exc: BaseException) -> bool:
    """Whether a database error says the connection was lost or could not be made."""
    if isinstance(exc, InterfaceError):
        return True
    return isinstance(exc, OperationalError) and bool(exc.args) and exc.args[0] in DISCONNECTED


def _claim(task_id: int, token: str, name: str, registry: dict | None) -> Task | None:
    """The claim, waiting out a database that is away for a moment.

    A job this worker holds is the task's only copy until the sweep sends another,
    TASK_DISPATCH_TIMEOUT_SECONDS after admission at the soonest (later while the
    provider's queue holds other jobs: dispatch.redispatch_stale). Failing it on a connection that died while the worker idled (a database
    restart, a proxy that cut it) or during a short outage would leave the admitted
    task waiting that long for nothing. So a lost or refused connection is closed and
    the claim tried again on a new one, with backoff, for up to
    TASK_DISPATCH_TIMEOUT_SECONDS. Nothing is claimed twice: the claim is one
    compare-and-set transaction on the job's token; if its commit was sent but its
    answer lost, the retry finds the task no longer pending and drops the job, and the
    lease that nobody renews sends the task to recovery, as for any lost worker.
    """
    give_up = time.monotonic() + float(settings.TASK_DISPATCH_TIMEOUT_SECONDS)
    delay = 0.1
    while True:
        try:
            return transitions.claim_task(task_id, token=token, worker=name, registry=registry)
        except (OperationalError, InterfaceError) as exc:
            if not disconnected(exc) or connection.in_atomic_block or time.monotonic() + delay > give_up:
                raise
            logger.warning("task %s: claim failed, database unreachable (%s); retrying", task_id, exc)
            connection.close()
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def run_claimed(
    task: Task, *, heartbeat: bool = True, handoff: Handoff | None = None, leased_at: float | None = None
) -> str:
    """Run a task this worker claimed, and record its outcome.

    ``leased_at``: (monotonic) when the claim was sent; the lease is proven for
    lease_margin() from then, and from each renewal on. Without a heartbeat (tests
    in one transaction) nothing renews it, and the token carries no lease deadline.
    """
    task_id, token, name = task.pk, task.lease_token, worker_name()
    elapsed = (clock.now() - task.started_at).total_seconds()
    lease = (
        LeaseClock((leased_at if leased_at is not None else time.monotonic()) + lease_margin()) if heartbeat else None
    )
    cancel = CancelToken(deadline=time.monotonic() + task.effective_timeout - elapsed, lease=lease)
    arm_hard_kill(task.effective_timeout - elapsed + settings.TASK_HARD_KILL_GRACE_SECONDS)
    _current[task_id] = cancel
    watch = Heartbeat.get().watch(task_id, token, cancel, name) if heartbeat else None
    logger.info("task %s: %s started on %s (timeout %s s)", task_id, task.task_type, name, task.effective_timeout)
    ctx = None
    result: tuple[str, dict] = (FAILED, {"error_code": ErrorCode.INTERNAL_ERROR, "error_message": "not run"})
    try:
        op = get_operation(task.task_type)
        driver = build_driver(provider_config(task.provider))
        ctx = ExecutionContext(
            task=task,
            instance=task.instance,
            provider=task.provider,
            driver=driver,
            cancel=cancel,
            progress=ProgressReporter(task_id, token, cancel),
            data=dict(task.task_data),
            checkpoints=dict(task.checkpoints or {}),
        )
        op.run(ctx)
        result = (COMPLETED, {})
    except OperationCancelled as exc:
        result = _cancelled_outcome(exc.reason or cancel.reason, task)
    except ProviderError as exc:
        if cancel.cancelled and cancel.reason in (CANCEL_TIMEOUT, CANCEL_USER, CANCEL_SHUTDOWN):
            result = _cancelled_outcome(cancel.reason, task)
        elif isinstance(exc, UnreachableError):
            # Hold the provider's queue before this finish admits the next task (tasks.engine.health).
            _mark_unreachable(task, exc)
            result = (FAILED, {"error_code": ErrorCode.PROVIDER_UNREACHABLE, "error_message": str(exc)[:2000]})
        else:
            code = getattr(exc, "error_code", "") or ErrorCode.PROVIDER_ERROR
            result = (FAILED, {"error_code": code, "error_message": str(exc)[:2000]})
    except Exception as exc:
        logger.exception("task %s: operation crashed", task_id)
        result = (
            FAILED,
            {"error_code": ErrorCode.INTERNAL_ERROR, "error_message": f"{type(exc).__name__}: {exc}"[:2000]},
        )
    except BaseException:
        # django-q2's hard timeout (TimeoutException is a SystemExit) or an interrupt:
        # record the truth while we still can, then let it kill the process.
        if watch is not None:
            Heartbeat.get().unwatch(watch)
            watch = None
        if not _finish(task_id, token, TIMEOUT, ctx, HARD_TIMEOUT):
            _report_exit(task_id, token)  # (the operation was interrupted: it no longer runs)
        _current.pop(task_id, None)
        raise
    finally:
        if watch is not None:
            Heartbeat.get().unwatch(watch)
    _current.pop(task_id, None)
    status, fields = result
    outcome = "fenced"
    if status == "released":
        # Drained: the task goes back to pending, resumed elsewhere (not a lost attempt).
        transitions.release_lease(task_id, token=token, actor=f"worker:{name}")
        outcome = "released"
    elif status != "fenced":
        if handoff is not None:
            handoff.registry = _registry_due()
            handoff.offered_at = time.monotonic()
        outcome = status if _finish(task_id, token, status, ctx, fields, handoff) else "fenced"
    if outcome == "fenced":
        logger.warning("task %s: result (%s) not recorded: the lease is no longer ours", task_id, status)
        _report_exit(task_id, token)
    return outcome


def _report_exit(task_id: int, token: str) -> None:
    """This worker has stopped touching the host for a task someone else ended: free the
    slot and instance it kept held (transitions.release_hold). If this fails, the sweep
    frees them once the revoked lease has run out."""
    try:
        transitions.release_hold(task_id, token=token)
    except Exception:
        logger.warning("task %s: could not report the worker's exit; the hold ends with the lease", task_id)
        connection.close()


def _mark_unreachable(task: Task, exc: UnreachableError) -> None:
    try:
        health.mark_unreachable(task.provider_id, str(exc))
    except Exception:  # the task's own outcome matters more; the next failure marks it again
        logger.exception("task %s: could not mark provider %s unreachable", task.pk, task.provider_id)


def _cancelled_outcome(reason: str, task: Task) -> tuple[str, dict]:
    if reason == CANCEL_TIMEOUT:
        return TIMEOUT, {
            "error_code": ErrorCode.TIMEOUT,
            "error_message": f"timed out after {task.effective_timeout} s",
        }
    if reason == CANCEL_USER:
        return CANCELLED, {}
    if reason == CANCEL_SHUTDOWN:
        return "released", {}
    return "fenced", {}


def _finish(
    task_id: int, token: str, status: str, ctx: ExecutionContext | None, fields: dict, handoff: Handoff | None = None
) -> bool:
    kwargs = dict(fields)
    known = ctx.task if ctx is not None else None
    if ctx is not None:
        kwargs["instance_updates"] = ctx.result
        kwargs["instance_status"] = ctx.instance_status
        kwargs["secret"] = ctx.secret if status == COMPLETED else None
        if status != COMPLETED and ctx.error_note:
            note = ctx.error_note[:1000]
            base = str(kwargs.get("error_message") or "")[: 2000 - len(note) - 2]
            kwargs["error_message"] = f"{base}; {note}" if base else note
    for attempt in range(5):
        try:
            return transitions.finish(
                task_id, status, token=token, actor=f"worker:{worker_name()}", known=known, handoff=handoff, **kwargs
            )
        except Exception:
            # The database may be briefly away: retry the final write; the lease
            # rules decide if we are too late.
            logger.warning("task %s: final write failed (attempt %d)", task_id, attempt + 1, exc_info=True)
            if connection.in_atomic_block:
                raise
            connection.close()
            time.sleep(min(0.5 * 2**attempt, 4))
    return False


def run_admitted_inline(provider_id: int | None = None, max_tasks: int = 10_000) -> int:
    """Admit and run pending tasks in this process, FIFO, until none is left (tests, demos)."""
    from tasks.engine import dispatch
    from tasks.engine.states import PENDING
    from tasks.models import Provider

    done = 0
    providers = [provider_id] if provider_id else list(Provider.objects.values_list("pk", flat=True))
    while done < max_tasks:
        for pid in providers:
            dispatch.admit(pid)
        ready = list(
            Task.objects.filter(status=PENDING, admitted_at__isnull=False, provider_id__in=providers)
            .order_by("admitted_at", "id")
            .values_list("pk", "lease_token")[:100]
        )
        if not ready:
            return done
        for pk, token in ready:
            execute(pk, token, heartbeat=not connection.in_atomic_block)
            done += 1
    return done
