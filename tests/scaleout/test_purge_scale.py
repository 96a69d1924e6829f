"""purge_tasks on 200,000 finished tasks never blocks admission for long (MariaDB)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from tasks import services
from tasks.engine import dispatch
from tasks.models import Instance, Provider, Task, TaskEvent
from tasks.purge import purge

pytestmark = [pytest.mark.mariadb, pytest.mark.processes, pytest.mark.django_db(transaction=True)]

OLD = 200_000


def bulk_finished_tasks(owner, provider, instance, n: int, days_ago: float) -> None:
    """Insert n completed tasks and one event each, generated inside MariaDB (its sequence engine)."""
    done = timezone.now() - timedelta(days=days_ago)
    base = Task.objects.order_by("-id").values_list("id", flat=True).first() or 0
    with connection.cursor() as cur:
        cur.execute(
            "INSERT INTO tasks_task (id, uuid, task_type, status, progress, status_message, error_code, error_message,"
            " cancel_reason, task_data, owner_id, initiator_id, provider_id, instance_id, timeout_seconds, created_at,"
            " admitted_at, started_at, completed_at, lease_token, worker, attempt_count, dispatch_count, checkpoints)"
            f" SELECT seq + %s, REPLACE(UUID(), '-', ''), 'restart', 'completed', 100, '', '', '', '', '{{}}',"
            f" %s, %s, %s, %s, 0, %s, %s, %s, %s, '', '', 1, 1, '{{}}' FROM seq_1_to_{n}",
            [base, owner.pk, owner.pk, provider.pk, instance.pk, done, done, done, done],
        )
        cur.execute(
            "INSERT INTO tasks_taskevent (task_id, kind, from_status, to_status, actor, reason, progress, message, at)"
            " SELECT id, 'transition', 'running', 'completed', 'w', '', 100, '', completed_at FROM tasks_task"
            " WHERE instance_id = %s",
            [instance.pk],
        )


def test_purge_200k_keeps_what_it_must_and_never_blocks_admission(alice, make_instance):
    provider = Provider.objects.create(name="purge", allow_concurrent_tasks=True, max_concurrent_tasks=2)
    old_home = make_instance(alice, provider, name="old-home")
    loading = time.monotonic()
    bulk_finished_tasks(alice, provider, old_home, OLD, days_ago=100)
    loaded_in = time.monotonic() - loading
    recent = services.request_operation(alice, make_instance(alice, provider, name="recent").pk, "restart")
    Task.objects.filter(pk=recent.pk).update(status="completed", completed_at=timezone.now() - timedelta(days=1))
    Instance.objects.filter(pk=recent.instance_id).update(active_task=None)
    assert Task.objects.count() == OLD + 1

    result: dict = {}

    def run_purge():
        try:
            result["deleted"] = purge(30, batch_size=2000)
        finally:
            connection.close()

    purger = threading.Thread(target=run_purge)
    purging = time.monotonic()
    purger.start()
    worst = 0.0
    samples = 0
    n = 0
    while purger.is_alive():
        # Task admission and creation on the same provider, measured while the purge runs.
        inst = make_instance(alice, provider, name=f"live-{n}")
        began = time.monotonic()
        task = services.request_operation(alice, inst.pk, "restart")
        dispatch.admit(provider.pk)
        services.cancel_task(alice, task.pk)
        worst = max(worst, time.monotonic() - began)
        samples += 1
        n += 1
    purger.join()
    purged_in = time.monotonic() - purging
    assert result["deleted"] == OLD
    assert samples >= 5, "the purge ran long enough to be measured"
    assert worst < 1.0, f"admission waited {worst:.3f} s behind the purge"
    assert Task.objects.filter(pk=recent.pk).exists(), "recent finished tasks are kept"
    assert Task.objects.filter(status="cancelled").count() == samples, "tasks created during the purge are kept"
    assert not TaskEvent.objects.filter(task__instance=old_home).exists()
    print(
        f"\nloaded {OLD} tasks+events in {loaded_in:.1f} s; purged them in {purged_in:.1f} s; "
        f"{samples} admissions measured meanwhile, worst {worst * 1000:.0f} ms"
    )
