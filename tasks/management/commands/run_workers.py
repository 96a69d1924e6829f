"""Start and supervise the worker tier of this machine (one pool for every provider queue it serves)."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from tasks.engine.supervisor import AlreadyRunning, Supervisor


class Command(BaseCommand):
    help = (
        "Run this machine's worker pool: one django-q2 cluster serving every provider queue, grown while "
        "jobs wait and shrunk when idle; follow provider changes, sweep (recovery, re-dispatch, admission), "
        "and drain gracefully on SIGTERM/SIGINT."
    )

    def add_arguments(self, parser):
        parser.add_argument("--no-sweep", action="store_true", help="leave recovery and polling to other machines")
        parser.add_argument(
            "--no-maintenance", action="store_true", help="do not run django-q2's schedules on this machine"
        )

    def handle(self, *args, **options):
        try:
            Supervisor(sweep=not options["no_sweep"], scheduler=not options["no_maintenance"]).run()
        except AlreadyRunning as exc:
            raise CommandError(str(exc)) from None
