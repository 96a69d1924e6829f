"""The supervisor's cluster bookkeeping, without starting processes."""

from __future__ import annotations

import os

import pytest

from tasks.engine import supervisor as sup
from tasks.models import Provider


class FakePool:
    """What the supervisor sees of its pool: the clusters, and the commands it sends."""

    def __init__(self, supervisor, workers=2):
        self.commands = []
        self.rows = [sup.Cluster(name="pool-1", pid=os.getpid(), workers=workers, base=True, running=True)]
        self.idle = None  # its workers waiting for a job, as the pool reports them (None: unknown)
        supervisor.pool_alive = lambda: True
        supervisor.clusters = lambda: list(self.rows)
        supervisor.idle_workers = lambda: self.idle
        supervisor.command = self.commands.append

    def grown(self, name, workers):
        self.rows.append(sup.Cluster(name=name, pid=os.getpid(), workers=workers, base=False, running=True))


@pytest.fixture
def supervisor(db, monkeypatch, tmp_path, settings):
    settings.VAR_DIR = tmp_path
    monkeypatch.setattr(sup.dispatch, "redispatch_stale", lambda **kw: [])
    return sup.Supervisor(scheduler=False)


def test_the_pool_serves_every_provider_queue_and_follows_changes(supervisor, settings):
    from tasks.engine.broker import QueueSet, read_queues

    a = Provider.objects.create(name="a")
    b = Provider.objects.create(name="b", allow_concurrent_tasks=True, max_concurrent_tasks=3)
    supervisor.refresh_providers(force=True)
    assert read_queues(supervisor.queues_file) == sorted([a.queue_name, b.queue_name])
    assert supervisor.capacity() == 4, "the sum of the limits"
    queues = QueueSet("cloudhost", str(supervisor.queues_file))
    assert queues.names() == ["cloudhost", a.queue_name, b.queue_name]
    c = Provider.objects.create(name="c")
    Provider.objects.filter(pk=b.pk).update(max_concurrent_tasks=10)
    supervisor.refresh_providers(force=True)
    assert supervisor.capacity() == 12, "a raised limit raises the cap: no restart"
    assert queues.names() == ["cloudhost", a.queue_name, b.queue_name, c.queue_name], "the broker re-reads the list"
    settings.WORKER_CONCURRENCY = 5
    assert supervisor.capacity() == 5


def test_worker_providers_places_queues_on_chosen_machines(supervisor, settings):
    from tasks.engine.broker import read_queues

    a = Provider.objects.create(name="eu-1")
    Provider.objects.create(name="us-1")
    c = Provider.objects.create(name="eu-2")
    settings.WORKER_PROVIDERS = ["eu-1", str(c.pk)]
    supervisor.refresh_providers(force=True)
    assert read_queues(supervisor.queues_file) == sorted([a.queue_name, c.queue_name])


def tasks_on(alice, provider, n, **fields):
    """n start tasks of ``provider`` (``fields`` their state), each on an instance of its own."""
    from tasks.models import Instance, Task

    for _ in range(n):
        name = f"i{Instance.objects.count()}"
        instance = Instance.objects.create(owner=alice, provider=provider, name=name, live_name=name, image="x")
        Task.objects.create(
            task_type="start", owner=alice, initiator=alice, provider=provider, instance=instance, **fields
        )


def admitted(alice, provider, n):
    """n tasks admitted and not claimed (their jobs sent a second ago)."""
    from datetime import timedelta

    from django.utils import timezone

    sent = timezone.now() - timedelta(seconds=1)
    tasks_on(alice, provider, n, status="pending", admitted_at=sent, dispatched_at=sent, lease_token="t")


def test_the_pool_grows_when_jobs_wait_by_what_the_database_says_within_the_cap(supervisor, monkeypatch, alice):
    provider = Provider.objects.create(name="a", allow_concurrent_tasks=True, max_concurrent_tasks=10)
    pool = FakePool(supervisor)
    waiting = {"n": 0}
    monkeypatch.setattr(supervisor, "backlog", lambda: waiting["n"])
    supervisor.reconcile_pool()
    assert pool.commands == [], "nothing waits"
    admitted(alice, provider, 2)
    waiting["n"] = 1
    supervisor.reconcile_pool()
    assert pool.commands == [], "one job seen once may just be on its way to an idle worker"
    supervisor.reconcile_pool()
    assert pool.commands == ["grow 2"], (
        "2 admitted and unclaimed, 2 workers: twice the demand is 4 (not the broker's count)"
    )
    supervisor.reconcile_pool()
    assert pool.commands == ["grow 2"], "no second grow while the first is starting"
    pool.grown("pool-2", 2)
    admitted(alice, provider, 20)
    waiting["n"] = 20
    supervisor.reconcile_pool()
    assert pool.commands[-1] == "grow 6", (
        "a burst grows at the first check, up to the cap of 10 (the sum of the limits)"
    )
    pool.grown("pool-3", 6)
    supervisor.reconcile_pool()
    supervisor.reconcile_pool()
    assert len(pool.commands) == 2, "at the cap: no more"


