"""Admission on provider changes: a raised limit or a re-enabled provider admits at once.

Whatever saves the Provider (API PATCH, admin form, shell), the wake-up runs
after commit; a duplicate wake-up only costs one small transaction.
"""

from __future__ import annotations

from django.db import transaction
from django.db.models.signals import post_save
from django.dispatch import receiver

from tasks.models import Provider


@receiver(post_save, sender=Provider, dispatch_uid="tasks.provider_saved_admit")
def provider_saved(sender, instance: Provider, created: bool, **kwargs) -> None:
    if created or not instance.enabled:
        return
    from tasks.dispatch import admit_soon

    provider_id = instance.pk
    transaction.on_commit(lambda: admit_soon(provider_id))
