"""Run the recovery and timeout sweep once (cron, or by hand)."""

from __future__ import annotations

from django.core.management.base import BaseCommand

from tasks.engine import maintenance


class Command(BaseCommand):
    help = (
        "Recover tasks whose worker died (expired lease -> resumed, after TASK_MAX_ATTEMPTS failed/worker_lost, "
        "or timeout past the deadline), "
        "end tasks running far past their timeout, re-send lost jobs, admit pending tasks. "
        "One line per task changed, then a summary."
    )

    def add_arguments(self, parser):
        parser.add_argument("--dry-run", action="store_true", help="show what would change, change nothing")

    def handle(self, *args, **options):
        dry = options["dry_run"]
        report = maintenance.sweep(dry_run=dry)
        for line in report.changes:
            self.stdout.write(line)
        verb = "would change" if dry else "changed"
        self.stdout.write(
            f"{verb} {len(report.changes)}: recovered {report.recovered}, timed out {report.timed_out}, "
            f"re-dispatched {report.redispatched}, admitted {report.admitted}, reconciled {report.reconciled}, "
            f"providers resumed {report.resumed}"
        )
