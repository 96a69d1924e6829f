"""Deliver webhooks: what the worker tier's thread does, as a command (cron, tests, a machine of its own)."""

from __future__ import annotations

import signal

from django.core.management.base import BaseCommand

from tasks import webhooks


class Command(BaseCommand):
    help = "Turn new task events into webhook deliveries and send the due ones (--once: one round)."

    def add_arguments(self, parser):
        parser.add_argument("--once", action="store_true", help="one round, then exit")

    def handle(self, *args, once: bool = False, **options):
        if once:
            written, attempted = webhooks.run_once()
            self.stdout.write(f"{written} delivery(ies) queued, {attempted} attempt(s) made")
            return
        stop = {"now": False}

        def on_signal(signum, frame):
            stop["now"] = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        webhooks.run_forever(lambda: stop["now"])
