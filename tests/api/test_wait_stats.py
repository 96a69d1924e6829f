"""`wait` (created -> started, p50/p95 per provider and type, last 24 h) in the stats API and /metrics."""

from __future__ import annotations

from datetime import timedelta

from django.utils import timezone

from tasks import stats
from tasks.models import Provider, Task
from tests.conftest import make_task


def started(instance, wait_seconds: float, task_type="start", age=timedelta(minutes=5), **fields) -> Task:
    created = timezone.now() - age
    task = make_task(instance, task_type=task_type, status="completed", **fields)
    Task.objects.filter(pk=task.pk).update(
        created_at=created,
        started_at=created + timedelta(seconds=wait_seconds),
        completed_at=created + timedelta(seconds=wait_seconds + 1),
    )
    return task


def test_percentiles_per_provider_and_type(as_root, running_instance, provider, make_instance, alice):
    for seconds in range(1, 21):  # 1..20 s
        started(running_instance, seconds)
    started(running_instance, 4, task_type="stop")
    other = Provider.objects.create(name="sim-z")
    started(make_instance(alice, other), 0.5)
    # Outside the window, and not started yet: not counted.
    started(running_instance, 999, age=timedelta(hours=30))
    make_task(running_instance, task_type="start")
    stats.reset_cache()
    body = as_root.get("/api/v1/admin/tasks/stats/").json()["wait"]
    assert body["window_seconds"] == 86400
    rows = {(r["provider"]["name"], r["task_type"]): r for r in body["by_provider_type"]}
    assert set(rows) == {("sim-a", "start"), ("sim-a", "stop"), ("sim-z", "start")}
    start = rows[("sim-a", "start")]
    assert start["count"] == 20 and start["p50"] == 10 and start["p95"] == 19 and start["avg"] == 10.5
    assert rows[("sim-a", "stop")]["p95"] == 4
    assert rows[("sim-z", "start")] == {
        "provider": {"id": other.pk, "name": "sim-z"},
        "task_type": "start",
        "count": 1,
        "avg": 0.5,
        "p50": 0.5,
        "p95": 0.5,
    }


def test_a_running_task_counts_from_its_start(as_root, running_instance):
    task = make_task(running_instance, status="running")
    now = timezone.now()
    Task.objects.filter(pk=task.pk).update(created_at=now - timedelta(seconds=7), started_at=now - timedelta(seconds=4))
    stats.reset_cache()
    rows = as_root.get("/api/v1/admin/tasks/stats/").json()["wait"]["by_provider_type"]
    assert [(r["count"], r["p50"]) for r in rows] == [(1, 3.0)]


def test_metrics_histogram(anon, running_instance):
    for seconds in (0.05, 0.3, 3, 40):
        started(running_instance, seconds)
    stats.reset_cache()
    text = anon.get("/metrics").content.decode()
    labels = 'provider="sim-a",task_type="start"'
    assert f'cloudhost_task_wait_seconds_bucket{{le="0.1",{labels}}} 1.0' in text
    assert f'cloudhost_task_wait_seconds_bucket{{le="0.5",{labels}}} 2.0' in text
    assert f'cloudhost_task_wait_seconds_bucket{{le="5.0",{labels}}} 3.0' in text
    assert f'cloudhost_task_wait_seconds_bucket{{le="+Inf",{labels}}} 4.0' in text
    assert f"cloudhost_task_wait_seconds_count{{{labels}}} 4.0" in text
    assert f"cloudhost_task_wait_seconds_sum{{{labels}}} 43.35" in text


def test_staff_only(as_alice):
    assert as_alice.get("/api/v1/admin/tasks/stats/").status_code == 403
