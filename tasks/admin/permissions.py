"""The force-stop permission (tasks.force_stop_task).

Force-stop needs its own permission, separate from "change task" (which allows
the ordinary cancel). The model module and the migrations belong to the data
model, so the permission is not declared in Task.Meta: it is created by a
post_migrate handler, connected when the admin is imported (autodiscover runs
in AdminConfig.ready(), before any migrate or flush sends post_migrate).
get_or_create makes it idempotent, and it survives test-database flushes
because flush sends post_migrate too. Superusers have it implicitly.
"""

from __future__ import annotations

import logging

from django.apps import AppConfig
from django.db.models.signals import post_migrate

logger = logging.getLogger(__name__)

FORCE_STOP_CODENAME = "force_stop_task"
FORCE_STOP_PERMISSION = f"tasks.{FORCE_STOP_CODENAME}"
FORCE_STOP_NAME = "Can force-stop task (ends it at once, revokes its lease)"  # a database row: stays English


def ensure_force_stop_permission(using: str = "default") -> None:
    from django.contrib.auth.models import Permission
    from django.contrib.contenttypes.models import ContentType

    from tasks.models import Task

    # get_for_model creates the content type if the contenttypes handler has not run
    # yet (our handler may be connected before it).
    content_type = ContentType.objects.db_manager(using).get_for_model(Task, for_concrete_model=True)
    _, created = Permission.objects.using(using).get_or_create(
        content_type=content_type, codename=FORCE_STOP_CODENAME, defaults={"name": FORCE_STOP_NAME}
    )
    if created:
        logger.info("created permission %s", FORCE_STOP_PERMISSION)


def _on_post_migrate(sender: AppConfig, using: str = "default", **kwargs) -> None:
    if getattr(sender, "label", None) != "tasks":
        return
    from django.apps import apps as global_apps

    # Only once the tables exist (a migrate that stopped before them sends nothing for us).
    apps = kwargs.get("apps") or global_apps
    try:
        apps.get_model("auth", "Permission")
        apps.get_model("contenttypes", "ContentType")
    except LookupError:
        return
    ensure_force_stop_permission(using)


def connect() -> None:
    post_migrate.connect(_on_post_migrate, dispatch_uid="tasks.admin.force_stop_permission")
