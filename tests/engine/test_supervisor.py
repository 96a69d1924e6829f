"""The supervisor's cluster bookkeeping, without starting processes."""

from __future__ import annotations

import pytest

from tasks.engine import supervisor as sup
from tasks.models import Provider


class FakeProc:
    def __init__(self):
        self.pid, self.returncode, self.signals = 4242, None, []

    def poll(self):
        return self.returncode

    def send_signal(self, sig):
        self.signals.append(sig)


@pytest.fixture
def spawned(monkeypatch):
    calls = []

    def fake_spawn(self, queue, workers, provider_id):
        calls.append((queue, workers))
        cluster = sup.Cluster(queue=queue, workers=workers, proc=FakeProc(), provider_id=provider_id)
        self.clusters.setdefault(queue, []).append(cluster)
        return cluster

    monkeypatch.setattr(sup.Supervisor, "_spawn", fake_spawn)
    monkeypatch.setattr(sup.dispatch, "redispatch_stale", lambda **kw: [])
    return calls


def test_one_cluster_per_provider_sized_to_its_limit_and_grown_not_restarted(db, spawned):
    a = Provider.objects.create(name="a")
    b = Provider.objects.create(name="b", allow_concurrent_tasks=True, max_concurrent_tasks=3)
    s = sup.Supervisor(maintenance_cluster=False)
    s.reconcile_clusters()
    assert sorted(spawned) == sorted([(a.queue_name, 1), (b.queue_name, 3)])
    Provider.objects.filter(pk=a.pk).update(allow_concurrent_tasks=True, max_concurrent_tasks=4)
    s.reconcile_clusters()
    assert spawned[-1] == (a.queue_name, 3), "the missing workers come as an extra cluster"
    assert not any(c.proc.signals for c in s.clusters[a.queue_name]), "running clusters are left alone"
    Provider.objects.filter(pk=b.pk).update(enabled=False)
    s.reconcile_clusters()
    assert b.queue_name not in s.clusters, "a disabled provider with nothing running is let go"


def test_worker_providers_places_queues_on_chosen_machines(db, spawned, settings):
    a = Provider.objects.create(name="eu-1")
    Provider.objects.create(name="us-1")
    c = Provider.objects.create(name="eu-2")
    settings.WORKER_PROVIDERS = ["eu-1", str(c.pk)]
    sup.Supervisor(maintenance_cluster=False).reconcile_clusters()
    assert sorted(q for q, _ in spawned) == sorted([a.queue_name, c.queue_name])


def test_a_dead_cluster_is_started_again(db, spawned):
    p = Provider.objects.create(name="x")
    s = sup.Supervisor(maintenance_cluster=False)
    s.reconcile_clusters()
    s.clusters[p.queue_name][0].proc.returncode = -9
    s.reconcile_clusters()
    assert spawned == [(p.queue_name, 1), (p.queue_name, 1)]


def test_the_registry_row_holds_a_long_queue_list_and_a_failing_step_does_not_stop_recovery(db, spawned, monkeypatch):
    """Twenty providers' queue names overflow the registry's queue column: it is summarised.
    And when the registry write fails anyway, the recovery sweep of the same round still runs."""
    from tasks.models import Worker

    for n in range(20):
        Provider.objects.create(name=f"p{n}")
    s = sup.Supervisor(maintenance_cluster=False)
    s.reconcile_clusters()
    s.tick()
    row = Worker.objects.get(name=s.name)
    assert len(row.queue) <= 100 and row.queue.endswith("more)") and row.role == "supervisor"
    assert sup.summarize_queues(["provider-1", "provider-2"], 100) == "provider-1,provider-2"
    assert sup.summarize_queues([], 100) == "-"

    swept = []
    monkeypatch.setattr(s, "heartbeat", lambda: 1 / 0)
    monkeypatch.setattr(s, "sweep", lambda: swept.append(True))
    s.sweep_enabled = True
    s.tick()
    assert swept == [True]


def test_the_sweep_schedule_is_one_row_even_after_machines_started_at_once(db):
    """Two machines starting together may both insert the schedule (its name is not
    unique in django-q2); the next start must not crash on that, and leaves one row."""
    from django_q.models import Schedule

    sup.ensure_schedules()
    sup.ensure_schedules()
    assert Schedule.objects.filter(name=sup.SWEEP_SCHEDULE).count() == 1
    first = Schedule.objects.get(name=sup.SWEEP_SCHEDULE)
    # What the race leaves: a second row, and a stale interval on the first.
    Schedule.objects.filter(pk=first.pk).update(minutes=7)
    Schedule.objects.create(
        name=sup.SWEEP_SCHEDULE, func="tasks.engine.maintenance.sweep_job", schedule_type=Schedule.MINUTES
    )

    sup.ensure_schedules()

    rows = list(Schedule.objects.filter(name=sup.SWEEP_SCHEDULE))
    assert [r.pk for r in rows] == [first.pk], "the oldest row stays, the duplicate goes"
    assert (rows[0].func, rows[0].schedule_type, rows[0].minutes, rows[0].repeats) == (
        "tasks.engine.maintenance.sweep_job",
        Schedule.MINUTES,
        1,
        -1,
    )


@pytest.mark.mariadb
@pytest.mark.django_db(transaction=True)
def test_machines_starting_at_once_leave_one_sweep_schedule():
    """The start-up race itself, several threads at once.

    MariaDB only: several machines share a database only there. SQLite's test
    database (in memory, shared cache) refuses concurrent writers at once with
    "database table is locked" instead of waiting, which is not this race.
    """
    import threading

    from django.db import connection
    from django_q.models import Schedule

    start = threading.Barrier(4)
    errors = []

    def boot():
        try:
            start.wait()
            sup.ensure_schedules()
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=boot) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    sup.ensure_schedules()  # the next start sees what the race left
    assert Schedule.objects.filter(name=sup.SWEEP_SCHEDULE).count() == 1
