"""Statistics and Prometheus metrics equal what the database holds, on the direct and the cached path."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from tasks import stats
from tasks.engine import transitions
from tasks.engine.states import ALL_STATES, FINAL, TaskType
from tasks.models import Provider, Task, Worker
from tests.conftest import make_task

NOW = timezone.now()


@pytest.fixture(autouse=True)
def no_kept_aggregates():
    stats.reset_cache()
    yield
    stats.reset_cache()


@pytest.fixture
def seeded(alice, bob, provider, make_instance):
    """Three providers, tasks in every state, finished recently and long ago, three workers."""
    wide = Provider.objects.create(name="sim-b", allow_concurrent_tasks=True, max_concurrent_tasks=3)
    off = Provider.objects.create(name="sim-c", enabled=False, allow_concurrent_tasks=True, max_concurrent_tasks=2)
    instances = [make_instance(owner, prov) for owner in (alice, bob) for prov in (provider, wide, off)]
    plan = [
        # (status, type, error code, minutes ago it finished, run seconds)
        ("completed", "start", "", 5, 4),
        ("completed", "start", "", 30, 12),
        ("completed", "start", "", 90, 7),
        ("completed", "create", "", 10, 65),
        ("completed", "create", "", 60 * 30, 300),  # outside the 24 h window
        ("completed", "reset-password", "", 2, 1.5),
        ("failed", "stop", "provider_error", 20, 3),
        ("failed", "restart", "worker_lost", 50, 20),
        ("failed", "delete", "worker_lost", 60 * 5, 20),
        ("timeout", "reset", "timeout", 45, 1200),
        ("cancelled", "stop", "cancelled_by_user", 3, None),
        ("cancelled", "create-port", "force_stopped", 60 * 40, 2),
        ("pending", "stop", "", None, None),
        ("pending", "start", "", None, None),
        ("pending", "delete-port", "", None, None),
        ("running", "restart", "", None, None),
        ("running", "create", "", None, None),
        ("cancelling", "reset", "cancelled_by_user", None, None),
    ]
    tasks = []
    for i, (status, task_type, code, ago, run) in enumerate(plan):
        instance = instances[i % len(instances)]
        done = NOW - timedelta(minutes=ago) if ago is not None else None
        started = done - timedelta(seconds=run) if done is not None and run is not None else None
        if status in ("running", "cancelling"):
            started = NOW - timedelta(seconds=30)
        tasks.append(
            make_task(
                instance,
                task_type=task_type,
                status=status,
                error_code=code,
                created_at=(started or done or NOW) - timedelta(seconds=10),
                started_at=started,
                completed_at=done,
            )
        )
    Worker.objects.create(name="w:1", node="w", host="h", pid=1, queue="provider-1", current_task=tasks[15])
    Worker.objects.create(name="w:2", node="w", host="h", pid=2, queue="provider-2")
    Worker.objects.create(
        name="w:3", node="w", host="h", pid=3, queue="provider-2", last_heartbeat=NOW - timedelta(hours=1)
    )
    return {"providers": [provider, wide, off], "tasks": tasks}


def nearest_rank(values: list[float], q: float) -> float | None:
    return values[math.ceil(q * len(values)) - 1] if values else None


def expected_durations(now):
    result = {}
    for task_type in TaskType.values:
        rows = (
            Task.objects.filter(task_type=task_type, status="completed", completed_at__gte=now - timedelta(hours=24))
            .exclude(started_at=None)
            .order_by("-completed_at")[: stats.DURATION_SAMPLE]
        )
        values = sorted((t.completed_at - t.started_at).total_seconds() for t in rows)
        result[task_type] = {
            "count": len(values),
            "avg": round(sum(values) / len(values), 3) if values else None,
            "p50": nearest_rank(values, 0.5),
            "p95": nearest_rank(values, 0.95),
        }
    return result


def assert_stats_match_database(body: dict, now) -> None:
    db_status = {s: Task.objects.filter(status=s).count() for s in ALL_STATES}
    assert body["by_status"] == db_status
    assert body["by_type"] == {t: Task.objects.filter(task_type=t).count() for t in TaskType.values}
    assert body["total"] == Task.objects.count()
    assert body["queue_length"] == db_status["pending"]
    for row in body["by_provider"]:
        provider = Provider.objects.get(pk=row["id"])
        assert row["pending"] == Task.objects.filter(provider=provider, status="pending").count()
        assert row["running"] == Task.objects.filter(provider=provider, status__in=["running", "cancelling"]).count()
        assert row["limit"] == provider.concurrency_limit
    for window, delta in (("last_hour", timedelta(hours=1)), ("last_24h", timedelta(hours=24))):
        finished = Task.objects.filter(status__in=FINAL, completed_at__gte=now - delta)
        errors = finished.filter(status__in=["failed", "timeout"]).count()
        assert body["error_rate"][window]["finished"] == finished.count()
        assert body["error_rate"][window]["rate"] == (round(errors / finished.count(), 4) if finished.count() else None)


def test_stats_endpoint_equals_the_database(as_root, seeded):
    body = as_root.get("/api/v1/admin/tasks/stats/").json()
    assert_stats_match_database(body, timezone.now())
    assert body["by_status"] == {
        "pending": 3,
        "running": 2,
        "cancelling": 1,
        "completed": 6,
        "failed": 3,
        "cancelled": 2,
        "timeout": 1,
    }
    assert [p["name"] for p in body["by_provider"]] == ["sim-a", "sim-b", "sim-c"]
    # Slots: sim-a 1 + sim-b 3 (sim-c is disabled); running + cancelling hold 3 of them.
    assert (body["running"], body["slots"], body["worker_utilization"]) == (3, 4, 0.75)
    assert body["workers"] == {"live": 2, "busy": 1}
    assert body["durations"] == expected_durations(timezone.now())
    assert body["durations"]["start"] == {"count": 3, "avg": 7.667, "p50": 7.0, "p95": 12.0}
    assert body["durations"]["create"]["count"] == 1  # the 30-hour-old one is outside the window
    assert body["error_rate"]["last_hour"] == {"rate": 0.375, "failed": 2, "timeout": 1, "finished": 8}


def test_stats_with_no_tasks(as_root):
    body = as_root.get("/api/v1/admin/tasks/stats/").json()
    assert body["total"] == 0 and set(body["by_status"].values()) == {0}
    assert body["worker_utilization"] is None and body["error_rate"]["last_24h"]["rate"] is None


def test_kept_base_stays_exact_as_tasks_change(seeded, alice, running_instance, monkeypatch):
    """The large-table path: base (kept) + live + new parts equal the table after every kind of change."""
    monkeypatch.setattr(stats, "SMALL_TABLE", 1)
    now = timezone.now()
    assert_stats_match_database(stats.task_stats(now), now)
    first = stats.task_stats(now)
    assert first["durations"] == expected_durations(now)
    # A pending task finishes (moves within the live part), a new task appears, and an
    # old finished task is inserted back-dated (below the base's boundary, id above it).
    pending = Task.objects.filter(status="pending").first()
    assert transitions.finish(pending.pk, "cancelled", token=None, actor="test")
    make_task(running_instance, task_type="stop")
    old = now - timedelta(hours=3)
    make_task(running_instance, status="completed", completed_at=old, started_at=old - timedelta(seconds=2))
    assert_stats_match_database(stats.task_stats(now), now)
    assert stats.task_stats(now)["durations"] == expected_durations(now)
    # Time passes: the base moves over what finished meanwhile, and stays exact.
    later = now + timedelta(minutes=7)
    body = stats.task_stats(later)
    assert_stats_match_database(body, later)
    assert body["durations"] == expected_durations(later)
    # A purge of the oldest tasks changes the lowest id: the base is rebuilt.
    Task.objects.filter(pk=Task.objects.order_by("id").first().pk).delete()
    assert_stats_match_database(stats.task_stats(later), later)


def test_kept_base_is_reused_between_calls(seeded, monkeypatch):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    monkeypatch.setattr(stats, "SMALL_TABLE", 1)
    now = timezone.now()
    with CaptureQueriesContext(connection) as cold:
        stats.task_counts(now)
    with CaptureQueriesContext(connection) as warm:
        stats.task_counts(now)
    # Warm: id bounds, the live part and the back-dated part; the base is not read again.
    assert len(warm.captured_queries) == 3 < len(cold.captured_queries)


def test_admin_list_count_from_the_aggregate_is_exact(as_root, seeded, monkeypatch):
    monkeypatch.setattr(stats, "SMALL_TABLE", 1)
    for query, expected in (
        ("", Task.objects.count()),
        ("?status=completed", Task.objects.filter(status="completed").count()),
        ("?status=failed,timeout&task_type=stop,reset", 2),
        ("?task_type=start", Task.objects.filter(task_type="start").count()),
    ):
        body = as_root.get(f"/api/v1/admin/tasks/{query}").json()
        assert body["count"] == expected == len(body["results"]), query


def test_kept_base_is_rebuilt_after_deletions_that_keep_the_lowest_id(seeded, monkeypatch):
    """A purge of some states only, or the admin deleting one task, leaves the lowest id alone.

    The kept base must still notice: every deletion counts in TaskDeletions, in
    the database, so a base kept by any process is rebuilt.
    """
    from tasks.purge import purge

    monkeypatch.setattr(stats, "SMALL_TABLE", 1)
    now = timezone.now()
    assert_stats_match_database(stats.task_stats(now), now)
    lowest = Task.objects.order_by("id").first().pk
    # The failed tasks that finished over 15 minutes ago (three of them), not the oldest task.
    assert purge(15 / 1440, ["failed"]) == 3
    assert Task.objects.order_by("id").first().pk == lowest
    assert_stats_match_database(stats.task_stats(now), now)
    # A finished task deleted through the ORM (the admin's action) counts too.
    Task.objects.filter(status="cancelled").order_by("-id").first().delete()
    assert Task.objects.order_by("id").first().pk == lowest
    assert_stats_match_database(stats.task_stats(now), now)


def owner_count_queries(client, query: str) -> tuple[dict, list[str]]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as seen:
        body = client.get(f"/api/v1/admin/tasks/{query}").json()
    return body, [q["sql"] for q in seen.captured_queries if "__count" in q["sql"]]


def test_admin_list_count_by_owner_from_the_aggregate_is_exact(as_root, seeded, alice, bob, monkeypatch):
    monkeypatch.setattr(stats, "SMALL_TABLE", 1)
    both = Task.objects.filter(owner__in=[alice, bob])
    for query, expected in (
        (f"?username={alice.username[:3]}", both.filter(owner=alice).count()),
        (f"?username={bob.username.upper()}&status=completed", both.filter(owner=bob, status="completed").count()),
        (f"?user={bob.pk}", both.filter(owner=bob).count()),
        (
            f"?user={alice.pk}&status=pending,running",
            both.filter(owner=alice, status__in=["pending", "running"]).count(),
        ),
        ("?username=nobody-has-this", 0),
    ):
        body, counts = owner_count_queries(as_root, query)
        assert body["count"] == expected == len(body["results"]), query
        assert counts == [], f"{query}: counted with COUNT(*) instead of the aggregate"
    # Owners and types together are not kept: COUNT(*) answers, exactly.
    body, counts = owner_count_queries(as_root, f"?user={alice.pk}&task_type=start")
    assert body["count"] == both.filter(owner=alice, task_type="start").count() and len(counts) == 1


def test_owner_counts_stay_exact_as_tasks_change_and_time_passes(seeded, alice, bob, running_instance, monkeypatch):
    monkeypatch.setattr(stats, "SMALL_TABLE", 1)
    owners = [alice.pk, bob.pk]

    def expected(statuses=None):
        rows = Task.objects.filter(owner_id__in=owners)
        return (rows.filter(status__in=statuses) if statuses else rows).count()

    now = timezone.now()
    assert stats.count_tasks(owners=owners, now=now) == expected()
    assert (
        stats.count_tasks(statuses=["completed"], owners=[alice.pk], now=now)
        == Task.objects.filter(owner=alice, status="completed").count()
    )
    # Live changes: a pending task ends, a new one appears, an old one is inserted back-dated.
    pending = Task.objects.filter(status="pending", owner_id__in=owners).first()
    assert transitions.finish(pending.pk, "cancelled", token=None, actor="test")
    make_task(running_instance, task_type="stop")
    old = now - timedelta(hours=3)
    make_task(running_instance, status="completed", completed_at=old, started_at=old - timedelta(seconds=2))
    assert stats.count_tasks(owners=owners, now=now) == expected()
    assert stats.count_tasks(statuses=["cancelled", "pending"], owners=owners, now=now) == expected(
        ["cancelled", "pending"]
    )
    # The base moves over what finished meanwhile, its owner counts with it.
    later = now + timedelta(minutes=7)
    assert stats.count_tasks(owners=owners, now=later) == expected()
    assert stats.count_tasks(statuses=["completed"], owners=owners, now=later) == expected(["completed"])
    # Types with owners are not kept: the caller counts.
    assert stats.count_tasks(task_types=["start"], owners=owners, now=later) is None


def parse_metrics(text: str) -> dict:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_equal_the_database(anon, seeded):
    response = anon.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    m = parse_metrics(response.content.decode())
    for provider in seeded["providers"]:
        for status in ALL_STATES:
            key = ("cloudhost_tasks", (("provider", provider.name), ("status", status)))
            assert m[key] == Task.objects.filter(provider=provider, status=status).count()
        pending = Task.objects.filter(provider=provider, status="pending").count()
        running = Task.objects.filter(provider=provider, status__in=["running", "cancelling"]).count()
        assert m[("cloudhost_task_queue_length", (("provider", provider.name),))] == pending
        assert m[("cloudhost_tasks_running", (("provider", provider.name),))] == running
        assert m[("cloudhost_provider_concurrency_limit", (("provider", provider.name),))] == provider.concurrency_limit
        oldest = Task.objects.filter(provider=provider, status="pending").order_by("created_at").first()
        wait = m[("cloudhost_task_queue_wait_seconds", (("provider", provider.name),))]
        if oldest is None:
            assert wait == 0
        else:  # the seeded pending tasks were created 10 s before NOW
            assert wait == pytest.approx((timezone.now() - oldest.created_at).total_seconds(), abs=5)
            assert wait >= 10
    for task_type in TaskType.values:
        completed = Task.objects.filter(task_type=task_type, status="completed")
        if completed.exists():
            assert m[("cloudhost_task_duration_seconds_count", (("task_type", task_type),))] == completed.count()
            total = sum((t.completed_at - t.started_at).total_seconds() for t in completed)
            assert m[("cloudhost_task_duration_seconds_sum", (("task_type", task_type),))] == pytest.approx(total)
    # start took 4, 12 and 7 s: two within 10 s, all three within 30 s.
    assert m[("cloudhost_task_duration_seconds_bucket", (("le", "10.0"), ("task_type", "start")))] == 2
    assert m[("cloudhost_task_duration_seconds_bucket", (("le", "30.0"), ("task_type", "start")))] == 3
    assert m[("cloudhost_task_duration_seconds_bucket", (("le", "+Inf"), ("task_type", "start")))] == 3
    assert m[("cloudhost_task_failures_total", (("reason", "worker_lost"),))] == 2
    assert m[("cloudhost_task_failures_total", (("reason", "provider_error"),))] == 1
    assert m[("cloudhost_task_failures_total", (("reason", "timeout"),))] == 1
    assert m[("cloudhost_task_lease_expiries_total", ())] == Task.objects.filter(error_code="worker_lost").count()
    assert m[("cloudhost_tasks_finished_total", (("status", "completed"), ("task_type", "start")))] == 3
    assert m[("cloudhost_workers_live", ())] == 2 and m[("cloudhost_workers_busy", ())] == 1
    assert m[("cloudhost_worker_utilization", ())] == 0.75


def test_metrics_token_when_configured(anon, seeded, settings):
    settings.METRICS_TOKEN = "scrape-me"
    assert anon.get("/metrics").status_code == 401
    assert anon.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    assert anon.get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-me").status_code == 200


def test_healthz_ok(anon, db):
    response = anon.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"database": "ok", "broker": "ok"}


def test_healthz_reports_an_unreachable_redis_broker(anon, db, settings):
    settings.Q_BROKER = "redis"
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    response = anon.get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert body["database"] == "ok" and body["broker"].startswith("error")


def test_healthz_reports_a_database_failure(anon, db, monkeypatch):
    from django.db import OperationalError

    from tasks.api import ops

    def broken():
        raise OperationalError("gone away")

    monkeypatch.setattr(ops, "_check_database", broken)
    response = anon.get("/healthz")
    assert response.status_code == 503
    assert response.json()["database"].startswith("error")


def test_metrics_answer_503_when_the_database_fails(anon, db, monkeypatch):
    from django.db import OperationalError

    from tasks import metrics

    def broken():
        raise OperationalError("gone away")

    monkeypatch.setattr(metrics, "render", broken)
    response = anon.get("/metrics")
    assert response.status_code == 503
    assert response.json()["code"] == "unavailable"
