"""What the nine operations share: steps with progress, retries with backoff,
reading the truth back from the provider, bounded cleanup, traffic sync.

Everything here runs in the worker outside any transaction (ORM reads are
fine, provider calls are the point); the database side of each operation lives
in its ``on_finished`` hook.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from django.conf import settings

from providers.base import (
    CANCEL_LEASE_LOST,
    CANCEL_SHUTDOWN,
    CancelToken,
    GuestSpec,
    GuestState,
    OperationCancelled,
    PermanentError,
    PortSpec,
    ProgressCallback,
    ProviderError,
)
from tasks import traffic
from tasks.engine.states import FINAL, ErrorCode, InstanceStatus
from tasks.models import PortMapping, Task
from tasks.operations.base import ExecutionContext, Operation

if TYPE_CHECKING:
    from tasks.models import Instance

logger = logging.getLogger("tasks.operations")

T = TypeVar("T")

RETRIES = 3  # DESIGN.md section 5: 3 retries, waits base x 1, 2, 4 (2 s, 4 s, 8 s)


class VerifyFailed(PermanentError):
    """The provider said done, but reading the guest back says otherwise."""

    error_code = ErrorCode.VERIFY_FAILED


def retry_base_seconds() -> float:
    return float(settings.TASK_RETRY_BASE_SECONDS)


def guest_ref(instance: Instance) -> dict[str, Any]:
    """The driver's handle: what create returned, else the deterministic name."""
    ref = dict(instance.provider_ref or {})
    ref.setdefault("name", instance.guest_name)
    return ref


def guest_spec(instance: Instance, image: str | None = None) -> GuestSpec:
    return GuestSpec(
        name=instance.guest_name,
        instance_type=instance.instance_type,
        image=image or instance.image,
        cpu=instance.cpu,
        memory_mb=instance.memory_mb,
        disk_mb=instance.disk_mb,
        bandwidth_mbps=instance.bandwidth_mbps,
        labels={"instance": str(instance.uuid), "owner": str(instance.owner_id)},
        ref=dict(instance.provider_ref or {}),
    )


def port_specs(mapping: PortMapping) -> list[PortSpec]:
    """One PortSpec per protocol ("both" is a tcp and a udp mapping on the host)."""
    return [
        PortSpec(
            protocol=proto,
            host_port_start=mapping.host_port_start,
            host_port_end=mapping.host_port_end,
            guest_port_start=mapping.guest_port_start,
            guest_port_end=mapping.guest_port_end,
        )
        for proto in mapping.protocols
    ]


def status_of(state: GuestState | None) -> str | None:
    """The instance status a provider's answer stands for (None: no answer)."""
    if state is None:
        return None
    if not state.exists:
        return InstanceStatus.ERROR
    if state.status in (InstanceStatus.RUNNING, InstanceStatus.STOPPED):
        return state.status
    return InstanceStatus.ERROR


class Steps:
    """Progress per step, and provider calls with retries, for one execution."""

    def __init__(self, ctx: ExecutionContext):
        self.ctx = ctx
        self.percent = 0

    @property
    def task_id(self) -> int:
        return self.ctx.task.pk

    def step(self, percent: int, message: str) -> None:
        """A safe point: stop here if cancelled, else report the step."""
        self.ctx.cancel.raise_if_cancelled()
        self.percent = percent
        self.ctx.progress(percent, message)

    def span(self, lo: int, hi: int) -> ProgressCallback:
        """A driver progress callback mapped into [lo, hi] of the task's progress."""

        def report(percent: int, message: str) -> None:
            value = lo + (hi - lo) * max(0, min(100, int(percent))) // 100
            self.percent = value
            self.ctx.progress(value, message)

        return report

    def call_each(self, items: list, what: Callable, fn: Callable, lo: int, hi: int) -> None:
        """One provider call per item (``fn(item, progress)``), progress spread evenly over lo..hi."""
        n = max(1, len(items))
        for i, item in enumerate(items):
            self.call(
                what(item), lambda p, item=item: fn(item, p), lo + (hi - lo) * i // n, lo + (hi - lo) * (i + 1) // n
            )

    def call(
        self,
        what: str,
        fn: Callable[[ProgressCallback], T],
        lo: int,
        hi: int,
        retries: int = RETRIES,
        once: str | None = None,
    ) -> T:
        """Run a provider call; retry retryable errors with exponential backoff.

        Calls are idempotent ("ensure"), so retrying after an ambiguous outcome
        converges on the state we asked for instead of doing it twice.

        ``once`` names a call that changes something each time it runs (a reinstall,
        a reboot): once it has returned, the task records it (Task.checkpoints) with
        its result, and a resumed attempt of the task skips it and gets that result.
        """
        if once is not None and once in self.ctx.checkpoints:
            self.step(lo, what)
            self.ctx.progress(hi, f"{what}: done by an earlier attempt")
            return self.ctx.checkpoints[once]
        self.step(lo, what)
        base = retry_base_seconds()
        for attempt in range(retries + 1):
            try:
                result = fn(self.span(lo, hi))
                if once is not None:
                    self.ctx.checkpoint(once, result)
                return result
            except ProviderError as exc:
                if not exc.retryable or attempt == retries:
                    raise
                wait = base * 2**attempt
                logger.warning(
                    "task %s: %s failed (%s); retry %d of %d in %.2f s",
                    self.task_id,
                    what,
                    exc,
                    attempt + 1,
                    retries,
                    wait,
                )
                self.ctx.progress(
                    self.percent, f"{what}: provider error, retry {attempt + 1} of {retries} ({str(exc)[:200]})"
                )
                self.ctx.cancel.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    def read_state(self, *, attempts: int = 2) -> GuestState:
        """get_state with a short retry; raises when the provider cannot answer."""
        ref = guest_ref(self.ctx.instance)
        for attempt in range(attempts):
            try:
                return self.ctx.driver.get_state(ref)
            except ProviderError as exc:
                if not exc.retryable or attempt == attempts - 1:
                    raise
                self.ctx.cancel.sleep(retry_base_seconds())
        raise AssertionError("unreachable")  # pragma: no cover

    def sync_traffic(self, phase: str, percent: int) -> None:
        connection = self.ctx.provider.connection or {}
        if traffic.enabled(connection):
            self.step(percent, "syncing traffic counters")
        instance = self.ctx.instance
        addresses = self.ctx.result.get("addresses") or list(instance.addresses or [])
        traffic.sync(
            connection=connection,
            driver=self.ctx.driver,
            target=traffic.TrafficTarget(
                instance_id=instance.pk,
                guest_name=instance.guest_name,
                addresses=list(addresses),
                provider_ref=guest_ref(instance),
            ),
            phase=phase,
            task_id=self.task_id,
            timeout=min(10.0, self.ctx.cancel.remaining() or 10.0),
        )


