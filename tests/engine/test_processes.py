"""The execution engine with real worker-tier processes on MariaDB.

Each test starts `manage.py run_workers` subprocesses (one per simulated
machine) against the test database, with short leases (tests/engine/harness.py)
and the sleep operations of tests/engine/ops_for_tests.py.
"""

from __future__ import annotations

import os
import random
import signal
import time
import uuid
from collections import Counter, defaultdict

import pytest
from django.db import connection

from tasks import services
from tasks.engine.states import FINAL
from tasks.errors import NotCancellable
from tasks.models import Instance, Provider, Task, TaskEvent
from tests.engine.harness import FAST, WorkerTier, add_simulated_guests, read_exec_log, wait_until

pytestmark = [pytest.mark.mariadb, pytest.mark.processes, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def node():
    return f"t{uuid.uuid4().hex[:6]}"


def make_provider(name: str, limit: int) -> Provider:
    return Provider.objects.create(
        name=name, allow_concurrent_tasks=limit > 1, max_concurrent_tasks=limit, task_poll_interval=1
    )


def make_instances(owner, provider: Provider, n: int) -> list[Instance]:
    tag = uuid.uuid4().hex[:6]
    names = [f"{provider.name}-{tag}-{i}" for i in range(n)]
    instances = Instance.objects.bulk_create(
        Instance(owner=owner, provider=provider, name=name, live_name=name, image="debian/12", status="running")
        for name in names
    )
    add_simulated_guests(provider, instances)
    return instances


def queue(owner, instance: Instance, **data) -> Task:
    timeout = data.pop("timeout_seconds", None)
    return services.request_operation(owner, instance.pk, "restart", task_data=data, timeout_seconds=timeout)


def all_final(ids) -> bool:
    return not Task.objects.filter(pk__in=ids).exclude(status__in=FINAL).exists()


def max_concurrency(tasks: list[Task]) -> list[tuple[float, int]]:
    """(time, running count) after each start, from the recorded start/end times."""
    points = []
    for t in tasks:
        points.append((t.started_at.timestamp(), 1))
        points.append((t.completed_at.timestamp(), -1))
    points.sort(key=lambda p: (p[0], p[1]))  # an end at the same instant frees first
    running, out = 0, []
    for at, delta in points:
        running += delta
        out.append((at, running))
    return out


def test_limits_hold_globally_fifo_and_all_complete(alice, tmp_path, node):
    rng = random.Random(7)
    providers = [make_provider(f"p{limit}", limit) for limit in (1, 2, 3)]
    instances = {p.pk: make_instances(alice, p, 100) for p in providers}
    log = tmp_path / "exec.log"
    tiers = [WorkerTier(tmp_path, f"{node}{i}", exec_log=log).start() for i in range(2)]
    try:
        ids = []
        for i in range(100):
            for p in providers:
                ids.append(queue(alice, instances[p.pk][i], sleep=rng.uniform(0, 0.05)).pk)
            if i == 50:
                # Raise p1's limit mid-run: it applies at the next admission.
                Provider.objects.filter(pk=providers[0].pk).update(allow_concurrent_tasks=True, max_concurrent_tasks=2)
                changed_at = time.time()
        wait_until(lambda: all_final(ids), 180, 0.5, "300 tasks to finish")
    finally:
        for tier in tiers:
            tier.stop()
    tasks = list(Task.objects.filter(pk__in=ids).order_by("created_at", "id"))
    assert Counter(t.status for t in tasks) == {"completed": 300}
    runs = Counter(row[0] for row in read_exec_log(log))
    assert all(runs[t.pk] == 1 for t in tasks), "every task ran exactly once"
    assert {t.attempt_count for t in tasks} == {1}
    by_provider = defaultdict(list)
    for t in tasks:
        by_provider[t.provider_id].append(t)
    limits = {providers[0].pk: (1, 2), providers[1].pk: (2, 2), providers[2].pk: (3, 3)}
    for pid, group in by_provider.items():
        before, after = limits[pid]
        for at, running in max_concurrency(group):
            assert running <= (after if at >= changed_at else before), f"provider {pid}: {running} running at {at}"
        admitted = [t.admitted_at for t in group]
        assert admitted == sorted(admitted), f"provider {pid}: admission not FIFO"
    serial = [t for t in by_provider[providers[0].pk] if t.completed_at.timestamp() < changed_at]
    assert [t.started_at for t in serial] == sorted(t.started_at for t in serial)
    assert max(running for _, running in max_concurrency(by_provider[providers[2].pk])) >= 2, "p3 did run in parallel"


def test_a_hung_provider_does_not_delay_another(alice, tmp_path, node):
    slow, fast = make_provider("slow", 1), make_provider("fast", 1)
    hung = [queue(alice, inst, sleep=60) for inst in make_instances(alice, slow, 20)]
    with WorkerTier(tmp_path, node):
        wait_until(lambda: Task.objects.filter(pk=hung[0].pk, status="running").exists(), 20, message="hang to start")
        task = queue(alice, make_instances(alice, fast, 1)[0], sleep=0)
        started = wait_until(lambda: Task.objects.filter(pk=task.pk, started_at__isnull=False).first(), 5)
        assert (started.started_at - started.created_at).total_seconds() < 1.0
        for t in hung:
            services.force_stop_task(_root(), t.pk, reason="test over")


def _root():
    from django.contrib.auth import get_user_model

    return get_user_model().objects.get_or_create(username="root-admin", defaults={"is_staff": True})[0]


def test_cancel_pending_running_and_terminal(alice, tmp_path, node):
    provider = make_provider("c", 1)
    first, second = make_instances(alice, provider, 2)
    with WorkerTier(tmp_path, node):
        running = queue(alice, first, sleep=30)
        pending = queue(alice, second, sleep=0)
        wait_until(lambda: Task.objects.filter(pk=running.pk, status="running").exists(), 20, message="start")
        # Pending: cancelled at once.
        assert services.cancel_task(alice, pending.pk).status == "cancelled"
        # Running: cancelling, then cancelled within 2 s.
        asked = time.monotonic()
        assert services.cancel_task(alice, running.pk).status == "cancelling"
        wait_until(lambda: Task.objects.filter(pk=running.pk, status="cancelled").exists(), 2.0, message="cancelled")
        assert time.monotonic() - asked < 2.0
        with pytest.raises(NotCancellable):
            services.cancel_task(alice, running.pk)
        # The instance and the slot are free again.
        after = queue(alice, first, sleep=0)
        wait_until(lambda: Task.objects.filter(pk=after.pk, status="completed").exists(), 10, message="next task")


def test_timeouts_end_timeout_and_free_the_slot(alice, tmp_path, node, settings):
    # This process enqueues the jobs: their django-q2 timeout is the task's + this grace.
    settings.TASK_HARD_KILL_GRACE_SECONDS = int(FAST["TASK_HARD_KILL_GRACE_SECONDS"])
    provider = make_provider("tmo", 3)
    polite, stubborn, deaf, after = make_instances(alice, provider, 4)
    with WorkerTier(tmp_path, node) as tier:
        t1 = queue(alice, polite, sleep=30, timeout_seconds=2)
        t2 = queue(alice, stubborn, sleep=30, ignore_cancel=True, timeout_seconds=2)
        t3 = queue(alice, deaf, sleep=30, ignore_cancel=True, block_sigalrm=True, timeout_seconds=2)
        wait_until(lambda: Task.objects.filter(pk=t1.pk, status="timeout").exists(), 7, message="polite timeout")
        t1.refresh_from_db()
        assert (t1.completed_at - t1.started_at).total_seconds() < 5
        # Ignores the cancel token: django-q2's hard timeout interrupts it (timeout + 1 s grace).
        wait_until(lambda: Task.objects.filter(pk=t2.pk, status="timeout").exists(), 10, message="stubborn timeout")
        last = t2.events.filter(kind="transition").last()
        assert last.actor.startswith("worker:"), f"recorded by the interrupted worker itself, not {last.actor}"
        # Blocks even that: the process is killed, recovery records timeout once the lease runs out.
        wait_until(lambda: Task.objects.filter(pk=t3.pk, status="timeout").exists(), 25, message="deaf timeout")
        t3.refresh_from_db()
        assert t3.error_code == "timeout"
        nxt = queue(alice, after, sleep=0)
        wait_until(lambda: Task.objects.filter(pk=nxt.pk, status="completed").exists(), 15, message="slot free")
        again = queue(alice, polite, sleep=0)
        wait_until(lambda: Task.objects.filter(pk=again.pk, status="completed").exists(), 15, message="instance free")
        assert "Traceback" not in tier.log() or "TimeoutException" in tier.log()


def test_an_operation_that_swallows_the_hard_timeout_is_killed_by_the_heartbeat(alice, tmp_path, node, settings):
    """It catches django-q2's TimeoutException and goes on: at deadline + grace + 2 s
    the heartbeat records `timeout` itself and kills the process; the slot is free."""
    settings.TASK_HARD_KILL_GRACE_SECONDS = int(FAST["TASK_HARD_KILL_GRACE_SECONDS"])
    provider = make_provider("swallow", 1)
    swallower, after = make_instances(alice, provider, 2)
    with WorkerTier(tmp_path, node) as tier:
        task = queue(alice, swallower, sleep=60, swallow_timeout=True, timeout_seconds=2)
        nxt = queue(alice, after, sleep=0)
        wait_until(lambda: Task.objects.filter(pk=task.pk, status="timeout").exists(), 12, message="killed")
        task.refresh_from_db()
        # Deadline 2 s + grace 1 s + the heartbeat's 2 s, well before the lease (3 s) would run out
        # after a kill by django-q2's guard (at the job's timeout, 30 s of hand-over later).
        assert (task.completed_at - task.started_at).total_seconds() < 8
        assert task.error_message == "killed at the hard timeout"
        assert task.events.filter(kind="transition").last().actor.startswith("worker:")
        wait_until(lambda: Task.objects.filter(pk=nxt.pk, status="completed").exists(), 15, message="slot free")
        assert "still running past its hard timeout" in tier.log()


def resumed(task: Task, reason: str = "resumed:worker_lost") -> int:
    return TaskEvent.objects.filter(task_id=task.pk, from_status="running", to_status="pending", reason=reason).count()


def test_a_killed_worker_is_recovered_and_others_are_untouched(alice, tmp_path, node):
    victim_provider, other_provider = make_provider("victim", 1), make_provider("other", 1)
    victim_inst = make_instances(alice, victim_provider, 1)[0]
    other_inst = make_instances(alice, other_provider, 1)[0]
    with WorkerTier(tmp_path, node):
        doomed = queue(alice, victim_inst, sleep=4)
        healthy = queue(alice, other_inst, sleep=6)
        wait_until(lambda: Task.objects.filter(pk__in=[doomed.pk, healthy.pk], status="running").count() == 2, 20)
        doomed.refresh_from_db()
        pid = int(doomed.worker.rsplit(":", 1)[1])
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(lambda: resumed(doomed) == 1, 10, message="resumed")
        bound = time.monotonic() - killed_at
        assert bound < 3 + 0.5 + 3, f"recovered in {bound:.1f} s (bound: lease + sweep, plus scheduling slack)"
        # Resumed by another worker process: it completes, its instance kept for it all along.
        wait_until(lambda: Task.objects.filter(pk=doomed.pk, status__in=FINAL).exists(), 20, message="resumed run")
        doomed.refresh_from_db()
        assert (doomed.status, doomed.attempt_count, doomed.error_code) == ("completed", 2, "")
        victim_inst.refresh_from_db()
        assert victim_inst.active_task_id is None
        # The next task on that provider and instance runs.
        nxt = queue(alice, victim_inst, sleep=0)
        wait_until(lambda: Task.objects.filter(pk=nxt.pk, status="completed").exists(), 15, message="next task")
        # The task on the other worker was never touched.
        wait_until(lambda: Task.objects.filter(pk=healthy.pk, status="completed").exists(), 15)
        healthy.refresh_from_db()
        assert healthy.attempt_count == 1 and healthy.error_code == ""


def test_a_task_on_a_machine_that_dies_is_resumed_by_another(alice, tmp_path, node):
    provider = make_provider("dies", 1)
    inst = make_instances(alice, provider, 1)[0]
    first = WorkerTier(tmp_path, node).start()
    task = queue(alice, inst, sleep=3)
    wait_until(lambda: Task.objects.filter(pk=task.pk, status="running").exists(), 20)
    first.kill()  # kill -9 of the whole tier
    task.refresh_from_db()
    assert task.status == "running"
    with WorkerTier(tmp_path, node + "b"):
        wait_until(lambda: Task.objects.filter(pk=task.pk, status__in=FINAL).exists(), 30, message="resumed")
    task.refresh_from_db()
    assert (task.status, task.attempt_count, resumed(task)) == ("completed", 2, 1)
    assert task.worker.startswith(node + "b:")


def test_a_task_that_kills_its_worker_ends_failed_after_three_attempts(alice, tmp_path, node):
    provider = make_provider("poison", 1)
    poison_inst, next_inst = make_instances(alice, provider, 2)
    with WorkerTier(tmp_path, node):
        poison = queue(alice, poison_inst, kill_self=True)
        after = queue(alice, next_inst, sleep=0)
        wait_until(lambda: Task.objects.filter(pk=poison.pk, status__in=FINAL).exists(), 45, message="poison ends")
        poison.refresh_from_db()
        assert (poison.status, poison.error_code, poison.attempt_count) == ("failed", "worker_lost", 3)
        assert resumed(poison) == 2
        # The queue behind it moves on.
        wait_until(lambda: Task.objects.filter(pk=after.pk, status="completed").exists(), 15, message="next")


def test_restart_loses_nothing_and_runs_nothing_twice(alice, tmp_path, node):
    provider = make_provider("rs", 1)
    log = tmp_path / "exec.log"
    tasks = [queue(alice, inst, sleep=0.2) for inst in make_instances(alice, provider, 25)]
    ids = [t.pk for t in tasks]
    tier = WorkerTier(tmp_path, node, exec_log=log).start()
    wait_until(lambda: Task.objects.filter(pk__in=ids, status="completed").count() >= 3, 30, message="some done")
    assert tier.stop() == 0
    done_before = Task.objects.filter(pk__in=ids, status__in=FINAL).count()
    assert done_before < 25
    with WorkerTier(tmp_path, node + "b", exec_log=log):
        wait_until(lambda: all_final(ids), 60, 0.2, "all tasks after restart")
    statuses = Counter(Task.objects.filter(pk__in=ids).values_list("status", flat=True))
    assert statuses["completed"] >= 24 and sum(statuses.values()) == 25
    runs = Counter(row[0] for row in read_exec_log(log))
    assert max(runs.values()) == 1, "no task ran twice"
    assert all(runs[pk] == 1 for pk in Task.objects.filter(pk__in=ids, status="completed").values_list("pk", flat=True))
    connection.close()


def test_graceful_shutdown_finishes_short_tasks_and_hands_back_long_ones(alice, tmp_path, node):
    provider = make_provider("gs", 2)
    short_inst, long_inst = make_instances(alice, provider, 2)
    tier = WorkerTier(tmp_path, node).start()
    short = queue(alice, short_inst, sleep=1.0)
    long = queue(alice, long_inst, sleep=8)
    wait_until(lambda: Task.objects.filter(pk__in=[short.pk, long.pk], status="running").count() == 2, 20)
    stopping = time.monotonic()
    assert tier.stop(timeout=30) == 0
    took = time.monotonic() - stopping
    short.refresh_from_db()
    long.refresh_from_db()
    assert short.status == "completed", "a task that ends within the grace period finishes"
    assert long.status == "pending", "the rest is handed back at once"
    assert resumed(long, "resumed:handback") == 1 and resumed(long) == 0
    long_inst.refresh_from_db()
    assert long_inst.active_task_id == long.pk
    assert took < 2 + 3 + 5, f"shutdown took {took:.1f} s"
    # Another machine resumes it, and it completes.
    with WorkerTier(tmp_path, node + "b"):
        wait_until(lambda: Task.objects.filter(pk=long.pk, status__in=FINAL).exists(), 30, message="resumed")
    long.refresh_from_db()
    assert (long.status, long.attempt_count) == ("completed", 2)


def test_tier_follows_provider_changes_while_running(alice, tmp_path, node):
    first = make_provider("pc1", 1)
    with WorkerTier(tmp_path, node):
        # A provider added while the tier runs gets served.
        added = make_provider("pc2", 1)
        task = queue(alice, make_instances(alice, added, 1)[0], sleep=0)
        wait_until(lambda: Task.objects.filter(pk=task.pk, status="completed").exists(), 20, message="new provider")
        # A raised limit gets more workers without touching running tasks.
        # (It lasts past TASK_DISPATCH_TIMEOUT_SECONDS, 5 s here: see below.)
        running = queue(alice, make_instances(alice, added, 1)[0], sleep=8)
        wait_until(lambda: Task.objects.filter(pk=running.pk, status="running").exists(), 10)
        Provider.objects.filter(pk=added.pk).update(allow_concurrent_tasks=True, max_concurrent_tasks=3)
        p = Provider.objects.get(pk=added.pk)
        raised = time.time()
        p.save()  # the post_save wake-up admits at once
        extra = [queue(alice, inst, sleep=1) for inst in make_instances(alice, added, 2)]
        # Both extras start while the first task still runs (the pool grows if its idle
        # size is not enough), before the jobs a busy cluster's pusher took (it blocks on
        # its full queue with one in hand) would be sent again for being unclaimed
        # (TASK_DISPATCH_TIMEOUT_SECONDS, 5 s here).
        wait_until(lambda: all_final([running.pk, *(e.pk for e in extra)]), 25, message="all three to finish")
        done = {t.pk: t for t in Task.objects.filter(pk__in=[running.pk, *(e.pk for e in extra)])}
        assert {t.status for t in done.values()} == {"completed"}
        starts = [done[e.pk].started_at.timestamp() - raised for e in extra]
        assert max(starts) < 5.0, starts
        assert all(done[e.pk].started_at < done[running.pk].completed_at for e in extra)
        assert max(n for _, n in max_concurrency(list(done.values()))) >= 2
        assert done[running.pk].attempt_count == 1  # never touched: one claim, one run
        # A disabled provider admits nothing more.
        Provider.objects.filter(pk=first.pk).update(enabled=False)
        blocked = queue(alice, make_instances(alice, first, 1)[0], sleep=0)
        time.sleep(1.5)
        blocked.refresh_from_db()
        assert blocked.status == "pending" and blocked.admitted_at is None
        from tasks.engine.dispatch import queue_info

        assert queue_info(blocked)["blocked_reason"] == "provider disabled"
        services.cancel_task(alice, blocked.pk)


def test_an_unreachable_provider_holds_its_queue_until_it_answers(alice, tmp_path, node):
    provider = make_provider("down", 1)
    instances = make_instances(alice, provider, 4)
    Provider.objects.filter(pk=provider.pk).update(connection={"unreachable": True})
    # reset-password: a real operation (this module's test operations replace start/stop/restart).
    tasks = [services.request_operation(alice, i.pk, "reset-password") for i in instances]
    env = {"PROVIDER_PROBE_SECONDS": "1", "TASK_RETRY_BASE_SECONDS": "0.05", "SIMULATED_SPEED": "0.01"}
    with WorkerTier(tmp_path, node, **env):
        first = wait_until(
            lambda: Task.objects.filter(pk=tasks[0].pk, status="failed").first(), 20, message="the first to fail"
        )
        assert first.error_code == "provider_unreachable"
        time.sleep(2.5)  # two probe rounds fail meanwhile; nothing else starts
        held = Task.objects.filter(pk__in=[t.pk for t in tasks[1:]])
        assert set(held.values_list("status", "admitted_at")) == {("pending", None)}
        assert Provider.objects.get(pk=provider.pk).unreachable_since is not None
        # The host is back: a probe answers within PROVIDER_PROBE_SECONDS and the queue drains.
        Provider.objects.filter(pk=provider.pk).update(connection={})
        wait_until(lambda: all_final([t.pk for t in tasks]), 20, message="the held tasks to run")
    assert [Task.objects.get(pk=t.pk).status for t in tasks] == ["failed", "completed", "completed", "completed"]
    assert Provider.objects.get(pk=provider.pk).unreachable_since is None


def node_processes(node: str) -> list[int]:
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "environ"]):
        try:
            if (proc.info["environ"] or {}).get("WORKER_NODE") == node and proc.pid != os.getpid():
                found.append(proc.pid)
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
    return found


