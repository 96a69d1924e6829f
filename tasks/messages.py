"""Step, status and engine messages: stored in English, shown in the reader's language.

Workers write a task's ``status_message``, its step events' ``message`` and the
engine's ``error_message`` in English (they run with no request, and a row is
read by people with different languages). Whatever shows them, the API's
serializers and the admin, passes them through ``translate``: an exact message
is looked up in the catalog, a message with figures in it (a retry count, a
port) is matched against ``PATTERNS`` and its template translated. Anything
else (a provider's own error text) is shown as it was written.

To add a message: write it in English where it is produced, and list it here
(``MESSAGES`` or ``PATTERNS``) so makemessages extracts it; then translate it
in locale/zh_Hans/LC_MESSAGES/django.po (README "Languages").
"""

from __future__ import annotations

import re

from django.utils.translation import gettext, gettext_noop

# Exact messages: the operations' steps (tasks/operations), the simulated
# provider's progress (providers/simulated) and the engine's.
MESSAGES = (
    # engine (tasks/services.py, tasks/engine)
    gettext_noop("queued"),
    gettext_noop("waiting for a worker"),
    gettext_noop("started"),
    gettext_noop("cancel requested"),
    gettext_noop("force-stopped"),
    gettext_noop("the worker running this task stopped renewing its lease"),
    gettext_noop("timed out and the worker did not stop; lease revoked"),
    gettext_noop("handed back at shutdown"),
    gettext_noop("handed back"),
    gettext_noop("cancelled; its worker was lost while stopping"),
    # operations
    gettext_noop("preparing"),
    gettext_noop("reserving the guest id"),
    gettext_noop("creating the guest"),
    gettext_noop("starting the guest"),
    gettext_noop("stopping the guest"),
    gettext_noop("restarting the guest"),
    gettext_noop("deleting the guest"),
    gettext_noop("setting the root password"),
    gettext_noop("generating a new password"),
    gettext_noop("password changed"),
    gettext_noop("reading the addresses"),
    gettext_noop("reading the guest's state"),
    gettext_noop("verifying the guest is gone"),
    gettext_noop("reinstalling from the image"),
    gettext_noop("removing the partly created guest"),
    gettext_noop("syncing traffic counters"),
    gettext_noop("created"),
    gettext_noop("running"),
    gettext_noop("stopped"),
    gettext_noop("deleted"),
    gettext_noop("reset"),
    gettext_noop("done"),
    # the LXD/Incus, Proxmox VE and Docker drivers (providers/)
    gettext_noop("already gone (the name now belongs to another container)"),
    gettext_noop("applying the password through the guest agent"),
    gettext_noop("container created"),
    gettext_noop("container exists"),
    gettext_noop("creating the container"),
    gettext_noop("creating the new container"),
    gettext_noop("destroying the old guest"),
    gettext_noop("graceful restart failed; forcing"),
    gettext_noop("graceful shutdown failed; forcing"),
    gettext_noop("instance already exists"),
    gettext_noop("looking for an existing container"),
    gettext_noop("looking for an existing guest"),
    gettext_noop("password set (applies at the next start)"),
    gettext_noop("password set"),
    gettext_noop("port mapping added"),
    gettext_noop("port mapping already absent"),
    gettext_noop("port mapping already present"),
    gettext_noop("port mapping removed"),
    gettext_noop("rebuilt"),
    gettext_noop("removing the old container"),
    gettext_noop("restarted"),
    gettext_noop("running chpasswd in the container"),
    gettext_noop("running chpasswd"),
    gettext_noop("saving the container's filesystem"),
    gettext_noop("setting the password with pct exec"),
    gettext_noop("starting the new container"),
    gettext_noop("stopping the container"),
    gettext_noop("storing the password in cloud-init"),
    # the simulated provider
    gettext_noop("guest already exists"),
    gettext_noop("already running"),
    gettext_noop("already stopped"),
    gettext_noop("already gone"),
    gettext_noop("unpacking the root filesystem"),
    gettext_noop("configuring limits and network"),
    gettext_noop("booting"),
    gettext_noop("shutting down"),
    gettext_noop("forcing the stop"),
    gettext_noop("removing the guest"),
)

