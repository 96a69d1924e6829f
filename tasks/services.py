"""The services every surface calls (API, admin, commands): create tasks, cancel, force-stop.

They validate, take the locks in the system's order (quota -> provider ->
instance -> task), write the rows and the first TaskEvent in one transaction,
and wake admission only after commit (a rolled-back request never starts work).
They raise tasks.errors.ServiceError subclasses; the API maps them to 400/404/409.
"""

from __future__ import annotations

import logging
import re
import secrets

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from django.utils.translation import gettext as _

from tasks import live, ports, resources, traffic_counters
from tasks.engine import clock, dispatch, sql, transitions
from tasks.engine.states import (
    ALLOWED_INSTANCE_STATUS,
    CANCELLABLE,
    CANCELLED,
    CANCELLING,
    COMPLETED,
    FAILED,
    FINAL,
    INSTANCE_GONE,
    PENDING,
    RUNNING,
    TIMEOUT,
    InstanceStatus,
    TaskStatus,
    TaskType,
    word,
)
from tasks.engine.transitions import retry_on_deadlock
from tasks.errors import (
    InstanceBusy,
    InvalidInput,
    InvalidState,
    NameTaken,
    NotCancellable,
    NotFound,
    NotRetryable,
    ProviderUnavailable,
    TrafficLimitExceeded,
)
from tasks.models import Instance, InstanceType, PortMapping, Provider, Task, TaskEvent, UserQuota

logger = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def actor_of(user, *, admin: bool = False) -> str:
    if user is None:
        return "system"
    return f"{'admin' if admin else 'user'}:{user.get_username()}"


def actor_role(actor: str) -> str:
    """What a user sees of an event's actor: ``you``, ``operator`` or ``system`` (API.md).

    ``user:<name>`` is only ever written for the instance's owner (a staff member
    acting on someone else's instance is ``admin:<name>``); workers, sweeps and
    anything unknown are the system.
    """
    kind = (actor or "").partition(":")[0]
    if kind == "user":
        return "you"
    if kind == "admin":
        return "operator"
    return "system"


def validate_timeout(timeout_seconds) -> int:
    if timeout_seconds in (None, ""):
        return 0
    try:
        value = int(timeout_seconds)
    except (TypeError, ValueError):
        raise InvalidInput(_("timeout_seconds must be an integer"), field="timeout_seconds") from None
    if value < 0 or value > settings.TASK_MAX_TIMEOUT_SECONDS:
        raise InvalidInput(
            _("timeout_seconds must be between 0 (type default) and %(max)s")
            % {"max": settings.TASK_MAX_TIMEOUT_SECONDS},
            field="timeout_seconds",
        )
    return value


def _new_task(
    *,
    provider: Provider,
    task_type: str,
    instance: Instance,
    initiator,
    timeout_seconds: int,
    task_data: dict | None,
    port_mapping=None,
    reason: str = "",
) -> Task:
    """Insert the task (admitted at once when its provider has a free slot and nobody
    waits ahead of it), make it the instance's active task, write its first event.

    The caller holds the provider and instance row locks.
    """
    now = clock.now()
    used, waiting = dispatch.slot_state(provider.pk)
    limit = provider.concurrency_limit
    admit_now = provider.accepts_work and not waiting and used < limit
    task = Task(
        task_type=task_type,
        owner_id=instance.owner_id,
        initiator=initiator,
        provider_id=instance.provider_id,
        instance=instance,
        port_mapping=port_mapping,
        timeout_seconds=timeout_seconds,
        task_data=task_data or {},
        created_at=now,
        status_message="queued",
    )
    if admit_now:
        for name, value in dispatch.admission_values(now).items():
            setattr(task, name, value)
        task.dispatch_count = 1
    sql.insert(task)
    # The database refuses a second active task: compare-and-set on a unique column
    # (with the instance row locked and seen free, this cannot lose).
    instance_id = sql.col(Instance, "id")
    won = sql.update(
        Instance,
        {"active_task": task.pk},
        f"{instance_id} = %s AND {sql.col(Instance, 'active_task')} IS NULL",
        [instance.pk],
    )
    if won != 1:
        raise InstanceBusy(Instance.objects.filter(pk=instance.pk).values_list("active_task_id", flat=True).first())
    instance.active_task = task
    task.provider = provider
    sql.insert(
        TaskEvent(
            task=task,
            from_status="",
            to_status=PENDING,
            actor=actor_of(initiator, admin=_is_admin_request(initiator, instance))[:200],
            reason=reason[:500],
            at=now,
        )
    )
    live.publish(task.pk, task.owner_id)
    if admit_now:
        dispatch.send_on_commit(provider.queue_name, [(task.pk, task.lease_token, task.effective_timeout)])
    elif waiting and provider.accepts_work and used < limit:
        # Free slots but older tasks waiting (a limit was raised, a wake-up was lost): admit them now.
        dispatch.admit_locked(provider)
    logger.info("task %s: %s of instance %s queued by %s", task.pk, task_type, instance.pk, initiator)
    return task