def test_killing_the_supervisor_stops_its_whole_pool_at_once(alice, tmp_path, node):
    """Outside systemd (./run.sh), kill -9 of run_workers must not leave its pool serving jobs."""
    provider = make_provider("orphan", 2)
    tier = WorkerTier(tmp_path, node, WORKER_POOL_MIN="2").start().wait_ready()
    try:
        assert len(node_processes(node)) >= 6, "supervisor, pool, sentinel, pusher, monitor, 2 workers"
        running = queue(alice, make_instances(alice, provider, 1)[0], sleep=6)
        wait_until(lambda: Task.objects.filter(pk=running.pk, status="running").exists(), 20)
        os.kill(tier.proc.pid, signal.SIGKILL)  # the supervisor alone
        killed = time.monotonic()
        wait_until(lambda: not node_processes(node), 5, message="every pool process to die with the supervisor")
        assert time.monotonic() - killed < 3
        # A new tier of the node starts (no leftover holds it) and resumes the task.
        with WorkerTier(tmp_path, node):
            wait_until(lambda: Task.objects.get(pk=running.pk).status in FINAL, 30, message="recovery")
        running.refresh_from_db()
        assert (running.status, running.attempt_count, resumed(running)) == ("completed", 2, 1)
    finally:
        tier.kill()


