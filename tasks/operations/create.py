"""create: the guest, its root password, its default port block, its addresses.

Quota, provider capacity and the default port block (first port -> SSH 22) were
reserved by services.create_instance in the transaction that queued this task.

Steps (progress): create the guest 5-55, start it 55-65, set the root password
65-72, map the default ports 72-85, read the addresses 88, traffic counters 95.

Success: the ports turn active, the instance runs with its addresses and
provider ref, the password is stored encrypted for one read by the owner.
Failure or cancel: the guest is deleted again (bounded, with a fresh token) and
verified gone; then everything is released and the instance ends ``failed``.
If the guest cannot be verified gone, nothing is released (it may still use
the host), the instance shows ``error`` with needs_reconcile, and the error
message says so; reconciliation or a delete settles it.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from providers.base import CANCEL_LEASE_LOST, HostPortBusy, OperationCancelled, ProviderError, no_progress
from tasks import crypto, ports, resources, traffic
from tasks.engine.states import CANCELLED, COMPLETED, EXECUTING, InstanceStatus, TaskType
from tasks.errors import PortConflict
from tasks.models import Instance, PortMapping, Provider, Task
from tasks.operations import register
from tasks.operations.base import ExecutionContext, Operation, Outcome
from tasks.operations.steps import (
    Steps,
    cleanup_token,
    guest_ref,
    guest_spec,
    handed_on,
    port_specs,
    record_addresses,
    retry_base_seconds,
)

logger = logging.getLogger("tasks.operations")

ADDRESS_POLLS = 10  # a booting guest may need a few seconds to report addresses


class CreateOperation(Operation):
    task_type = TaskType.CREATE
    touches_quota = True
    success_status = InstanceStatus.RUNNING

    def run(self, ctx: ExecutionContext) -> None:
        steps = Steps(ctx)
        attempts = settings.TASK_CREATE_PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            try:
                self._create(ctx, steps)
                return
            except Exception as exc:
                if handed_on(ctx):
                    # Handed back at shutdown, or fenced off because the task is resumed
                    # elsewhere: the guest stays; the next attempt finds it and finishes it.
                    logger.info(
                        "task %s: create stopped (%s); guest left for the next attempt", ctx.task.pk, ctx.cancel.reason
                    )
                    raise
                busy = self._busy_ports(ctx, exc)
                problem = self._undo(ctx, steps)
                if problem:
                    # Say so where the operator looks: the task's error message (the worker
                    # appends it to whatever error ends the task: failure, cancel or timeout).
                    name = guest_ref(ctx.instance)["name"]
                    ctx.error_note = (
                        f"and the guest could not be removed again: {problem}; guest {name} may remain on the provider"
                    )
                    raise
                if not busy:
                    raise
                start = self._move_ports(ctx, busy) if attempt < attempts else None
                if start is None:
                    ctx.error_note = (
                        f"host port {ports.listed(busy)} is in use on the host, outside the panel; tried {attempt} port"
                        f" block(s)"
                    )
                    raise
            steps.step(5, f"host port {ports.listed(busy)} is in use on the host; trying the block from port {start}")
            # The guest is verified gone and the ports moved: the next attempt starts afresh
            # (a cancel before this point ends the task with the guest known gone).
            ctx.instance_status = None

    def _busy_ports(self, ctx: ExecutionContext, exc: Exception) -> list[int]:
        """The instance's own host ports that the host refused to bind, recorded so that
        automatic allocation skips them; [] for any other error."""
        if not isinstance(exc, HostPortBusy) or ctx.cancel.cancelled:
            return []
        mappings = PortMapping.objects.filter(instance=ctx.instance, status=PortMapping.STATUS_PENDING)
        return ports.record_refused(
            ctx.provider.pk, exc, list(mappings.values_list("host_port_start", "host_port_end"))
        )

    def _move_ports(self, ctx: ExecutionContext, busy: list[int]) -> int | None:
        """Give the instance a new default block that avoids ``busy``: its pending mappings
        turn ``failed`` and new ones are reserved, under the provider row lock (the
        system's lock order) and only while this run still holds the task's lease.
        Returns the new block's first port (the SSH port), None when none is free."""
        instance = ctx.instance
        try:
            with transaction.atomic():
                provider = Provider.objects.select_for_update().get(pk=ctx.provider.pk)
                if provider.default_port_block == 0:  # (as it is now: an operator may have changed it)
                    return None
                PortMapping.objects.filter(instance=instance, status=PortMapping.STATUS_PENDING).update(
                    status=PortMapping.STATUS_FAILED
                )
                exclude = [(port, port) for port in busy]
                start = ports.reserve_default_block(provider, instance, exclude)[0].host_port_start
                held = Task.objects.filter(
                    pk=ctx.task.pk, lease_token=ctx.task.lease_token, status__in=EXECUTING
                ).values("pk")
                if not Instance.objects.filter(pk=instance.pk, active_task_id__in=held).update(ssh_port=start):
                    raise OperationCancelled(CANCEL_LEASE_LOST)  # (rolls the new block back)
        except PortConflict:
            return None  # no free block left (rolled back: the old block stays pending)
        instance.ssh_port = start
        logger.warning(
            "task %s: host port(s) %s of %s in use on the host; moved to the block from %s",
            ctx.task.pk,
            ports.listed(busy),
            ctx.provider.name,
            instance.ssh_port,
        )
        return instance.ssh_port

    def _create(self, ctx: ExecutionContext, steps: Steps) -> None:
        instance = ctx.instance
        driver = ctx.driver
        password = crypto.generate_password()
        mappings = list(
            PortMapping.objects.filter(instance=instance, status=PortMapping.STATUS_PENDING).order_by(
                "host_port_start", "pk"
            )
        )
        steps.step(2, "preparing")
        spec = guest_spec(instance)
        # Drivers whose ports are fixed at creation (Docker) publish them with the guest.
        spec.ports = [port for mapping in mappings for port in port_specs(mapping)]
        reserve = getattr(driver, "reserve", None)
        if reserve is not None:
            # Drivers with host-allocated ids (Proxmox VMIDs) reserve one first; it is
            # stored before the create call, so a retry after a crash reuses it.
            spec.ref = {**spec.ref, **steps.call("reserving the guest id", lambda p: reserve(spec), 3, 5)}
            # Only while this worker still holds the task's lease: a fenced worker must not
            # rewrite the ref of an instance that another task may already work on.
            held = Task.objects.filter(pk=ctx.task.pk, lease_token=ctx.task.lease_token, status__in=EXECUTING).values(
                "pk"
            )
            if not Instance.objects.filter(pk=instance.pk, active_task_id__in=held).update(provider_ref=spec.ref):
                raise OperationCancelled(CANCEL_LEASE_LOST)
            instance.provider_ref = spec.ref
        ref = steps.call("creating the guest", lambda p: driver.create(spec, ctx.cancel, p), 5, 55)
        ref = {**ref, "name": ref.get("name") or spec.name}
        # From here on every later step (and the undo) addresses the guest by its ref.
        ctx.result["provider_ref"] = ref
        instance.provider_ref = ref
        steps.call("starting the guest", lambda p: driver.start(ref, ctx.cancel, p), 55, 65)
        steps.call("setting the root password", lambda p: driver.set_password(ref, password, ctx.cancel, p), 65, 72)
        steps.call_each(
            [port for mapping in mappings for port in port_specs(mapping)],
            lambda port: f"mapping {port.handle}",  # (the simulated driver says the same: one row)
            lambda port, p: driver.add_port(ref, port, ctx.cancel, p),
            72,
            85,
        )
        steps.step(88, "reading the addresses")
        state = steps.read_state()
        polls = 0
        while state.exists and not state.addresses and polls < ADDRESS_POLLS:
            polls += 1
            ctx.cancel.sleep(min(1.0, retry_base_seconds()))
            state = steps.read_state()
        if not state.exists:
            raise ProviderError(f"guest {spec.name} vanished right after it was created", op="create")
        record_addresses(ctx, state)
        steps.sync_traffic(traffic.AFTER_CREATE, 95)
        ctx.result["ssh_port"] = instance.ssh_port
        ctx.instance_status = InstanceStatus.RUNNING if state.status == InstanceStatus.RUNNING else None
        ctx.secret = password
        steps.step(100, "created")

    def _undo(self, ctx: ExecutionContext, steps: Steps) -> str:
        """Remove whatever part of the guest exists; '' when verified gone, else why not."""
        # Keep only the ref: reconciliation needs it to find a guest left behind.
        ref_result = ctx.result.get("provider_ref")
        ctx.result.clear()
        if ref_result:
            ctx.result["provider_ref"] = ref_result
        ctx.secret = None
        token = cleanup_token(ctx)
        ref = guest_ref(ctx.instance)
        reason = ctx.cancel.reason if ctx.cancel.cancelled else "failure"
        logger.info("task %s: create stopped (%s); removing guest %s", ctx.task.pk, reason, ref["name"])
        ctx.progress(steps.percent, "removing the partly created guest")
        problem = ""
        for attempt in range(3):
            try:
                ctx.driver.delete(ref, token, no_progress)
                state = ctx.driver.get_state(ref)
                if not state.exists:
                    ctx.instance_status = InstanceStatus.FAILED
                    return ""
                problem = f"guest {ref['name']} still exists after delete"
            except OperationCancelled:
                problem = "out of time while removing it"
                break
            except ProviderError as exc:
                problem = str(exc)
                if not exc.retryable:
                    break
            except Exception as exc:  # never let the undo hide the original error
                logger.exception("task %s: undo of create crashed", ctx.task.pk)
                problem = f"{type(exc).__name__}: {exc}"
                break
            try:
                token.sleep(retry_base_seconds() * 2**attempt)
            except OperationCancelled:
                break
        logger.error("task %s: guest %s may be left on the provider: %s", ctx.task.pk, ref["name"], problem)
        ctx.instance_status = InstanceStatus.ERROR
        return problem

    def on_finished(self, task, instance, outcome: Outcome) -> None:
        if instance is None:
            return
        if outcome.status == COMPLETED:
            super().on_finished(task, instance, outcome)
            PortMapping.objects.filter(instance=instance, status=PortMapping.STATUS_PENDING).update(
                status=PortMapping.STATUS_ACTIVE
            )
            return
        if not outcome.ran or outcome.instance_status == InstanceStatus.FAILED:
            # Nothing exists on the provider (never started, or verified removed).
            resources.release(instance)
            if not outcome.ran and outcome.status == CANCELLED:
                instance.status = InstanceStatus.DELETED
                instance.deleted_at = timezone.now()
            else:
                instance.status = InstanceStatus.FAILED
            instance.live_name = None
            instance.needs_reconcile = False
            instance.addresses = []
            return
        # A guest may be left behind (undo failed, force-stopped, worker lost):
        # keep holding its resources until reconciliation or a delete proves it gone.
        super().on_finished(task, instance, outcome)
        if outcome.instance_status is None:
            instance.status = InstanceStatus.UNKNOWN
        instance.needs_reconcile = True


register(CreateOperation())
