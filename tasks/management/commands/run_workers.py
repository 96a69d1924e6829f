"""Start and supervise the worker tier of this machine (all enabled providers)."""

from __future__ import annotations

from django.core.management.base import BaseCommand

from tasks.engine.supervisor import Supervisor


class Command(BaseCommand):
    help = (
        "Run one django-q2 cluster per provider queue (workers = the provider's limit), follow provider "
        "changes, sweep (recovery, re-dispatch, admission), and drain gracefully on SIGTERM/SIGINT."
    )

    def add_arguments(self, parser):
        parser.add_argument("--no-sweep", action="store_true", help="leave recovery and polling to other machines")
        parser.add_argument("--no-maintenance", action="store_true", help="do not run the schedule cluster")

    def handle(self, *args, **options):
        Supervisor(sweep=not options["no_sweep"], maintenance_cluster=not options["no_maintenance"]).run()
