"""Admission on provider changes, and the count of deleted tasks.

Whatever saves the Provider (API PATCH, admin form, shell), a raised limit or
a re-enabled provider admits at once: the wake-up runs after commit; a
duplicate wake-up only costs one small transaction.

Whatever deletes a Task through the ORM (the admin, a shell) counts it in
TaskDeletions in the same transaction, so the statistics kept by every process
are rebuilt (tasks.stats); the purge, which deletes without the ORM's
collector, counts its own.
"""

from __future__ import annotations

from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from tasks.models import Provider, Task, TaskDeletions


@receiver(post_save, sender=Provider, dispatch_uid="tasks.provider_saved_admit")
def provider_saved(sender, instance: Provider, created: bool, **kwargs) -> None:
    if created or not instance.enabled:
        return
    from tasks.engine.dispatch import admit_soon

    provider_id = instance.pk
    transaction.on_commit(lambda: admit_soon(provider_id))


@receiver(post_delete, sender=Task, dispatch_uid="tasks.task_deleted_count")
def task_deleted(sender, instance: Task, **kwargs) -> None:
    TaskDeletions.add(1)