def test_unclaimed_jobs_grow_the_pool_from_the_sweep_too(supervisor, monkeypatch, alice, settings):
    """Nothing seen waiting in the broker (another machine's copy, a lost wake-up), but
    admitted jobs stay unclaimed: the sweep's summary sees them and the pool grows by what
    the database says this machine should run (here two running on it, three unclaimed)."""

    from tasks.models import Instance, Task

    provider = Provider.objects.create(name="a", allow_concurrent_tasks=True, max_concurrent_tasks=4)
    pool = FakePool(supervisor)
    monkeypatch.setattr(supervisor, "backlog", lambda: 0)
    instance = Instance.objects.create(owner=alice, provider=provider, name="i", live_name="i", image="x")
    admitted(alice, provider, 3)
    base = dict(task_type="start", owner=alice, initiator=alice, provider=provider, instance=instance)
    for _ in range(2):
        Task.objects.create(status="running", worker=f"{settings.WORKER_NODE}:1", **base)
    Task.objects.create(status="running", worker="another-machine:1", **base)
    supervisor.refresh_providers(force=True)
    supervisor.sweep()
    assert pool.commands == ["grow 2"], "2 running here + 3 unclaimed, doubled, within the cap of 4: 2 more"


def test_an_idle_extra_cluster_is_retired_and_a_busy_one_is_not(supervisor, monkeypatch, settings):
    from datetime import timedelta

    from django.utils import timezone

    from tasks.models import Worker

    settings.WORKER_POOL_IDLE_SECONDS = 60.0
    pool = FakePool(supervisor)
    pool.grown("pool-2", 4)
    clock = {"now": 1000.0}
    monkeypatch.setattr(sup.time, "monotonic", lambda: clock["now"])
    supervisor.retire_idle()
    assert pool.commands == []
    # One of its workers claimed a task 30 s ago (its registry row moved): busy.
    Worker.objects.create(
        name=f"{settings.WORKER_NODE}:{os.getpid()}",
        node=settings.WORKER_NODE,
        host="h",
        pid=os.getpid(),
        queue="pool-2",
        last_heartbeat=timezone.now() - timedelta(seconds=30),
    )
    clock["now"] += 61
    supervisor.retire_idle()
    assert pool.commands == [], "it took work within the window: never touched"
    # Its supervisor refreshes an idle worker's heartbeat (refresh_workers): no sign of work.
    Worker.objects.update(last_heartbeat=timezone.now())
    clock["now"] += 30
    supervisor.retire_idle()
    assert pool.commands == [], "idle for 30 s only"
    clock["now"] += 31
    supervisor.retire_idle()
    assert pool.commands == ["retire pool-2"], "idle for WORKER_POOL_IDLE_SECONDS: stopped; the base never"


def test_the_heartbeat_keeps_idle_workers_of_the_pool_alive_in_one_query(
    supervisor, monkeypatch, settings, django_assert_num_queries
):
    """An idle worker writes nothing; its supervisor refreshes the rows of its pool's live
    processes (one UPDATE), so the console shows it idle, not dead. A dead one ages."""
    from datetime import timedelta

    from django.utils import timezone

    from tasks.models import Worker

    old = timezone.now() - timedelta(minutes=5)
    for pid in (101, 102, 103):
        Worker.objects.create(
            name=f"{settings.WORKER_NODE}:{pid}",
            node=settings.WORKER_NODE,
            host="h",
            pid=pid,
            queue="q",
            last_heartbeat=old,
        )
    Worker.objects.create(name="elsewhere:101", node="elsewhere", host="h", pid=101, queue="q", last_heartbeat=old)
    monkeypatch.setattr(supervisor, "child_pids", lambda: [101, 102, 999])  # 103 died
    with django_assert_num_queries(1):
        supervisor.refresh_workers(timezone.now())
    fresh = set(Worker.objects.filter(last_heartbeat__gt=old).values_list("name", flat=True))
    assert fresh == {f"{settings.WORKER_NODE}:101", f"{settings.WORKER_NODE}:102"}


