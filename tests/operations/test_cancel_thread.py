"""Cancel from another thread while the worker runs: the heartbeat carries it to the operation."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connection

from tasks import services
from tasks.models import Task
from tests.operations.conftest import fresh, inject, run, store, usage


# MariaDB only: three threads write at once (worker, heartbeat, canceller). SQLite's
# in-memory test database (shared cache) refuses a concurrent writer at once with
# "database table is locked" instead of waiting as a real SQLite file does; under
# load that failed this test (CI on a busy machine), which is not what it is about.
@pytest.mark.mariadb
@pytest.mark.django_db(transaction=True)
def test_user_cancel_reaches_a_running_create_through_the_heartbeat(alice, provider, settings):
    settings.TASK_CANCEL_POLL_SECONDS = 0.1
    inject(provider, speed=0.2)  # create takes ~5 s: long enough to be caught midway
    instance, task = services.create_instance(alice, provider=provider, image="debian/12")
    errors: list[BaseException] = []

    def work() -> None:
        try:
            run(provider)
        except BaseException as exc:  # pragma: no cover - surfaced below
            errors.append(exc)
        finally:
            connection.close()

    runner = threading.Thread(target=work)
    runner.start()
    deadline = time.monotonic() + 10
    while Task.objects.get(pk=task.pk).status != "running" and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # into the image download
    asked = time.monotonic()
    services.cancel_task(alice, task.pk)
    runner.join(timeout=30)
    assert not runner.is_alive() and not errors
    task, instance = fresh(task), fresh(instance)
    assert (task.status, task.error_code) == ("cancelled", "cancelled_by_user")
    assert task.completed_at is not None and time.monotonic() - asked < 3.0
    assert instance.status == "failed" and usage(instance) == (0, 0, 0, 0)
    assert store(provider).guest(instance.guest_name) is None
