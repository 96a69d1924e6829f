"""The operators' console: the Django admin for tasks, instances, providers, workers.

Modules: task_admin (tasks, cancel and force-stop), instance_admin (instances,
ports, the instance actions), provider_admin (live concurrency settings,
connectivity check, write-only secrets), other_admin (quotas, workers, the
event log), common (badges, bars, redaction, bulk reports), permissions (the
force-stop permission). The dashboard and the progress JSON view live in
tasks.admin.views, routed through TaskAdmin.get_urls. See docs/admin.md.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib import admin
from django.urls import reverse_lazy

from tasks.admin import (  # noqa: F401  (registrations)
    instance_admin,
    other_admin,
    provider_admin,
    task_admin,
    webhook_admin,
)
from tasks.admin.permissions import connect as _connect_permissions

_connect_permissions()

# The panel's own site is the front end, served elsewhere; "/" here is a 404. The
# header's VIEW SITE link leads to what this server has for people: the API docs.
admin.site.site_url = reverse_lazy("api-docs")


def _hide_django_q() -> None:
    """django-q2's own pages (schedules, successful and failed jobs, queued jobs) list the
    broker's jobs, not tasks: they are out of the console unless SHOW_DJANGO_Q_ADMIN is set.
    The task list and its timeline are where an operator looks."""
    if settings.SHOW_DJANGO_Q_ADMIN:
        return
    import django_q.admin  # noqa: F401  (registers them; a no-op when autodiscover came first)
    from django_q import models as q

    for model in (q.Schedule, q.Success, q.Failure, q.OrmQ):
        if admin.site.is_registered(model):
            admin.site.unregister(model)


_hide_django_q()