def test_the_registry_row_holds_a_long_queue_list_and_a_failing_step_does_not_stop_recovery(supervisor, monkeypatch):
    """Twenty providers' queue names overflow the registry's queue column: it is summarised.
    And when the registry write fails anyway, the recovery sweep of the same round still runs."""
    from tasks.models import Worker

    for n in range(20):
        Provider.objects.create(name=f"p{n}")
    supervisor.refresh_providers(force=True)
    supervisor.tick()
    row = Worker.objects.get(name=supervisor.name)
    assert len(row.queue) <= 100 and row.queue.endswith("more)") and row.role == "supervisor"
    assert sup.summarize_queues(["provider-1", "provider-2"], 100) == "provider-1,provider-2"
    assert sup.summarize_queues([], 100) == "-"

    swept = []
    monkeypatch.setattr(supervisor, "heartbeat", lambda: 1 / 0)
    monkeypatch.setattr(supervisor, "sweep", lambda: swept.append(True))
    supervisor.last_heartbeat = -1e9
    supervisor.sweep_enabled = True
    supervisor.tick()
    assert swept == [True]


def test_the_idle_sweep_is_one_query_whatever_the_number_of_providers(supervisor, django_assert_max_num_queries):
    for n in range(40):
        Provider.objects.create(name=f"p{n}", enable_task_polling=True, task_poll_interval=1)
    supervisor.refresh_providers(force=True)
    supervisor.last_reconcile = supervisor.last_safety = sup.time.monotonic()
    with django_assert_max_num_queries(1):
        supervisor.sweep()


def test_the_live_summary_tells_what_the_sweep_must_do(supervisor, alice, settings):
    from datetime import timedelta

    from django.utils import timezone

    from tasks.models import Instance, Task

    provider = Provider.objects.create(name="p")
    other = Provider.objects.create(name="q")
    instance = Instance.objects.create(owner=alice, provider=provider, name="i", live_name="i", image="x")
    assert sup.live_summary() == sup.LiveSummary()
    now = timezone.now()
    base = dict(task_type="start", owner=alice, initiator=alice, instance=instance)
    Task.objects.create(provider=other, status="pending", **base)
    summary = sup.live_summary()
    assert summary.waiting == {other.pk} and not summary.expired and not summary.stale_dispatch
    Task.objects.create(provider=provider, status="running", lease_expires_at=now + timedelta(seconds=30), **base)
    assert sup.live_summary().executing == 1 and not sup.live_summary().expired
    Task.objects.create(provider=provider, status="cancelling", lease_expires_at=now - timedelta(seconds=1), **base)
    assert sup.live_summary().expired
    stale = now - timedelta(seconds=settings.TASK_DISPATCH_TIMEOUT_SECONDS + 1)
    Task.objects.create(provider=provider, status="pending", admitted_at=stale, dispatched_at=stale, **base)
    assert sup.live_summary().stale_dispatch
    # A force-stopped task whose revoked lease ran out still holds its slot: the sweep frees it.
    Task.objects.create(provider=provider, status="cancelled", held_until=now + timedelta(seconds=5), **base)
    assert not sup.live_summary().hold_expired
    Task.objects.filter(held_until__isnull=False).update(held_until=now - timedelta(seconds=1))
    assert sup.live_summary().hold_expired


def test_a_second_supervisor_of_the_node_is_refused_and_leftovers_are_killed(supervisor, tmp_path):
    import subprocess
    import sys

    # A leftover of an old supervisor (pid that no longer runs) of this node.
    env = dict(os.environ, WORKER_NODE=sup.settings.WORKER_NODE, WORKER_SUPERVISOR=f"{sup.settings.WORKER_NODE}:999999")
    leftover = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)
    # Another node's process is not touched.
    other_env = dict(os.environ, WORKER_NODE="elsewhere", WORKER_SUPERVISOR="elsewhere:999999")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=other_env)
    try:
        supervisor.acquire()
        assert leftover.wait(5) == -9
        assert other.poll() is None
        second = sup.Supervisor(scheduler=False)
        second.run_dir = supervisor.run_dir
        with pytest.raises(sup.AlreadyRunning, match="another run_workers"):
            second.acquire()
    finally:
        other.kill()
        leftover.kill()


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


