"""Compare quota and capacity counters and port allocations with the live instances."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from tasks import accounting


class Command(BaseCommand):
    help = (
        "Compare every user's quota usage and every provider's capacity usage with what live instances "
        "and pending creates hold, and check port mappings (no stray or overlapping ones). Prints every "
        "difference and exits 1 when there is one. --fix corrects counters, flags and stray mappings "
        "under the quota and provider locks; overlaps are only reported."
    )

    def add_arguments(self, parser):
        parser.add_argument("--fix", action="store_true", help="correct what can be corrected")

    def handle(self, *args, **options):
        if options["fix"]:
            found = accounting.fix()
            for diff in found:
                verb = "fixed" if diff.fixable else "NOT fixable"
                self.stdout.write(f"{verb}: {diff}")
            remaining = accounting.find_differences()
            for diff in remaining:
                self.stdout.write(f"remaining: {diff}")
            if remaining:
                raise CommandError(f"{len(remaining)} difference(s) remain after --fix", returncode=1)
            fixed = sum(d.fixable for d in found)
            self.stdout.write(self.style.SUCCESS(f"accounting consistent ({fixed} difference(s) fixed)"))
            return
        found = accounting.find_differences()
        for diff in found:
            self.stdout.write(str(diff))
        if found:
            raise CommandError(f"{len(found)} difference(s); run with --fix to correct the counters", returncode=1)
        self.stdout.write(self.style.SUCCESS("accounting consistent: no differences"))