def test_the_pool_grows_while_jobs_wait_and_shrinks_when_idle(alice, tmp_path, node):
    """Idle: 2 workers. Six admitted at once on a provider of limit 6: the pool grows and
    each starts within 2 s of its admission; idle again, the extra cluster is stopped."""
    provider = make_provider("elastic", 6)
    instances = make_instances(alice, provider, 6)
    env = {"WORKER_POOL_MIN": "2", "WORKER_POOL_IDLE_SECONDS": "2"}
    with WorkerTier(tmp_path, node, **env) as tier:
        idle = len(node_processes(node))
        tasks = [queue(alice, inst, sleep=4) for inst in instances]
        wait_until(lambda: all_final([t.pk for t in tasks]), 30, message="all six")
        done = list(Task.objects.filter(pk__in=[t.pk for t in tasks]))
        assert {t.status for t in done} == {"completed"}
        delays = sorted((t.started_at - t.admitted_at).total_seconds() for t in done)
        assert delays[-1] < 2.0, delays
        assert max(n for _, n in max_concurrency(done)) == 6, "all six ran at once: the pool grew"
        assert "extra cluster pool-2 started" in tier.log()
        wait_until(lambda: "pool: stopping cluster pool-2" in tier.log(), 15, message="the idle extra cluster to stop")
        wait_until(lambda: len(node_processes(node)) == idle, 15, message="back to the idle pool")
