"""Connect to one provider, print its server version and what its driver can do.

Exits 0 when the provider answers and trusts us; otherwise exits non-zero with
one line saying why (unknown id, bad settings, unreachable, refused). A provider
held as unreachable (tasks.engine.health) that answers has its queue resumed.
"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from providers.base import AuthError, ProviderError, RetryableError, UnsupportedError, build_driver
from tasks.engine import health
from tasks.engine.worker import provider_config
from tasks.models import Provider


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


class Command(BaseCommand):
    help = "Check that a provider is reachable with its stored settings: print its version and capabilities."

    def add_arguments(self, parser):
        parser.add_argument("provider_id", type=int, help="id of the Provider row")

    def handle(self, *args, **options):
        pid = options["provider_id"]
        provider = Provider.objects.filter(pk=pid).first()
        if provider is None:
            raise CommandError(f"no provider with id {pid}")
        label = f"provider {provider.pk} {provider.name!r} ({provider.provider_type})"
        try:
            config = provider_config(provider)
        except ValueError as exc:  # secrets that do not decrypt with this SECRETS_KEY
            raise CommandError(f"{label}: cannot read its secrets: {exc}") from None
        try:
            driver = build_driver(config)
            info = driver.server_info()
            caps = driver.capabilities()
        except AuthError as exc:
            raise CommandError(f"{label}: authentication refused: {exc.message}") from None
        except RetryableError as exc:  # includes AmbiguousOutcome: nothing reached a usable server
            raise CommandError(f"{label}: unreachable: {exc.message}") from None
        except UnsupportedError as exc:
            raise CommandError(f"{label}: unsupported: {exc.message}") from None
        except ProviderError as exc:
            raise CommandError(f"{label}: {exc.message}") from None
        except (KeyError, TypeError, ValueError) as exc:  # malformed connection settings
            raise CommandError(f"{label}: bad connection settings: {exc}") from None

        out = self.stdout
        out.write(f"{label}: OK")
        out.write(f"  server version:      {info.version}")
        for key, value in sorted(info.details.items()):
            if value not in ("", None):
                out.write(f"  {key + ':':<20} {value}")
        out.write(f"  instance types:      {', '.join(caps.instance_types) or '-'}")
        out.write(f"  live port mapping:   {_yes(caps.live_port_mapping)}")
        out.write(f"  password methods:    {', '.join(caps.password_methods) or '-'}")
        out.write(f"  native rebuild:      {_yes(caps.native_rebuild)}")
        out.write(f"  remote cancel:       {_yes(caps.remote_cancel)}")
        if health.mark_reachable(provider.pk):
            out.write("  it was held as unreachable: its queue resumes")
