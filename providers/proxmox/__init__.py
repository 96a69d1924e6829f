"""Proxmox VE driver: qemu VMs and LXC containers over the PVE API (proxmoxer, API token).

Long work on PVE is a worker task named by a UPID. Every mutation returns one;
we poll ``/nodes/<node>/tasks/<upid>/status`` in slices of ``poll_interval``
seconds, so a cancel or a deadline is noticed within one slice. On cancel we
stop the remote task (``DELETE /nodes/<node>/tasks/<upid>``) and raise
OperationCancelled. A task succeeded when it stopped with exitstatus ``OK`` or
``WARNINGS: n`` (PVE::UPID::status_is_error).

Guests are found again by VMID *and* name: the VMID is reserved before the
create call (``reserve`` or inside ``create``) and travels in the ref, the name
(vps-<uuid>) proves the guest under that VMID is ours. Root passwords of VMs go
through cloud-init (and the guest agent when it runs); containers and NAT port
mappings have no API and go through the node's shell (providers.hostshell).

Connection settings (Provider.connection) and secrets: docs/providers-proxmox-docker.md.
"""

from providers.proxmox.api import classify
from providers.proxmox.driver import ProxmoxDriver

__all__ = ["ProxmoxDriver", "classify"]
