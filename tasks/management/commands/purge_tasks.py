"""Delete finished tasks (and their events) older than N days, in bounded batches."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from tasks.engine.states import FINAL
from tasks.purge import purge


class Command(BaseCommand):
    help = (
        "Delete terminal tasks completed more than --older-than days ago, with their events, in batches "
        "(each a short transaction). Schedulable through django-q2: func tasks.purge.purge_job, args e.g. 90."
    )

    def add_arguments(self, parser):
        parser.add_argument("--older-than", type=float, required=True, metavar="DAYS")
        parser.add_argument("--status", default="", help=f"comma list among {', '.join(sorted(FINAL))} (default: all)")
        parser.add_argument("--batch-size", type=int, default=1000)
        parser.add_argument("--dry-run", action="store_true")

    def handle(self, *args, **options):
        days = options["older_than"]
        if days < 0:
            raise CommandError("--older-than must be zero or more days")
        statuses = [s.strip() for s in options["status"].split(",") if s.strip()]
        unknown = [s for s in statuses if s not in FINAL]
        if unknown:
            raise CommandError(f"--status: {', '.join(unknown)} not terminal; choose among {', '.join(sorted(FINAL))}")
        if not 1 <= options["batch_size"] <= 50_000:
            raise CommandError("--batch-size must be between 1 and 50000")
        n = purge(days, statuses or None, batch_size=options["batch_size"], dry_run=options["dry_run"])
        verb = "would delete" if options["dry_run"] else "deleted"
        self.stdout.write(f"{verb} {n} task(s) finished more than {days:g} day(s) ago")
