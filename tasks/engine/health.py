"""Provider health: hold a provider's queue while it cannot be reached, probe it, resume.

A host that is down (rebooting, network cut, daemon stopped) would otherwise
fail its whole backlog one task at a time, each after its retries, and every
user would have to ask again. Instead:

- A task whose provider call still fails with UnreachableError after its
  retries (connection refused, no route, name not resolved, connect timeout:
  nothing reached the host, so nothing happened there) ends ``failed`` with
  ``provider_unreachable``, and first marks its provider unreachable, so the
  admission in its own finish starts nothing more (Provider.accepts_work).
- The provider's other tasks stay pending, saying why (``blocked_reason``), and
  new requests are still queued behind them.
- Every machine's worker tier probes the unreachable providers it serves every
  PROVIDER_PROBE_SECONDS with ``server_info`` (the driver's cheapest call), in a
  thread of its supervisor, so a probe hanging on a dead host delays no sweep.
  A probe is claimed with a compare-and-set on ``probed_at``, so machines do not
  all probe at once. The first answer clears the mark and admits the queue.
- Operators see the mark in the admin and the API, can probe at once (admin
  action), and a disabled provider is not probed.

Tasks already admitted when the mark is set run and fail the same way (at most
the provider's limit of them); running tasks are not touched.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from providers.base import ProviderError, build_driver
from tasks.models import Provider

logger = logging.getLogger(__name__)

ERROR_LENGTH = Provider._meta.get_field("unreachable_error").max_length


def mark_unreachable(provider_id: int, error: str) -> bool:
    """Hold the provider's queue; True when this call set the mark (it was reachable)."""
    now = timezone.now()
    error = error[:ERROR_LENGTH]
    if Provider.objects.filter(pk=provider_id, unreachable_since__isnull=True).update(
        unreachable_since=now, unreachable_error=error, probed_at=now
    ):
        logger.warning("provider %s: unreachable (%s); its queue is held until it answers", provider_id, error)
        return True
    Provider.objects.filter(pk=provider_id).update(unreachable_error=error)
    return False


def mark_reachable(provider_id: int) -> bool:
    """Clear the mark and admit the provider's queue; True when it was marked."""
    cleared = Provider.objects.filter(pk=provider_id, unreachable_since__isnull=False).update(
        unreachable_since=None, unreachable_error="", probed_at=timezone.now()
    )
    if cleared:
        from tasks.engine.dispatch import admit_soon

        logger.info("provider %s: answers again; its queue resumes", provider_id)
        admit_soon(provider_id)
    return bool(cleared)


def probe(provider: Provider) -> str | None:
    """Ask the provider for its server info: None when it answers, else why not."""
    from tasks.engine.worker import provider_config

    try:
        build_driver(provider_config(provider)).server_info()
    except ProviderError as exc:
        return str(exc) or type(exc).__name__
    except Exception as exc:  # a driver bug must not kill the prober
        logger.exception("provider %s: probe crashed", provider.pk)
        return f"{type(exc).__name__}: {exc}"
    return None


def probe_now(provider: Provider) -> str | None:
    """Probe and act on the answer: clear the mark, or keep it with the newest error."""
    error = probe(provider)
    if error is None:
        mark_reachable(provider.pk)
    else:
        Provider.objects.filter(pk=provider.pk, unreachable_since__isnull=False).update(
            unreachable_error=error[:ERROR_LENGTH], probed_at=timezone.now()
        )
    return error


def probe_cutoff(now: datetime | None = None) -> datetime:
    """A held provider last probed before this is due for a probe."""
    return (now or timezone.now()) - timedelta(seconds=settings.PROVIDER_PROBE_SECONDS)


def due(queryset, now: datetime | None = None):
    """The unreachable, enabled providers of ``queryset`` not probed for PROVIDER_PROBE_SECONDS."""
    return queryset.filter(enabled=True, unreachable_since__isnull=False).filter(
        Q(probed_at__isnull=True) | Q(probed_at__lt=probe_cutoff(now))
    )


def probe_due(queryset, now: datetime | None = None) -> dict[int, str | None]:
    """Probe each due provider of ``queryset`` that no other machine claimed first; {id: error or None}."""
    now = now or timezone.now()
    results: dict[int, str | None] = {}
    for provider in due(queryset, now):
        if not Provider.objects.filter(pk=provider.pk, probed_at=provider.probed_at).update(probed_at=now):
            continue  # another machine probes it
        results[provider.pk] = probe_now(provider)
    return results
