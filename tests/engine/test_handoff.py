"""Hand-over: a job runs the task its finish admitted, without a broker round trip,
while its django-q2 timeout has room; and the heartbeat's own hard kill."""

from __future__ import annotations

import signal
import time

import pytest
from django.conf import settings

from providers.base import CancelToken
from tasks import services
from tasks.engine import dispatch, transitions, worker
from tasks.engine.worker import run_job, worker_name
from tasks.models import Task


@pytest.fixture
def sent(monkeypatch):
    """The jobs that went to the broker: (task id, token, queue, timeout)."""
    jobs: list[tuple] = []
    monkeypatch.setattr(dispatch, "enqueue_job", lambda *args: jobs.append(args))
    return jobs


def serial_backlog(alice, provider, make_instance, n: int) -> list[Task]:
    tasks = [services.request_operation(alice, make_instance(alice, provider).pk, "stop") for _ in range(n)]
    return [Task.objects.get(pk=t.pk) for t in tasks]


@pytest.mark.django_db(transaction=True)
def test_a_job_runs_the_tasks_its_finishes_admit_in_order_without_the_broker(alice, provider, make_instance, sent):
    first, second, third = serial_backlog(alice, provider, make_instance, 3)
    assert [job[0] for job in sent] == [first.pk]  # serial: only the first was admitted and sent
    assert run_job(first.pk, first.lease_token, 3600) == "completed, then 2 handed over"
    tasks = list(Task.objects.filter(pk__in=[first.pk, second.pk, third.pk]).order_by("started_at"))
    assert [t.pk for t in tasks] == [first.pk, second.pk, third.pk]  # FIFO
    assert {(t.status, t.worker) for t in tasks} == {("completed", worker_name())}
    assert all(a.completed_at <= b.started_at for a, b in zip(tasks, tasks[1:], strict=False))  # one at a time
    assert [job[0] for job in sent] == [first.pk]  # nothing more went through the broker
    # Admitted and claimed in the finish of the one before: one admission, one claim, its events.
    assert (tasks[1].admitted_at, tasks[1].dispatch_count, tasks[1].attempt_count) == (tasks[1].started_at, 1, 1)
    events = list(tasks[2].events.filter(kind="transition").values_list("to_status", "actor"))
    assert events == [("pending", "user:alice"), ("running", f"worker:{worker_name()}"), ("completed", events[2][1])]


@pytest.mark.django_db(transaction=True)
def test_a_job_without_room_for_the_next_task_sends_it_through_the_broker(
    alice, provider, make_instance, sent, settings
):
    first, second = serial_backlog(alice, provider, make_instance, 2)
    # TASK_HANDOFF_SECONDS=0: the job has room for its first task's timeout and grace only.
    settings.TASK_HANDOFF_SECONDS = 0
    assert run_job(first.pk, first.lease_token, dispatch.job_seconds(first.effective_timeout)) == "completed"
    second.refresh_from_db()
    assert second.status == "pending" and second.admitted_at is not None
    assert sent[-1] == (second.pk, second.lease_token, provider.queue_name, second.effective_timeout)
    # A job sent before hand-over existed carries no timeout: never hands over either.
    assert run_job(second.pk, second.lease_token) == "completed"


@pytest.mark.django_db(transaction=True)
def test_a_shutting_down_worker_hands_nothing_over(alice, provider, make_instance, sent, monkeypatch, tmp_path):
    first, second = serial_backlog(alice, provider, make_instance, 2)
    real_finish = transitions.finish
    drain = tmp_path / "drain"
    monkeypatch.setenv("WORKER_DRAIN_FILE", str(drain))

    def shutdown_then_finish(*args, **kwargs):
        drain.touch()  # the machine starts draining as the first task ends
        return real_finish(*args, **kwargs)

    monkeypatch.setattr(transitions, "finish", shutdown_then_finish)
    assert run_job(first.pk, first.lease_token, 3600) == "completed"
    second.refresh_from_db()
    assert second.status == "pending" and sent[-1][:2] == (second.pk, second.lease_token)


def test_the_heartbeat_kills_a_job_whose_operation_outlives_the_hard_timeout(alice, running_instance, monkeypatch):
    """The alarm did not stop the operation: the heartbeat records `timeout`, then kills the process."""
    task = services.request_operation(alice, running_instance.pk, "restart")
    dispatch.admit(running_instance.provider_id)
    task.refresh_from_db()
    name = worker_name()
    assert transitions.claim(task.pk, token=task.lease_token, worker=name)
    killed = []
    monkeypatch.setattr(worker.os, "kill", lambda pid, sig: killed.append((pid, sig)))
    cancel = CancelToken(deadline=time.monotonic() + 60)
    watch = worker.Watch(task.pk, task.lease_token, cancel, name)
    watch.tick(time.monotonic())
    assert killed == [] and Task.objects.get(pk=task.pk).status == "running"  # within its time

    late = cancel.deadline + settings.TASK_HARD_KILL_GRACE_SECONDS + worker.HARD_KILL_SLACK
    watch.tick(late)
    assert killed == []  # not a django-q2 job (this test process): never killed
    monkeypatch.setattr(worker, "in_job", lambda: True)
    watch.tick(late)
    assert killed == [(worker.os.getpid(), signal.SIGKILL)]
    task.refresh_from_db()
    running_instance.refresh_from_db()
    assert (task.status, task.error_code, task.error_message) == ("timeout", "timeout", "killed at the hard timeout")
    assert running_instance.active_task_id is None and running_instance.needs_reconcile
