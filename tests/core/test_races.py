"""Races with real threads on MariaDB, where row locks are real."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connection
from django.utils import timezone

from tasks import services
from tasks.engine import transitions
from tasks.engine.states import FINAL, TRANSITIONS
from tasks.errors import InstanceBusy
from tasks.models import Task, TaskEvent
from tests.conftest import make_task

pytestmark = [pytest.mark.mariadb, pytest.mark.django_db(transaction=True)]

THREADS = 8


def _close(_=None):
    connection.close()


def test_cancel_start_complete_race_ends_in_one_legal_terminal_state(running_instance):
    rng = random.Random(20261128)
    actions = [
        lambda t: transitions.claim(t, token="tok", worker="w1"),
        lambda t: transitions.claim(t, token="tok", worker="w2"),
        lambda t: transitions.request_cancel(t, actor="user:alice", reason="race"),
        lambda t: transitions.request_cancel(t, actor="admin:root", reason="race", by_admin=True),
        lambda t: transitions.finish(t, "completed", token="tok", actor="w1"),
        lambda t: transitions.finish(t, "failed", token="tok", actor="w1", error_code="provider_error"),
        lambda t: transitions.finish(t, "timeout", token="tok", actor="w1"),
        lambda t: transitions.force_stop(t, actor="admin:root", reason="race"),
        lambda t: transitions.finish(t, "cancelled", token="tok", actor="w1"),
    ]
    with ThreadPoolExecutor(THREADS) as pool:
        for _ in range(200):
            task = make_task(running_instance, lease_token="tok", admitted_at=timezone.now())
            barrier = threading.Barrier(THREADS)
            chosen = [rng.choice(actions) for _ in range(THREADS)]

            def run(action, task_id=task.pk, barrier=barrier):
                barrier.wait()
                return action(task_id)

            wins = sum(bool(r) for r in pool.map(run, chosen))
            task.refresh_from_db()
            if task.status not in FINAL:  # nobody ended it: the worker finishes
                wins += transitions.finish(task.pk, "completed", token=None, actor="driver")
                task.refresh_from_db()
            assert task.status in FINAL
            path = list(
                TaskEvent.objects.filter(task=task, kind="transition")
                .order_by("id")
                .values_list("from_status", "to_status")
            )
            assert len(path) == wins, "every successful transition wrote exactly one event"
            assert path[0][0] == "pending" and path[-1][1] == task.status
            for (_a, b), (c, _) in zip(path, path[1:], strict=False):
                assert b == c, f"broken path {path}"
            for a, b in path:
                assert a in TRANSITIONS[b], f"illegal step {a}->{b}"
        list(pool.map(_close, range(THREADS)))


def test_concurrent_requests_on_one_instance_create_exactly_one_task(alice, running_instance):
    barrier = threading.Barrier(THREADS)

    def request(_):
        barrier.wait()
        try:
            return services.request_operation(alice, running_instance.pk, "stop").pk
        except InstanceBusy as exc:
            return ("busy", exc.extra["active_task"])
        finally:
            connection.close()

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(request, range(THREADS)))
    created = [r for r in results if not isinstance(r, tuple)]
    assert len(created) == 1
    assert all(r == ("busy", created[0]) for r in results if isinstance(r, tuple))
    assert Task.objects.filter(instance=running_instance).count() == 1


def test_creates_and_finishes_racing_never_strand_a_task_nor_exceed_the_limit(alice, provider, make_instance):
    # No sweep runs here: every admission comes from the events (creates and finishes).
    provider.allow_concurrent_tasks, provider.max_concurrent_tasks = True, 2
    provider.save()
    instances = [make_instance(alice, provider) for _ in range(40)]
    created: list[int] = []
    done = threading.Event()
    intervals: list[tuple[float, float]] = []
    lock = threading.Lock()

    def create(chunk):
        try:
            for inst in chunk:
                pk = services.request_operation(alice, inst.pk, "restart").pk
                with lock:
                    created.append(pk)
        finally:
            connection.close()

    def work(_):
        try:
            while not done.is_set():
                ready = list(
                    Task.objects.filter(status="pending", admitted_at__isnull=False).values_list("pk", "lease_token")
                )
                for pk, token in ready:
                    task = transitions.claim_task(pk, token=token, worker=f"w-{threading.get_ident()}")
                    if task is None:
                        continue
                    start = time.monotonic()
                    time.sleep(random.uniform(0, 0.005))
                    end = time.monotonic()
                    assert transitions.finish(pk, "completed", token=token, actor="w", known=task)
                    with lock:
                        intervals.append((start, end))
                if not ready:
                    time.sleep(0.002)
        finally:
            connection.close()

    with ThreadPoolExecutor(6) as pool:
        workers = [pool.submit(work, i) for i in range(2)]
        list(pool.map(create, [instances[i::4] for i in range(4)]))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and Task.objects.filter(pk__in=created, status="completed").count() < 40:
            time.sleep(0.05)
        done.set()
        for w in workers:
            w.result()
    stuck = list(Task.objects.filter(pk__in=created).exclude(status="completed").values_list("pk", "admitted_at"))
    assert stuck == [], "a task was left waiting with the provider's slots free"
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert len(intervals) == 40 and peak <= 2
