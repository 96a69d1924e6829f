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

from django.utils.translation import gettext
from django.utils.translation import gettext_noop as N

# Exact messages: the operations' steps (tasks/operations), the simulated
# provider's progress (providers/simulated) and the engine's.
MESSAGES = (
    # engine (tasks/services.py, tasks/engine)
    N("queued"),
    N("waiting for a worker"),
    N("started"),
    N("cancel requested"),
    N("force-stopped"),
    N("the worker running this task stopped renewing its lease"),
    N("timed out and the worker did not stop; lease revoked"),
    # operations
    N("preparing"),
    N("reserving the guest id"),
    N("creating the guest"),
    N("starting the guest"),
    N("stopping the guest"),
    N("restarting the guest"),
    N("deleting the guest"),
    N("setting the root password"),
    N("generating a new password"),
    N("password changed"),
    N("reading the addresses"),
    N("reading the guest's state"),
    N("verifying the guest is gone"),
    N("reinstalling from the image"),
    N("removing the partly created guest"),
    N("syncing traffic counters"),
    N("created"),
    N("running"),
    N("stopped"),
    N("deleted"),
    N("reset"),
    # the simulated provider
    N("guest already exists"),
    N("already running"),
    N("already stopped"),
    N("already gone"),
    N("unpacking the root filesystem"),
    N("configuring limits and network"),
    N("booting"),
    N("shutting down"),
    N("forcing the stop"),
    N("removing the guest"),
)

# Messages with figures: (the English message as a pattern, its template).
# Named groups fill the template; a group named "what" is itself translated.
PATTERNS = (
    (
        re.compile(r"^(?P<what>.+): provider error, retry (?P<n>\d+) of (?P<m>\d+)$"),
        N("%(what)s: provider error, retry %(n)s of %(m)s"),
    ),
    (re.compile(r"^downloading image (?P<image>\S+)$"), N("downloading image %(image)s")),
    (re.compile(r"^mapping (?P<port>\S+)$"), N("mapping %(port)s")),
    (re.compile(r"^unmapping (?P<port>\S+)$"), N("unmapping %(port)s")),
    (re.compile(r"^mapped (?P<mapping>.+)$"), N("mapped %(mapping)s")),
    (re.compile(r"^unmapped (?P<mapping>.+)$"), N("unmapped %(mapping)s")),
    (
        re.compile(r"^timed out after (?P<n>\d+) s; the worker did not stop and was killed$"),
        N("timed out after %(n)s s; the worker did not stop and was killed"),
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
