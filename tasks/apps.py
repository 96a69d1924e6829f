import os
import sys

from django.apps import AppConfig
from django.utils import translation
from django.utils.translation import gettext_lazy as _


class TasksConfig(AppConfig):
    name = "tasks"
    verbose_name = _("Tasks")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from tasks import signals, traffic_counters  # noqa: F401  (connects the receivers)

        if os.path.basename(sys.argv[0]) in ("manage.py", "django-admin"):
            # Management commands and the worker tier (its pool runs under manage.py)
            # speak English whatever LANGUAGE_CODE says: their output is for logs,
            # and what they store (step messages, errors) is translated when shown.
            # Requests still get their own language from LocaleMiddleware.
            translation.activate("en")
