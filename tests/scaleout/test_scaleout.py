"""Several worker machines on one MariaDB and Redis, and the faults they must survive.

Three `run_workers` processes stand in for three machines (each its own
WORKER_NODE). They use a Redis of the test's own (so it can be restarted) and
reach MariaDB through a TCP proxy the test controls (so the database can
"go away"). The test process produces tasks straight to MariaDB and Redis.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter, defaultdict

import pytest
from django.db import connection
from django_q.conf import Conf

from tasks import services
from tasks.engine import dispatch
from tasks.engine.states import FINAL
from tasks.models import Instance, Provider, Task, TaskEvent
from tests.engine.harness import (
    WorkerTier,
    add_simulated_guests,
    kill_node_processes,
    read_exec_log,
    read_exec_starts,
    wait_until,
)
from tests.scaleout.faults import PrivateRedis, TcpProxy

pytestmark = [pytest.mark.mariadb, pytest.mark.processes, pytest.mark.django_db(transaction=True)]

LIMITS = (1, 2, 3, 1, 2, 3)


@pytest.fixture
def redis_server(tmp_path, monkeypatch):
    server = PrivateRedis(tmp_path).start()
    # This process enqueues to the same Redis as the workers.
    monkeypatch.setattr(Conf, "ORM", None)
    monkeypatch.setattr(Conf, "REDIS", server.url)
    monkeypatch.setattr(Conf, "BROKER_CLASS", "tasks.engine.broker.RedisBroker")
    dispatch._brokers.clear()
    yield server
    dispatch._brokers.clear()
    server.stop()


@pytest.fixture
def db_proxy():
    d = connection.settings_dict
    proxy = TcpProxy(d["HOST"] or "127.0.0.1", int(d["PORT"] or 3306)).start()
    yield proxy
    proxy.stop()


def tier_env(redis_server, db_proxy) -> dict:
    d = connection.settings_dict
    return {
        "Q_BROKER": "redis",
        "REDIS_URL": redis_server.url,
        "DATABASE_URL": f"mysql://{d['USER']}:{d['PASSWORD']}@127.0.0.1:{db_proxy.port}/{d['NAME']}",
    }


def wait_all_terminal(ids: list[int], timeout: float) -> None:
    """Wait for every task of ``ids`` to end; on a timeout, say where the others stand."""
    try:
        wait_until(lambda: not Task.objects.filter(pk__in=ids).exclude(status__in=FINAL).exists(), timeout, 0.5)
    except AssertionError:
        stuck = Task.objects.filter(pk__in=ids).exclude(status__in=FINAL).order_by("pk")
        rows = [
            f"{t.pk} p{t.provider_id} {t.status} admitted={t.admitted_at} dispatched={t.dispatched_at}"
            f" started={t.started_at} lease={t.lease_expires_at} worker={t.worker} msg={t.status_message!r}"
            for t in stuck[:20]
        ]
        raise AssertionError(f"{stuck.count()} tasks not terminal after {timeout} s:\n" + "\n".join(rows)) from None


def setup_providers(owner, per_provider: int) -> list[tuple[Provider, list[Instance]]]:
    out = []
    for i, limit in enumerate(LIMITS):
        provider = Provider.objects.create(
            name=f"so{i}", allow_concurrent_tasks=limit > 1, max_concurrent_tasks=limit, task_poll_interval=1
        )
        tag = uuid.uuid4().hex[:6]
        names = [f"so{i}-{tag}-{n}" for n in range(per_provider)]
        instances = Instance.objects.bulk_create(
            Instance(owner=owner, provider=provider, name=n, live_name=n, image="debian/12", status="running")
            for n in names
        )
        add_simulated_guests(provider, instances)
        out.append((provider, instances))
    return out


def wait_for_pushers(redis_server, count: int) -> None:
    """Until ``count`` django-q2 pushers block on the queues (every machine's pool is up).

    Hand-over keeps a provider's backlog on the worker that ran its first task, so
    a machine that is still starting when the first jobs go out may get none.
    """
    import redis

    client = redis.Redis.from_url(redis_server.url)
    seen = [0]

    def ready() -> bool:
        seen[0] = sum(c.get("cmd") == "blpop" for c in client.client_list())
        return seen[0] >= count

    try:
        wait_until(ready, 120, 0.2, f"{count} django-q2 pushers waiting on Redis")
    except AssertionError as exc:
        raise AssertionError(f"{exc} (saw {seen[0]})") from None
    finally:
        client.close()


def check_limits_and_fifo(tasks: list[Task], resumed: set[int] = frozenset()) -> None:
    """``resumed``: tasks sent back to pending (issue 16) are left out: their started_at is
    their first start and their admitted_at their re-admission, so neither says when
    they ran (their re-runs are checked against their resumptions by the caller)."""
    tasks = [t for t in tasks if t.pk not in resumed]
    limit_of = {p.pk: p.concurrency_limit for p in Provider.objects.all()}
    groups = defaultdict(list)
    for t in tasks:
        groups[t.provider_id].append(t)
    for pid, group in groups.items():
        points = []
        for t in group:
            if t.started_at and t.completed_at:
                points += [(t.started_at.timestamp(), 1), (t.completed_at.timestamp(), -1)]
        running = 0
        for _, delta in sorted(points):
            running += delta
            assert running <= limit_of[pid], f"provider {pid} ran {running} > {limit_of[pid]}"
        ordered = sorted(group, key=lambda t: (t.created_at, t.pk))
        admitted = [t.admitted_at for t in ordered if t.admitted_at]
        if admitted != sorted(admitted):
            bad = [(t.pk, t.created_at.time(), t.admitted_at.time(), t.dispatch_count, t.status) for t in ordered[:12]]
            raise AssertionError(f"provider {pid}: admission not FIFO: {bad}")


def test_three_machines_share_the_limits(alice, tmp_path, redis_server, db_proxy):
    rng = random.Random(3)
    setup = setup_providers(alice, 100)
    log = tmp_path / "exec.log"
    env = tier_env(redis_server, db_proxy)
    nodes = [f"m{uuid.uuid4().hex[:5]}{i}" for i in range(3)]
    # No faults here: a longer lease, so a starved heartbeat on 2 busy cores is not taken for a death.
    tiers = [WorkerTier(tmp_path, n, exec_log=log, TASK_LEASE_SECONDS="10", **env).start() for n in nodes]
    try:
        wait_for_pushers(redis_server, len(nodes))  # one pool, so one pusher, per machine
        ids = []
        for n in range(100):
            for _provider, instances in setup:
                ids.append(
                    services.request_operation(
                        alice, instances[n].pk, "restart", task_data={"sleep": rng.uniform(0, 0.05)}
                    ).pk
                )
        wait_all_terminal(ids, 240)
    finally:
        for tier in tiers:
            tier.stop()
            kill_node_processes(tier.node)
    tasks = list(Task.objects.filter(pk__in=ids))
    assert Counter(t.status for t in tasks) == {"completed": 600}
    starts = Counter(read_exec_starts(log))
    assert len(starts) == 600 and max(starts.values()) == 1, "every task ran, none twice"
    check_limits_and_fifo(tasks)
    workers_used = {t.worker.split(":")[0] for t in tasks}
    assert len(workers_used) >= 2, f"the work was shared between machines: {workers_used}"


def test_faults_kill_redis_restart_and_database_outage(alice, tmp_path, redis_server, db_proxy):
    rng = random.Random(5)
    setup = setup_providers(alice, 40)
    log = tmp_path / "exec.log"
    env = tier_env(redis_server, db_proxy)
    nodes = [f"f{uuid.uuid4().hex[:5]}{i}" for i in range(3)]
    tiers = [WorkerTier(tmp_path, n, exec_log=log, **env).start() for n in nodes]
    ids: list[int] = []
    producing = threading.Event()

    def produce():
        try:
            for n in range(40):
                for _provider, instances in setup:
                    ids.append(
                        services.request_operation(
                            alice,
                            instances[n].pk,
                            "restart",
                            task_data={"sleep": 3.0 if n % 5 == 0 else rng.uniform(0.05, 0.6)},
                        ).pk
                    )
                time.sleep(0.05)
        finally:
            connection.close()
            producing.set()

    try:
        producer = threading.Thread(target=produce)
        producer.start()
        wait_until(lambda: Task.objects.filter(status="completed").count() >= 20, 90, 0.2, "work under way")

        # 1. A machine dies: SIGKILL every process of a machine running a long task (which one
        # is up to the broker and to hand-over, which keeps a provider's backlog on one worker).
        def long_running_by_machine():
            running = Task.objects.filter(status="running", task_data__sleep__gte=2).values_list("pk", "worker")
            by_node: dict[str, set[int]] = {}
            for pk, worker in running:
                by_node.setdefault(worker.rsplit(":", 1)[0], set()).add(pk)
            return by_node

        node, victim_running = next(iter(wait_until(long_running_by_machine, 60, 0.01, "a long task running").items()))
        victim = next(t for t in tiers if t.node == node)
        victim.kill()
        killed_at = time.time()
        # 2. Redis restarts: every job queued in it is lost.
        time.sleep(1)
        redis_server.restart()
        # 3. The database refuses connections for 3 seconds.
        time.sleep(1)
        db_proxy.outage(3)
        producer.join(120)
        assert producing.is_set()
        wait_all_terminal(ids, 240)
    finally:
        for tier in tiers:  # (the killed one only has its log closed)
            tier.stop()
        for n in nodes:
            kill_node_processes(n)
    tasks = {t.pk: t for t in Task.objects.filter(pk__in=ids)}
    assert len(tasks) == 240 and all(t.status in FINAL for t in tasks.values())
    starts = Counter(read_exec_starts(log))
    resumed = Counter(
        TaskEvent.objects.filter(task_id__in=ids, from_status="running", to_status="pending").values_list(
            "task_id", flat=True
        )
    )
    for pk, n in starts.items():
        assert n <= 1 + resumed[pk], f"task {pk} ran {n} times, resumed {resumed[pk]} times"
    lost = {pk for pk, t in tasks.items() if t.status != "completed"}
    for pk in lost:  # (only after TASK_MAX_ATTEMPTS lost attempts)
        assert tasks[pk].error_code == "worker_lost", f"task {pk}: {tasks[pk].status} {tasks[pk].error_code}"
    # What ran on the killed machine either finished before the kill or was resumed elsewhere.
    assert victim_running
    for pk in victim_running:
        t = tasks[pk]
        assert resumed[pk] or t.completed_at.timestamp() <= killed_at, f"task {pk} of the dead machine: {t.status}"
    assert any(resumed[pk] for pk in victim_running), "the kill caught running work, and it was resumed"
    completed = [pk for pk, t in tasks.items() if t.status == "completed"]
    assert all(1 <= starts[pk] <= 1 + resumed[pk] for pk in completed)
    ends = {row[0] for row in read_exec_log(log)}
    assert set(completed) <= ends
    check_limits_and_fifo(list(tasks.values()), resumed=set(resumed))
