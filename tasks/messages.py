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
        re.compile(r"^(?P<what>.+): provider error, retry (?P<n>\d+) of (?P<m>\d+)$"),
        gettext_noop("%(what)s: provider error, retry %(n)s of %(m)s"),
    ),
    (re.compile(r"^downloading image (?P<image>\S+)$"), gettext_noop("downloading image %(image)s")),
    (re.compile(r"^mapping (?P<port>\S+)$"), gettext_noop("mapping %(port)s")),
    (re.compile(r"^unmapping (?P<port>\S+)$"), gettext_noop("unmapping %(port)s")),
    (re.compile(r"^mapped (?P<mapping>.+)$"), gettext_noop("mapped %(mapping)s")),
    (re.compile(r"^unmapped (?P<mapping>.+)$"), gettext_noop("unmapped %(mapping)s")),
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
