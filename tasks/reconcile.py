"""Reconciliation: after a task ended without a trustworthy result (worker lost,
force-stop, an undo that could not finish), ask the provider what is true.

``reconcile_instance`` reads ``driver.get_state`` outside any transaction, then
applies the answer with a compare-and-set: only if the instance still needs
reconciliation, still has no active task and was not changed meanwhile
(``updated_at``), under the system's lock order (quota -> provider -> instance).

What the answer means:

- guest gone, and the instance's create never completed (or its last task was a
  delete): quota, capacity and ports are released; the instance ends ``failed``
  (create) or ``deleted`` (delete).
- guest gone otherwise: ``error`` (it vanished behind our back; the owner may
  delete the instance, which then releases everything).
- guest present: its power state (``running``/``stopped``; ``error`` when the
  guest is half built or the create never completed); addresses refreshed;
  pending port mappings become active if the host has them, else failed. The
  guest of a create that never completed keeps ``needs_reconcile`` (it may be
  left on the host): a delete or a retried create settles it.
"""

from __future__ import annotations

import logging

from django.db import transaction
from django.utils import timezone

from providers.base import GuestState, build_driver
from tasks import resources
from tasks.engine.states import ACTIVE, COMPLETED, InstanceStatus, TaskType
from tasks.engine.transitions import retry_on_deadlock
from tasks.models import Instance, PortMapping, Provider, Task, TaskEvent, UserQuota
from tasks.operations.steps import guest_ref, port_specs, status_of

logger = logging.getLogger(__name__)


def _driver_for(provider: Provider):
    from tasks.engine.worker import provider_config

    return build_driver(provider_config(provider))


def reconcile_instance(instance_id: int) -> bool:
    """Bring one instance in line with its provider. True when it was changed."""
    instance = Instance.objects.select_related("provider").filter(pk=instance_id).first()
    if instance is None or not instance.needs_reconcile or instance.active_task_id is not None:
        return False
    seen = instance.updated_at
    try:
        state = _driver_for(instance.provider).get_state(guest_ref(instance))
    except Exception as exc:  # a provider that cannot answer (or a bad setting): try again at the next sweep
        logger.warning("instance %s: reconciliation postponed, provider did not answer: %s", instance_id, exc)
        return False
    create_done = Task.objects.filter(instance_id=instance_id, task_type=TaskType.CREATE, status=COMPLETED).exists()
    last_type = (
        Task.objects.filter(instance_id=instance_id).order_by("-created_at", "-id").values_list("task_type", flat=True)
    ).first()
    return _apply(instance_id, seen, state, create_done=create_done, last_type=last_type)


@retry_on_deadlock
def _apply(instance_id: int, seen, state: GuestState, *, create_done: bool, last_type: str | None) -> bool:
    with transaction.atomic():
        head = Instance.objects.filter(pk=instance_id).values("owner_id", "provider_id").first()
        if head is None:
            return False
        UserQuota.objects.select_for_update().filter(user_id=head["owner_id"]).first()
        Provider.objects.select_for_update().filter(pk=head["provider_id"]).first()
        instance = Instance.objects.select_for_update().filter(pk=instance_id).first()
        # Compare-and-set: a task or another reconciler got there first.
        if (
            instance is None
            or not instance.needs_reconcile
            or instance.active_task_id is not None
            or instance.updated_at != seen
        ):
            return False
        before = instance.status
        if not state.exists:
            if not create_done or last_type == TaskType.DELETE:
                resources.release(instance)
                instance.status = InstanceStatus.FAILED if not create_done else InstanceStatus.DELETED
                instance.live_name = None
                if instance.status == InstanceStatus.DELETED:
                    instance.deleted_at = timezone.now()
            else:
                instance.status = InstanceStatus.ERROR
        else:
            instance.status = status_of(state) if create_done else InstanceStatus.ERROR
            if state.addresses:
                instance.addresses = list(state.addresses)
            if state.ref and not instance.provider_ref:
                instance.provider_ref = dict(state.ref)
            _settle_pending_ports(instance, state)
        # The guest of a create that never completed is still on the host (an undo that
        # could not remove it, a create force-stopped midway): it stays flagged, so
        # operators see it, until a delete (or a retried create) settles it. Saving
        # still moves updated_at on, so the sweep takes it last next time.
        leftover = state.exists and not create_done
        instance.needs_reconcile = leftover
        instance.save()
        _record_on_last_task(instance_id, before, instance.status, state.exists)
        if leftover:
            logger.warning(
                "instance %s: guest %s of a create that never completed remains on provider %s",
                instance_id,
                instance.guest_name,
                instance.provider_id,
            )
    logger.info(
        "instance %s: reconciled %s -> %s (guest exists: %s)", instance_id, before, instance.status, state.exists
    )
    return True


def _record_on_last_task(instance_id: int, before: str, after: str, exists: bool) -> None:
    """The answer as a step on the timeline of the task that left the instance unsure
    (its last one: a force-stop, a lost worker, an undo that could not finish)."""
    last = Task.objects.filter(instance_id=instance_id).order_by("-created_at", "-id").values("pk", "status").first()
    if last is None:
        return
    message = f"reconciled with the provider: instance {before} -> {after}" + ("" if exists else " (guest not found)")
    latest = TaskEvent.objects.filter(task_id=last["pk"]).order_by("-id").values("actor", "message").first()
    if latest == {"actor": "system:reconcile", "message": message}:
        return  # (a guest left behind is read again at each sweep: one row says it)
    TaskEvent.objects.create(
        task_id=last["pk"],
        kind=TaskEvent.KIND_STEP,
        from_status=last["status"],
        to_status=last["status"],
        actor="system:reconcile",
        message=message,
    )


def _settle_pending_ports(instance: Instance, state: GuestState) -> None:
    """Pending mappings whose task ended without a result: active if the host has them."""
    on_host = {(p.protocol, p.host_port_start, p.host_port_end) for p in state.ports}
    for mapping in PortMapping.objects.filter(instance=instance, status=PortMapping.STATUS_PENDING):
        if Task.objects.filter(port_mapping=mapping, status__in=ACTIVE).exists():
            continue
        present = all((s.protocol, s.host_port_start, s.host_port_end) in on_host for s in port_specs(mapping))
        new = PortMapping.STATUS_ACTIVE if present else PortMapping.STATUS_FAILED
        PortMapping.objects.filter(pk=mapping.pk, status=PortMapping.STATUS_PENDING).update(status=new)


def reconcile_pending(limit: int = 50) -> int:
    """Reconcile up to ``limit`` instances that need it (the engine's sweep calls this).

    Not those of a provider held as unreachable (tasks.engine.health): each call would
    wait out a connect timeout inside the sweep; they are reconciled once it answers.
    """
    candidates = list(
        Instance.objects.filter(
            needs_reconcile=True, active_task__isnull=True, provider__unreachable_since__isnull=True
        )
        .order_by("updated_at", "pk")
        .values_list("pk", flat=True)[:limit]
    )
    done = 0
    for instance_id in candidates:
        try:
            done += reconcile_instance(instance_id)
        except Exception:
            logger.exception("instance %s: reconciliation crashed", instance_id)
    return done
