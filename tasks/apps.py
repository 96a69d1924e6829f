import sys

from django.apps import AppConfig


class TasksConfig(AppConfig):
    name = "tasks"
    verbose_name = "Tasks"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from tasks import signals, traffic_counters  # noqa: F401  (connects the receivers)

        if sys.argv[1:2] == ["qcluster"]:
            # django-q2 forks its workers from this process: what is imported here
            # each worker has from the start, instead of importing it at its first job.
            from providers.base import import_drivers
            from tasks.engine import worker  # noqa: F401

            import_drivers()
