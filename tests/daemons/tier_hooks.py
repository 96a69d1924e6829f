"""Loaded into a worker tier of the daemons suite (TASK_EXTRA_OPERATIONS), never in production.

With DAEMONS_HOLD_AFTER_PASSWORD=1 every driver's set_password, once the password is
set on the real guest, reports the step and then waits on the task's own cancel token:
the test's cancel arrives in the middle of a create that a real worker runs.
"""

from __future__ import annotations

import importlib
import os

from providers.base import DRIVERS

HELD = "password set; held for the test"

if os.environ.get("DAEMONS_HOLD_AFTER_PASSWORD") == "1":
    for provider_type in ("docker", "lxd", "incus"):
        module, name = DRIVERS[provider_type]
        cls = getattr(importlib.import_module(module), name)

        def held(self, ref, password, cancel, progress, _original=cls.set_password):
            _original(self, ref, password, cancel, progress)
            progress(100, HELD)
            cancel.sleep(60)

        cls.set_password = held