def _is_admin_request(user, instance: Instance) -> bool:
    return bool(user is not None and user.is_staff and user.pk != instance.owner_id)


def visible_instances(user, *, admin: bool = False):
    qs = Instance.objects.all()
    return qs if admin else qs.filter(owner=user)


def get_instance_for(user, instance_id, *, admin: bool = False, lock: bool = False) -> Instance:
    qs = visible_instances(user, admin=admin)
    if lock:
        qs = qs.select_for_update()
    instance = qs.filter(pk=instance_id).first()
    if instance is None:
        raise NotFound(_("no such instance"))
    return instance


def _lock_for_new_task(user, instance_id, *, admin: bool) -> tuple[Provider, Instance]:
    """Lock provider then instance (the system's order) for a new task on the instance.

    The provider comes first also because inserting the task makes InnoDB take a
    shared lock on the provider row (foreign key check): taking the instance
    first would invert the order a terminal transition uses.
    """
    owner = "" if admin else f"{sql.col(Instance, 'owner')} = %s"
    params = [] if admin else [user.pk]
    try:
        instance_pk = int(instance_id)
    except (TypeError, ValueError):
        raise NotFound(_("no such instance")) from None
    head = sql.values(Instance, instance_pk, ["provider"], where=owner, params=params)
    if head is None:
        raise NotFound(_("no such instance"))
    provider = sql.get(Provider, head[0], lock=True)
    instance = sql.get(Instance, instance_pk, lock=True, where=owner, params=params)
    if provider is None or instance is None:
        raise NotFound(_("no such instance"))
    instance.provider = provider
    return provider, instance


@retry_on_deadlock
def create_instance(
    owner,
    *,
    provider: Provider | int,
    image: str,
    instance_type: str = InstanceType.CONTAINER,
    cpu: int = 1,
    memory_mb: int = 512,
    disk_mb: int = 10240,
    name: str | None = None,
    bandwidth_mbps: int = 100,
    timeout_seconds=None,
    initiator=None,
) -> tuple[Instance, Task]:
    """Reserve quota, capacity and the default port block, and queue the create task."""
    initiator = initiator or owner
    timeout = validate_timeout(timeout_seconds)
    if instance_type not in InstanceType.values:
        raise InvalidInput(_("instance_type must be container or vm"), field="instance_type")
    for field, value, low in (("cpu", cpu, 1), ("memory_mb", memory_mb, 64), ("disk_mb", disk_mb, 512)):
        if not isinstance(value, int) or value < low:
            raise InvalidInput(
                _("%(field)s must be an integer of at least %(low)s") % {"field": field, "low": low}, field=field
            )
    if not image or len(image) > 200:
        raise InvalidInput(_("image is required (at most 200 characters)"), field="image")
    if name:
        name = name.strip().lower()
        if not NAME_RE.match(name):
            raise InvalidInput(_("name: lowercase letters, digits and hyphens, at most 63 characters"), field="name")
    else:
        name = f"vps-{secrets.token_hex(4)}"
    provider_id = provider.pk if isinstance(provider, Provider) else provider
    resources.ensure_quota(owner)
    with transaction.atomic():
        quota = UserQuota.objects.select_for_update().get(user=owner)
        provider_row = Provider.objects.select_for_update().filter(pk=provider_id).first()
        if provider_row is None:
            raise InvalidInput(_("no such provider"), field="provider")
        if not provider_row.enabled:
            raise ProviderUnavailable(
                _("provider %(name)s is disabled") % {"name": provider_row.name}, field="provider"
            )
        if instance_type == InstanceType.VM and provider_row.provider_type == "docker":
            raise InvalidInput(_("a Docker provider runs containers only"), field="instance_type")
        if Instance.objects.filter(provider=provider_row, live_name=name).exists():
            raise NameTaken(
                _("an instance named %(name)s already exists on %(provider)s")
                % {"name": name, "provider": provider_row.name},
                field="name",
            )
        resources.check_and_reserve(
            quota, provider_row, instance_type=instance_type, cpu=cpu, memory_mb=memory_mb, disk_mb=disk_mb
        )
        resources.check_ports(quota, provider_row.default_port_block)
        instance = Instance.objects.create(
            owner=owner,
            provider=provider_row,
            name=name,
            live_name=name,
            instance_type=instance_type,
            image=image,
            status=InstanceStatus.CREATING,
            cpu=cpu,
            memory_mb=memory_mb,
            disk_mb=disk_mb,
            bandwidth_mbps=bandwidth_mbps,
            holds_resources=True,
        )
        block = ports.reserve_default_block(provider_row, instance)
        if block:
            instance.ssh_port = block[0].host_port_start
            instance.save(update_fields=["ssh_port"])
        task = _new_task(
            provider=provider_row,
            task_type=TaskType.CREATE,
            instance=instance,
            initiator=initiator,
            timeout_seconds=timeout,
            task_data={
                "image": image,
                "instance_type": instance_type,
                "cpu": cpu,
                "memory_mb": memory_mb,
                "disk_mb": disk_mb,
            },
        )
    return instance, task


