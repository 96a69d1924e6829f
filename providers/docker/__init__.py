"""Docker driver: containers over the Docker Engine API (docker-py's low-level APIClient).

The Engine API is synchronous except for image pulls, which stream NDJSON
progress; we sum ``progressDetail`` per layer into the progress callback and
check the cancel token per chunk (a watcher thread shuts the socket down when
the token fires while the stream is silent). ``stop`` and ``restart`` block on
the daemon and cannot be aborted there; on cancel we stop waiting for them.

Published ports are fixed when a container is created: create publishes the
guest's port block then (``GuestSpec.ports``), so a create is one container and
no swap. A later port change recreates the container: stop, commit its filesystem to
``cloudhost-state/<name>:current`` (so the root password, installed packages
and everything else in the writable layer survive), rename it aside, create
the new one with the same settings and the new bindings, start it, and only
then remove the old one. ``/data`` is a named volume and is carried over as is.
A crash mid-swap is repaired by the next operation on the container (the one
renamed aside is the truth); a failure or cancel at any step, the stop
included, brings the old container back as it was. Reset (rebuild) uses the same swap with the new
image and a fresh volume: a reinstall starts clean.

The API version is negotiated at the first call (Debian's Docker 20.10 and
Podman 4.3 speak 1.41 at most). Podman, through its Docker API, is served too.

Connection settings and secrets: docs/providers-proxmox-docker.md.
"""

from providers.docker.driver import DockerDriver
from providers.docker.engine import classify
from providers.docker.swap import ports_from_bindings

__all__ = ["DockerDriver", "classify", "ports_from_bindings"]
