"""Create demo data: an admin, a user, a simulated provider and a few instances."""

from __future__ import annotations

import os
import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from tasks import services
from tasks.models import Instance, Provider, ProviderType


class Command(BaseCommand):
    help = "Create a demo admin (password printed once or from DEMO_ADMIN_PASSWORD), a demo user, a simulated provider and instances."

    def add_arguments(self, parser):
        parser.add_argument("--instances", type=int, default=3, help="instances to create for the demo user")

    def handle(self, *args, **options):
        User = get_user_model()
        created = []
        for username, staff, env in (("admin", True, "DEMO_ADMIN_PASSWORD"), ("demo", False, "DEMO_USER_PASSWORD")):
            user = User.objects.filter(username=username).first()
            if user is None:
                password = os.environ.get(env) or secrets.token_urlsafe(12)
                user = User.objects.create_user(
                    username, f"{username}@example.com", password, is_staff=staff, is_superuser=staff
                )
                created.append((username, password, env))
        with transaction.atomic():
            provider, new = Provider.objects.get_or_create(
                name="sim-local",
                defaults={
                    "provider_type": ProviderType.SIMULATED,
                    "allow_concurrent_tasks": True,
                    "max_concurrent_tasks": 2,
                    # Traffic counters from the simulated host's pmacct (tasks/traffic_counters.py).
                    "connection": {"traffic": "pmacct"},
                },
            )
        demo = User.objects.get(username="demo")
        have = Instance.objects.filter(owner=demo).count()
        for i in range(have, options["instances"]):
            services.create_instance(
                demo, provider=provider, image="debian/12", name=f"demo-{i + 1}", cpu=1, memory_mb=1024, disk_mb=10240
            )
        for username, password, env in created:
            shown = f"(from ${env})" if os.environ.get(env) else password
            self.stdout.write(f"created user {username!r} password: {shown}")
        self.stdout.write(
            f"provider {provider.name!r} ({'created' if new else 'exists'}), "
            f"{Instance.objects.filter(owner=demo).count()} demo instance(s)"
        )