@retry_on_deadlock
def request_operation(
    user,
    instance_id,
    task_type: str,
    *,
    admin: bool = False,
    timeout_seconds=None,
    task_data: dict | None = None,
    reason: str = "",
) -> Task:
    """Queue start/stop/restart/reset/reset-password/delete on an instance.

    ``reason`` (the console asks one for delete and reset) is recorded on the task's first event.

    409 instance_busy (with the active task's id) when it already has a pending
    or running task; 409 invalid_state when its status forbids the operation.
    """
    if task_type not in ALLOWED_INSTANCE_STATUS or task_type in (TaskType.CREATE_PORT, TaskType.DELETE_PORT):
        raise InvalidInput(_("unknown operation %(op)r") % {"op": task_type}, field="task_type")
    timeout = validate_timeout(timeout_seconds)
    with sql.atomic():
        provider, instance = _lock_for_new_task(user, instance_id, admin=admin)
        if instance.active_task_id is not None:
            raise InstanceBusy(instance.active_task_id)
        if instance.status not in ALLOWED_INSTANCE_STATUS[task_type]:
            raise InvalidState(
                _("cannot %(op)s an instance that is %(status)s")
                % {"op": word(TaskType, task_type), "status": word(InstanceStatus, instance.status)},
                status=instance.status,
            )
        if task_type in (TaskType.START, TaskType.RESTART) and not admin and traffic_counters.over_limit(instance):
            raise TrafficLimitExceeded(_("the instance has used its monthly traffic"))
        return _new_task(
            provider=provider,
            task_type=task_type,
            instance=instance,
            initiator=user,
            timeout_seconds=timeout,
            task_data=task_data,
            reason=reason,
        )


@retry_on_deadlock
def create_port(
    user,
    instance_id,
    *,
    protocol: str,
    guest_port: int,
    host_port: int | None = None,
    count: int = 1,
    admin: bool = False,
    timeout_seconds=None,
    description: str = "",
) -> tuple[Task, PortMapping]:
    """Queue a new mapping. A user's request must fit their quota's ``max_ports``
    (409 quota_exceeded, resource ``ports``); an operator's may exceed it (as it may
    leave the provider's range), and counts all the same."""
    timeout = validate_timeout(timeout_seconds)
    ports.validate_request(protocol, guest_port, host_port, count)
    try:
        instance_pk = int(instance_id)
    except (TypeError, ValueError):
        raise NotFound(_("no such instance")) from None
    owner_id = visible_instances(user, admin=admin).filter(pk=instance_pk).values_list("owner_id", flat=True).first()
    if owner_id is None:
        raise NotFound(_("no such instance"))
    resources.ensure_quota(owner_id)
    with transaction.atomic():
        # The system's lock order: quota, then provider and instance. The quota lock
        # serialises this user's port requests; the provider lock the port choices.
        quota = UserQuota.objects.select_for_update().get(user_id=owner_id)
        provider, instance = _lock_for_new_task(user, instance_id, admin=admin)
        if instance.active_task_id is not None:
            raise InstanceBusy(instance.active_task_id)
        if instance.status not in ALLOWED_INSTANCE_STATUS[TaskType.CREATE_PORT]:
            raise InvalidState(
                _("cannot add a port to an instance that is %(status)s")
                % {"status": word(InstanceStatus, instance.status)},
                status=instance.status,
            )
        if not admin:
            resources.check_ports(quota, count)
        mapping = ports.reserve(
            provider,
            instance,
            protocol=protocol,
            guest_port=guest_port,
            host_port=host_port,
            count=count,
            description=description,
            restrict_to_range=not admin,
        )
        task = _new_task(
            provider=provider,
            task_type=TaskType.CREATE_PORT,
            instance=instance,
            initiator=user,
            timeout_seconds=timeout,
            task_data={"port_mapping": mapping.pk},
            port_mapping=mapping,
        )
    return task, mapping