def truth_after_failure(ctx: ExecutionContext) -> GuestState | None:
    """Read the guest back after a failure or cancel, without the (maybe cancelled) task token."""
    ref = guest_ref(ctx.instance)
    for attempt in range(2):
        try:
            return ctx.driver.get_state(ref)
        except ProviderError as exc:
            if not exc.retryable or attempt == 1:
                logger.warning("task %s: cannot read the guest back: %s", ctx.task.pk, exc)
                return None
            time.sleep(min(1.0, retry_base_seconds()))
        except Exception:
            logger.exception("task %s: reading the guest back crashed", ctx.task.pk)
            return None
    return None


def handed_on(ctx: ExecutionContext) -> bool:
    """Whether the task this run stopped on goes on without it: another attempt will
    resume it from the start (DESIGN.md section 4: work is resumed, not failed).

    A graceful shutdown hands the task back (CANCEL_SHUTDOWN), and a worker that lost
    its lease was fenced off, usually because recovery resumes the task elsewhere. Then
    the run must leave what it made in place: no undo, no cleanup. The resumed attempt
    reads the guest and finishes the work; undoing it here would race that attempt
    (a second worker may already be creating the same guest). Only a lease lost to a
    task that has ended (force-stop, the timeout sweep) is not resumed: its run undoes
    as before. When the database cannot say, the task is not treated as ended.
    """
    if not ctx.cancel.cancelled:
        return False
    if ctx.cancel.reason == CANCEL_SHUTDOWN:
        return True
    if ctx.cancel.reason != CANCEL_LEASE_LOST:
        return False
    try:
        status = Task.objects.filter(pk=ctx.task.pk).values_list("status", flat=True).first()
    except Exception:  # the database is away: recovery resumes the task once the lease runs out
        logger.warning("task %s: cannot read the task after losing its lease; leaving the guest as it is", ctx.task.pk)
        return True
    return status is not None and status not in FINAL


def cleanup_token(ctx: ExecutionContext) -> CancelToken:
    """A fresh token for undoing work after the task's own token was cancelled.

    Bounded so the undo finishes before the worker's hard kill (the task's
    deadline + TASK_HARD_KILL_GRACE_SECONDS) and within a shutdown's grace.
    """
    budget = float(settings.TASK_CLEANUP_SECONDS)
    if ctx.cancel.reason == CANCEL_SHUTDOWN:
        budget = min(budget, float(settings.TASK_SHUTDOWN_GRACE_SECONDS))
    if ctx.cancel.deadline is not None:
        hard_kill = ctx.cancel.deadline + float(settings.TASK_HARD_KILL_GRACE_SECONDS)
        budget = min(budget, max(1.0, hard_kill - time.monotonic() - 1.0))
    # The task's lease still bounds it: a worker that cannot prove its lease stops its
    # undo too (the task's slot and instance are free once the lease has run out).
    return CancelToken(deadline=time.monotonic() + budget, lease=ctx.cancel.lease)


class GuestOperation(Operation):
    """An operation on an existing guest: steps, then the truth on failure.

    Subclasses write ``steps(ctx, steps)``. On any failure or cancel,
    ``after_failure`` decides what the instance shows (by default the state read
    back from the provider) and may return True when the work turned out to be
    done anyway (the truth wins over the cancel).
    """

    def run(self, ctx: ExecutionContext) -> None:
        steps = Steps(ctx)
        try:
            self.steps(ctx, steps)
        except Exception as exc:
            if handed_on(ctx):
                # Handed back or fenced off: the next attempt finishes the work; nothing to
                # undo, and nothing this run reads back would be recorded.
                logger.info("task %s: %s stopped (%s); resumed later", ctx.task.pk, self.task_type, ctx.cancel.reason)
                raise
            if self.after_failure(ctx, steps, exc):
                logger.info("task %s: %s finished after all (%s)", ctx.task.pk, self.task_type, exc)
                ctx.progress(100, "done")
                return
            if isinstance(exc, OperationCancelled):
                logger.info("task %s: %s stopped (%s)", ctx.task.pk, self.task_type, exc.reason)
            else:
                logger.warning("task %s: %s failed: %s", ctx.task.pk, self.task_type, exc)
            raise

    def steps(self, ctx: ExecutionContext, steps: Steps) -> None:
        raise NotImplementedError

    def after_failure(self, ctx: ExecutionContext, steps: Steps, exc: Exception) -> bool:
        ctx.instance_status = status_of(truth_after_failure(ctx))
        return False


def record_addresses(ctx: ExecutionContext, state: GuestState) -> None:
    """Keep the last known addresses: a stopped guest reports none."""
    if state.addresses:
        ctx.result["addresses"] = list(state.addresses)
