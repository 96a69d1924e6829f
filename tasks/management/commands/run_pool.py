"""One cluster of this machine's worker pool (started by run_workers, not by hand)."""

from __future__ import annotations

from django.core.management.base import BaseCommand

from tasks.engine import pool


class Command(BaseCommand):
    help = "Run one django-q2 cluster of the worker pool (run_workers starts these; see tasks/engine/pool.py)."

    def handle(self, *args, **options):
        pool.run()