@retry_on_deadlock
def delete_port(user, instance_id, port_id, *, admin: bool = False, timeout_seconds=None) -> Task:
    timeout = validate_timeout(timeout_seconds)
    with transaction.atomic():
        provider, instance = _lock_for_new_task(user, instance_id, admin=admin)
        mapping = PortMapping.objects.filter(pk=port_id, instance=instance).first()
        if mapping is None or mapping.status not in (PortMapping.STATUS_ACTIVE, PortMapping.STATUS_FAILED):
            raise NotFound(_("no such port mapping"))
        if instance.active_task_id is not None:
            raise InstanceBusy(instance.active_task_id)
        if instance.status not in ALLOWED_INSTANCE_STATUS[TaskType.DELETE_PORT]:
            raise InvalidState(
                _("cannot remove a port of an instance that is %(status)s")
                % {"status": word(InstanceStatus, instance.status)},
                status=instance.status,
            )
        return _new_task(
            provider=provider,
            task_type=TaskType.DELETE_PORT,
            instance=instance,
            initiator=user,
            timeout_seconds=timeout,
            task_data={"port_mapping": mapping.pk},
            port_mapping=mapping,
        )


def visible_tasks(user, *, admin: bool = False):
    qs = Task.objects.all()
    return qs if admin else qs.filter(owner=user)


def user_may_cancel(task: Task) -> bool:
    """Users cancel their own pending tasks, and running ones except a delete in flight.

    Never a task an operator queued on their instance (initiator other than the
    owner): the operator's decision stands (OneClickVirt refuses this too).
    """
    if task.initiator_id is not None and task.initiator_id != task.owner_id:
        return False
    if task.status == PENDING:
        return True
    return task.status == RUNNING and task.task_type != TaskType.DELETE


def cancel_task(user, task_id, *, admin: bool = False, reason: str = "") -> Task:
    """Users: their own tasks as user_may_cancel says; admins: any non-terminal task.

    An admin cancel of a task already ``cancelling`` changes nothing and answers
    with the task (the cancel is under way; force-stop ends it at once): admins
    may cancel anything non-terminal, so only a terminal task is a conflict.
    """
    task = visible_tasks(user, admin=admin).filter(pk=task_id).first()
    if task is None:
        raise NotFound(_("no such task"))
    if admin and task.status == CANCELLING:
        return task
    if task.status not in CANCELLABLE or (not admin and not user_may_cancel(task)):
        if not admin and task.status in CANCELLABLE and task.initiator_id != task.owner_id:
            raise NotCancellable(
                _("this %(type)s was queued by an operator; only an operator can cancel it")
                % {"type": word(TaskType, task.task_type)},
                status=task.status,
            )
        raise NotCancellable(
            _("a %(status)s %(type)s task cannot be cancelled")
            % {"status": word(TaskStatus, task.status), "type": word(TaskType, task.task_type)},
            status=task.status,
        )
    reason = (reason or "").strip()
    if admin and not reason and user.pk != task.owner_id:
        raise InvalidInput(_("an administrator's cancel needs a reason"), field="reason")
    by_admin = admin and user.pk != task.owner_id
    if not transitions.request_cancel(task.pk, actor=actor_of(user, admin=by_admin), reason=reason, by_admin=by_admin):
        task.refresh_from_db()
        if admin and task.status == CANCELLING:  # someone else's cancel got there first
            return task
        raise NotCancellable(
            _("the task is %(status)s and can no longer be cancelled") % {"status": word(TaskStatus, task.status)},
            status=task.status,
        )
    task.refresh_from_db()
    return task


def force_stop_task(user, task_id, *, reason: str) -> Task:
    reason = (reason or "").strip()
    if not reason:
        raise InvalidInput(_("force-stop needs a reason"), field="reason")
    task = Task.objects.filter(pk=task_id).first()
    if task is None:
        raise NotFound(_("no such task"))
    if task.status in FINAL or not transitions.force_stop(task.pk, actor=actor_of(user, admin=True), reason=reason):
        task.refresh_from_db()
        raise NotCancellable(
            _("the task is %(status)s; nothing to stop") % {"status": word(TaskStatus, task.status)},
            status=task.status,
        )
    task.refresh_from_db()
    return task