def test_a_large_grow_is_split_into_clusters_that_start_side_by_side(supervisor, monkeypatch, alice):
    """80 tasks at once: the workers come as several clusters (their sentinels fork in
    parallel), and the grow counts as done only once all of them are listed."""
    provider = Provider.objects.create(name="a", allow_concurrent_tasks=True, max_concurrent_tasks=80)
    pool = FakePool(supervisor)
    monkeypatch.setattr(supervisor, "backlog", lambda: 78)
    admitted(alice, provider, 40)
    supervisor.reconcile_pool()
    assert pool.commands == ["grow 16", "grow 16", "grow 16", "grow 15", "grow 15"]
    assert sup.grow_chunks(16) == [16] and sup.grow_chunks(17) == [9, 8]
    for i, workers in enumerate([16, 16, 16, 15]):
        pool.grown(f"pool-{i + 2}", workers)
        supervisor.reconcile_pool()
        assert len(pool.commands) == 5, "no second grow while its clusters are still starting"
    assert supervisor.growing is not None
    pool.grown("pool-6", 15)
    supervisor.reconcile_pool()
    assert supervisor.growing is None and len(pool.commands) == 5, "all listed, and 80 workers: at the cap"


def running_here(alice, provider, n, settings):
    """n tasks of ``provider`` running on this machine."""
    tasks_on(alice, provider, n, status="running", worker=f"{settings.WORKER_NODE}:1")


def test_a_pool_whose_workers_are_all_busy_grows_before_another_providers_job_waits(
    supervisor, monkeypatch, alice, settings
):
    """Provider A's backlog fills the two base workers (its limit is 2): without a free
    worker, B's next job would wait in the broker until a grow. The pool says none of its
    workers waited for a job over its last window, and the supervisor grows it then."""
    a = Provider.objects.create(name="a", allow_concurrent_tasks=True, max_concurrent_tasks=2)
    Provider.objects.create(name="b", allow_concurrent_tasks=True, max_concurrent_tasks=2)
    supervisor.refresh_providers(force=True)
    pool = FakePool(supervisor)
    monkeypatch.setattr(supervisor, "backlog", lambda: 0)
    running_here(alice, a, 2, settings)
    pool.idle = 1
    supervisor.reconcile_pool()
    assert pool.commands == [], "a worker is free"
    pool.idle = 0
    pool.rows[0].running = False
    supervisor.reconcile_pool()
    assert pool.commands == [], "a cluster still starting: its workers are not counted yet"
    pool.rows[0].running = True
    supervisor.reconcile_pool()
    assert pool.commands == ["grow 2"], "2 running, doubled: 4, within the cap of 4 (the sum of the limits)"
    pool.grown("pool-2", 2)
    supervisor.reconcile_pool()
    supervisor.last_headroom = -1e9
    supervisor.reconcile_pool()
    assert pool.commands == ["grow 2"], "at the cap: no more, whatever the pool says"


def test_an_idle_extra_cluster_stays_while_it_is_the_pools_only_room(supervisor, monkeypatch, alice, settings):
    settings.WORKER_POOL_IDLE_SECONDS = 60.0
    a = Provider.objects.create(name="a", allow_concurrent_tasks=True, max_concurrent_tasks=2)
    Provider.objects.create(name="b", allow_concurrent_tasks=True, max_concurrent_tasks=20)
    supervisor.refresh_providers(force=True)
    pool = FakePool(supervisor)
    pool.grown("pool-2", 2)
    running_here(alice, a, 2, settings)  # on the base cluster's two workers
    clock = {"now": 1000.0}
    monkeypatch.setattr(sup.time, "monotonic", lambda: clock["now"])
    pool.idle = 2  # the extra cluster's two
    supervisor.retire_idle()
    clock["now"] += 61
    supervisor.retire_idle()
    assert pool.commands == [], "retired, the next job of another provider would wait for a grow"
    pool.idle = 4  # A's backlog is done: the base cluster's workers wait too
    clock["now"] += 61
    supervisor.retire_idle()
    assert pool.commands == ["retire pool-2"]
    # A cluster larger than the room a grow would make (twice the demand) goes all the same.
    pool.rows[1:] = []
    pool.grown("pool-3", 16)
    pool.idle = 16
    supervisor.retire_idle()
    clock["now"] += 61
    supervisor.retire_idle()
    assert pool.commands[-1] == "retire pool-3", "16 idle workers for 2 running tasks: a grow of 2 replaces them"