# Messages with figures: (the English message as a pattern, its template).
# Named groups fill the template; a group named "what" is itself translated.
PATTERNS = (
    (
        # with the provider's short error (tasks/operations/steps.py Steps.call), shown as it is
        re.compile(r"^(?P<what>.+?): provider error, retry (?P<n>\d+) of (?P<m>\d+) \((?P<error>.*)\)$", re.S),
        gettext_noop("%(what)s: provider error, retry %(n)s of %(m)s (%(error)s)"),
    ),
    (
        re.compile(r"^(?P<what>.+): provider error, retry (?P<n>\d+) of (?P<m>\d+)$"),
        gettext_noop("%(what)s: provider error, retry %(n)s of %(m)s"),
    ),
    (re.compile(r"^(?P<what>.+): done by an earlier attempt$"), gettext_noop("%(what)s: done by an earlier attempt")),
    (
        re.compile(r"^reconciled with the provider: instance (?P<before>\S+) -> (?P<after>\S+) \(guest not found\)$"),
        gettext_noop("reconciled with the provider: instance %(before)s -> %(after)s (guest not found)"),
    ),
    (
        re.compile(r"^reconciled with the provider: instance (?P<before>\S+) -> (?P<after>\S+)$"),
        gettext_noop("reconciled with the provider: instance %(before)s -> %(after)s"),
    ),
    (re.compile(r"^downloading image (?P<image>\S+)$"), gettext_noop("downloading image %(image)s")),
    (
        re.compile(r"^host port (?P<ports>[\d,]+) is in use on the host; trying the block from port (?P<start>\d+)$"),
        gettext_noop("host port %(ports)s is in use on the host; trying the block from port %(start)s"),
    ),
    (re.compile(r"^mapping (?P<port>\S+)$"), gettext_noop("mapping %(port)s")),
    (re.compile(r"^unmapping (?P<port>\S+)$"), gettext_noop("unmapping %(port)s")),
    (re.compile(r"^mapped (?P<mapping>.+)$"), gettext_noop("mapped %(mapping)s")),
    (re.compile(r"^unmapped (?P<mapping>.+)$"), gettext_noop("unmapped %(mapping)s")),
    # the drivers' progress messages with names and figures
    (re.compile(r"^adding (?P<port>\S+)$"), gettext_noop("adding %(port)s")),
    (re.compile(r"^removing (?P<port>\S+/\S+)$"), gettext_noop("removing %(port)s")),
    (re.compile(r"^(?P<port>\S+/\S+) published$"), gettext_noop("%(port)s published")),
    (re.compile(r"^(?P<port>\S+/\S+) removed$"), gettext_noop("%(port)s removed")),
    (re.compile(r"^created (?P<name>\S+)$"), gettext_noop("created %(name)s")),
    (re.compile(r"^creating (?P<name>\S+) from (?P<image>\S+)$"), gettext_noop("creating %(name)s from %(image)s")),
    (re.compile(r"^creating (?P<kind>\S+) (?P<vmid>\d+)$"), gettext_noop("creating %(kind)s %(vmid)s")),
    (re.compile(r"^(?P<kind>\S+) (?P<vmid>\d+) created$"), gettext_noop("%(kind)s %(vmid)s created")),
    (re.compile(r"^(?P<kind>\S+) (?P<vmid>\d+) exists$"), gettext_noop("%(kind)s %(vmid)s exists")),
    (re.compile(r"^rebuilding (?P<name>\S+) from (?P<image>\S+)$"), gettext_noop("rebuilding %(name)s from %(image)s")),
    (re.compile(r"^deleting (?P<name>\S+) to reinstall it$"), gettext_noop("deleting %(name)s to reinstall it")),
    (re.compile(r"^deleting (?P<name>\S+)$"), gettext_noop("deleting %(name)s")),
    (re.compile(r"^starting (?P<name>\S+)$"), gettext_noop("starting %(name)s")),
    (re.compile(r"^stopping (?P<name>\S+)$"), gettext_noop("stopping %(name)s")),
    (re.compile(r"^restarting (?P<name>\S+)$"), gettext_noop("restarting %(name)s")),
    (
        re.compile(r"^shutting (?P<name>\S+) down \(up to (?P<n>\d+)s\)$"),
        gettext_noop("shutting %(name)s down (up to %(n)ss)"),
    ),
    (
        re.compile(r"^stopping \(up to (?P<n>\d+) s, then killed\)$"),
        gettext_noop("stopping (up to %(n)s s, then killed)"),
    ),
    (re.compile(r"^image (?P<image>\S+) present$"), gettext_noop("image %(image)s present")),
    (re.compile(r"^pulled (?P<image>\S+)$"), gettext_noop("pulled %(image)s")),
    (re.compile(r"^pulling (?P<image>\S+): (?P<pct>\d+)%$"), gettext_noop("pulling %(image)s: %(pct)s%%")),
    (re.compile(r"^pulling (?P<image>\S+)$"), gettext_noop("pulling %(image)s")),
    (
        re.compile(r"^resumed after worker (?P<worker>\S+) was lost$"),
        gettext_noop("resumed after worker %(worker)s was lost"),
    ),
    (
        re.compile(r"^the worker running this task stopped renewing its lease \((?P<n>\d+) of (?P<m>\d+) attempts\)$"),
        gettext_noop("the worker running this task stopped renewing its lease (%(n)s of %(m)s attempts)"),
    ),
    (
        re.compile(r"^timed out after (?P<n>\d+) s; the worker did not stop and was killed$"),
        gettext_noop("timed out after %(n)s s; the worker did not stop and was killed"),
    ),
)


def translate(message: str | None) -> str:
    """``message`` in the active language, when the catalog knows it (else as it is)."""
    if not message:
        return message or ""
    translated = gettext(message)
    if translated != message:
        return translated
    for pattern, template in PATTERNS:
        match = pattern.match(message)
        if match is not None:
            values = match.groupdict()
            if "what" in values:
                values["what"] = translate(values["what"])
            return gettext(template) % values
    return message