RETRYABLE = frozenset({FAILED, TIMEOUT, CANCELLED})
CREATE_PARAMETERS = ("image", "instance_type", "cpu", "memory_mb", "disk_mb")


def retry_task(user, task_id, *, admin: bool = False) -> Task:
    """Ask a failed, timed-out or cancelled task again: a new task of the same type on the
    same instance with the same parameters, ``retry_of`` naming the old one.

    409 not_retryable when the task completed, is still active, or its instance (or
    port mapping) is gone; instance_busy / invalid_state as for a new request.
    """
    old = visible_tasks(user, admin=admin).select_related("instance", "port_mapping").filter(pk=task_id).first()
    if old is None:
        raise NotFound(_("no such task"))
    if old.status not in RETRYABLE:
        if old.status == COMPLETED:
            raise NotRetryable(_("a completed task cannot be retried"), status=old.status)
        raise NotRetryable(
            _("a %(status)s task cannot be retried (still active)") % {"status": word(TaskStatus, old.status)},
            status=old.status,
        )
    instance = old.instance
    if instance is None or instance.status in INSTANCE_GONE:
        raise NotRetryable(_("its instance is gone; create a new one"), status=old.status)
    timeout = old.timeout_seconds
    with transaction.atomic():
        if old.task_type == TaskType.CREATE:
            new = _retry_create(user, old, admin=admin)
        elif old.task_type == TaskType.CREATE_PORT:
            mapping = old.port_mapping
            if mapping is None:
                raise NotRetryable(_("its port mapping is gone"), status=old.status)
            new, _mapping = create_port(
                user,
                instance.pk,
                protocol=mapping.protocol,
                guest_port=mapping.guest_port_start,
                host_port=mapping.host_port_start,
                count=mapping.host_port_end - mapping.host_port_start + 1,
                description=mapping.description,
                admin=admin,
                timeout_seconds=timeout,
            )
        elif old.task_type == TaskType.DELETE_PORT:
            if old.port_mapping_id is None:
                raise NotRetryable(_("its port mapping is gone"), status=old.status)
            try:
                new = delete_port(user, instance.pk, old.port_mapping_id, admin=admin, timeout_seconds=timeout)
            except NotFound:
                raise NotRetryable(_("its port mapping is gone"), status=old.status) from None
        else:
            new = request_operation(user, instance.pk, old.task_type, admin=admin, timeout_seconds=timeout)
        Task.objects.filter(pk=new.pk).update(retry_of=old)
        new.retry_of = old
    logger.info("task %s: retry of task %s by %s", new.pk, old.pk, user)
    return new


def _retry_create(user, old: Task, *, admin: bool) -> Task:
    """A create whose guest may still exist (the instance holds its resources): run it again;
    creates converge on the deterministic guest name. A create that released everything
    (the instance failed or was deleted) is refused by the caller."""
    provider, instance = _lock_for_new_task(user, old.instance_id, admin=admin)
    if instance.active_task_id is not None:
        raise InstanceBusy(instance.active_task_id)
    if instance.status in INSTANCE_GONE or not instance.holds_resources:
        raise NotRetryable("its instance is gone; create a new one", status=old.status)
    return _new_task(
        provider=provider,
        task_type=TaskType.CREATE,
        instance=instance,
        initiator=user,
        timeout_seconds=old.timeout_seconds,
        task_data={k: old.task_data[k] for k in CREATE_PARAMETERS if k in old.task_data},
    )


def read_password_once(user, task_id) -> str:
    """The password a create/reset-password task produced, to its owner, once."""
    from tasks import crypto
    from tasks.errors import Gone
    from tasks.models import TaskSecret

    task = Task.objects.filter(pk=task_id, owner=user).first()
    if task is None:
        raise NotFound(_("no such task"))
    secret = TaskSecret.objects.filter(task=task).first()
    now = timezone.now()
    if secret is None:
        if task.status in FINAL:
            raise Gone(_("this task produced no password"))
        raise InvalidState(_("the task has not finished yet"), status=task.status)
    if not secret.ciphertext or secret.expires_at <= now:
        raise Gone(_("the password was already read or has expired"))
    # Compare-and-set: of two concurrent reads only one gets the password.
    won = TaskSecret.objects.filter(pk=secret.pk, read_at__isnull=True, ciphertext=secret.ciphertext).update(
        ciphertext="", read_at=now
    )
    if won != 1:
        raise Gone(_("the password was already read"))
    return crypto.decrypt(secret.ciphertext)
