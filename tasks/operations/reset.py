"""reset: reinstall the guest from its image, keeping the instance row, its
ports, its quota and its name; a new root password is set and shown once.

Steps (progress): traffic counters 5, rebuild 10-60, start 60-75, root
password 75-82, re-apply the active port mappings 82-92 (idempotent: kept ones
are no-ops), read the addresses 95.
Failure or cancel: the instance still exists, marked ``error`` (its disk may be
half rebuilt); nothing is released. A new reset (or a delete) is the way out.
"""

from __future__ import annotations

from tasks import crypto, traffic
from tasks.engine.states import InstanceStatus, TaskType
from tasks.models import PortMapping
from tasks.operations import register
from tasks.operations.base import ExecutionContext
from tasks.operations.steps import (
    GuestOperation,
    Steps,
    guest_ref,
    guest_spec,
    port_specs,
    record_addresses,
    status_of,
)


class ResetOperation(GuestOperation):
    task_type = TaskType.RESET
    success_status = InstanceStatus.RUNNING

    def steps(self, ctx: ExecutionContext, steps: Steps) -> None:
        instance, driver = ctx.instance, ctx.driver
        ref = guest_ref(instance)
        image = str(ctx.data.get("image") or instance.image)
        password = crypto.generate_password()
        mappings = list(PortMapping.objects.filter(instance=instance, status=PortMapping.STATUS_ACTIVE))
        steps.sync_traffic(traffic.BEFORE_RESET, 5)
        spec = guest_spec(instance, image=image)
        new_ref = steps.call(
            "reinstalling from the image", lambda p: driver.rebuild(ref, spec, ctx.cancel, p), 10, 60, once="rebuild"
        )
        ref = {**ref, **(new_ref or {})}
        ctx.result["provider_ref"] = ref
        steps.call("starting the guest", lambda p: driver.start(ref, ctx.cancel, p), 60, 75)
        steps.call("setting the root password", lambda p: driver.set_password(ref, password, ctx.cancel, p), 75, 82)
        specs = [spec for mapping in mappings for spec in port_specs(mapping)]
        for i, port in enumerate(specs):
            lo = 82 + 10 * i // max(1, len(specs))
            hi = 82 + 10 * (i + 1) // max(1, len(specs))
            steps.call(
                f"restoring host port {port.handle}",
                lambda p, port=port: driver.add_port(ref, port, ctx.cancel, p),
                lo,
                hi,
            )
        steps.step(95, "reading the addresses")
        state = steps.read_state()
        record_addresses(ctx, state)
        ctx.instance_status = status_of(state)
        if image != instance.image:
            ctx.result["image"] = image
        ctx.secret = password
        steps.step(100, "reset")

    def after_failure(self, ctx: ExecutionContext, steps: Steps, exc: Exception) -> bool:
        ctx.result.pop("addresses", None)
        ctx.secret = None
        ctx.instance_status = InstanceStatus.ERROR
        return False


register(ResetOperation())
