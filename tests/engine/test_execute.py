"""The worker entry point, run in-process: claim, run, finish; duplicates do nothing."""

from __future__ import annotations

import pytest
from django.db import OperationalError, connection, connections

from tasks import services
from tasks.engine import dispatch, transitions
from tasks.engine.worker import execute, run_admitted_inline
from tasks.models import Task


def test_create_then_stop_runs_to_completion(alice, provider):
    instance, task = services.create_instance(alice, provider=provider, image="debian/12")
    assert run_admitted_inline(provider.pk) == 1
    task.refresh_from_db()
    instance.refresh_from_db()
    assert (task.status, task.progress, instance.status, instance.active_task_id) == ("completed", 100, "running", None)
    stop = services.request_operation(alice, instance.pk, "stop")
    run_admitted_inline(provider.pk)
    stop.refresh_from_db()
    instance.refresh_from_db()
    assert (stop.status, instance.status) == ("completed", "stopped")
    statuses = list(stop.events.filter(kind="transition").values_list("to_status", flat=True))
    assert statuses == ["pending", "running", "completed"]


def test_duplicate_and_stale_jobs_change_nothing(alice, running_instance):
    task = services.request_operation(alice, running_instance.pk, "stop")
    dispatch.admit(running_instance.provider_id)
    task.refresh_from_db()
    token = task.lease_token
    assert execute(task.pk, token) == "completed"
    assert execute(task.pk, token) == "dropped"  # delivered twice
    events = task.events.count()
    # A stale job after a force-stop does nothing either.
    running_instance.refresh_from_db()
    second = services.request_operation(alice, running_instance.pk, "start")
    dispatch.admit(running_instance.provider_id)
    second.refresh_from_db()
    old_token = second.lease_token
    transitions.force_stop(second.pk, actor="admin:root", reason="test")
    assert execute(second.pk, old_token) == "dropped"
    second.refresh_from_db()
    assert second.status == "cancelled" and task.events.count() == events
    assert Task.objects.get(pk=task.pk).status == "completed"


def test_admission_respects_the_limit_and_fifo(alice, provider, make_instance, django_capture_on_commit_callbacks):
    provider.allow_concurrent_tasks, provider.max_concurrent_tasks = True, 2
    provider.save()
    instances = [make_instance(alice, provider) for _ in range(5)]
    with django_capture_on_commit_callbacks(execute=True):  # the wake-up after each commit
        tasks = [services.request_operation(alice, i.pk, "stop") for i in instances]
    admitted = Task.objects.filter(admitted_at__isnull=False).order_by("id").values_list("id", flat=True)
    assert list(admitted) == [tasks[0].pk, tasks[1].pk]
    info = dispatch.queue_info(Task.objects.get(pk=tasks[3].pk))
    assert info["blocked_reason"] == "provider at its limit 2/2" and info["queue_position"] == 1
    provider.max_concurrent_tasks = 3
    provider.save()
    assert dispatch.admit(provider.pk) == [tasks[2].pk]


def test_the_worker_registry_names_the_running_task(alice, make_instance, running_instance, monkeypatch, settings):
    """A claim writes the worker's registry row at most once per interval; tasks_run catches up."""
    from tasks.engine import worker
    from tasks.engine.worker import worker_name
    from tasks.models import Worker

    monkeypatch.setattr(worker, "_registry", {"written_at": None, "unreported": 0})
    settings.WORKER_REGISTRY_INTERVAL_SECONDS = 3600

    def run_one(instance):
        task = services.request_operation(alice, instance.pk, "stop")
        dispatch.admit(instance.provider_id)
        task.refresh_from_db()
        assert execute(task.pk, task.lease_token, heartbeat=False) == "completed"
        return task

    first = run_one(running_instance)
    row = Worker.objects.get(name=worker_name())
    assert (row.current_task_id, row.tasks_run) == (first.pk, 1)
    second = run_one(make_instance(alice, running_instance.provider))  # within the interval: not written
    assert execute(second.pk, Task.objects.get(pk=second.pk).lease_token) == "dropped"  # not a task run
    row.refresh_from_db()
    assert (row.current_task_id, row.tasks_run) == (first.pk, 1)
    settings.WORKER_REGISTRY_INTERVAL_SECONDS = 0
    third = run_one(make_instance(alice, running_instance.provider))
    row.refresh_from_db()
    assert (row.current_task_id, row.tasks_run) == (third.pk, 3)


def test_hard_timeout_inside_the_operation_is_recorded_as_timeout(alice, running_instance, monkeypatch):
    """django-q2's per-job timeout raises TimeoutException (a SystemExit) in the operation:
    the worker records `timeout` itself, then lets the exception end the process."""
    import pytest
    from django_q.exceptions import TimeoutException

    from tasks import operations
    from tasks.operations.base import Operation

    class Stuck(Operation):
        task_type = "restart"

        def run(self, ctx):
            raise TimeoutException("hard timeout")

    operations.get_operation("restart")  # load the registry first
    monkeypatch.setitem(operations._REGISTRY, "restart", Stuck())
    task = services.request_operation(alice, running_instance.pk, "restart")
    dispatch.admit(running_instance.provider_id)
    task.refresh_from_db()
    with pytest.raises(TimeoutException):
        execute(task.pk, task.lease_token, heartbeat=False)
    task.refresh_from_db()
    running_instance.refresh_from_db()
    assert (task.status, task.error_code) == ("timeout", "timeout")
    assert running_instance.active_task_id is None


def test_a_lost_job_is_sent_again_with_the_same_token_keeping_the_admission_time(alice, running_instance, monkeypatch):
    from datetime import timedelta

    from django.utils import timezone

    sent = []
    monkeypatch.setattr(dispatch, "enqueue_job", lambda *args: sent.append(args))
    task = services.request_operation(alice, running_instance.pk, "stop")
    dispatch.admit(running_instance.provider_id)
    task.refresh_from_db()
    admitted, token = task.admitted_at, task.lease_token
    assert dispatch.redispatch_stale() == []  # just sent: nothing to do
    Task.objects.filter(pk=task.pk).update(dispatched_at=timezone.now() - timedelta(minutes=5))
    assert dispatch.redispatch_stale() == [task.pk]
    task.refresh_from_db()
    assert (task.admitted_at, task.lease_token, task.dispatch_count) == (admitted, token, 2)
    assert sent[-1][:2] == (task.pk, token)
    assert execute(task.pk, token, heartbeat=False) == "completed"


# MariaDB only: three threads write at once (worker, heartbeat, canceller). SQLite's
# in-memory test database (shared cache) refuses a concurrent writer at once with
# "database table is locked" instead of waiting as a real SQLite file does; under
# load that failed this test (CI on a busy machine), which is not what it is about.
@pytest.mark.mariadb
@pytest.mark.django_db(transaction=True)
def test_one_heartbeat_thread_serves_the_process_and_carries_cancel_and_deadline(
    alice, running_instance, make_instance, monkeypatch, settings
):
    """Two tasks one after the other in one process: the same heartbeat thread renews
    the first one's lease and brings it a cancel request; the second hits its deadline."""
    import threading
    import time

    from django.db import connection

    from tasks import operations
    from tasks.engine.worker import Heartbeat
    from tasks.operations.base import Operation

    settings.TASK_HEARTBEAT_SECONDS, settings.TASK_CANCEL_POLL_SECONDS = 0.3, 0.1

    class Waits(Operation):
        task_type = "restart"

        def run(self, ctx):
            ctx.cancel.sleep(10)

    operations.get_operation("restart")
    monkeypatch.setitem(operations._REGISTRY, "restart", Waits())

    def run_in_thread(task):
        result = {}

        def target():
            result["outcome"] = execute(task.pk, Task.objects.get(pk=task.pk).lease_token)
            connection.close()

        thread = threading.Thread(target=target)
        thread.start()
        return thread, result

    first = services.request_operation(alice, running_instance.pk, "restart")
    thread, result = run_in_thread(first)
    deadline = time.monotonic() + 5
    while Task.objects.get(pk=first.pk).status != "running" and time.monotonic() < deadline:
        time.sleep(0.02)
    beater = Heartbeat.get()
    time.sleep(0.8)
    renewed = Task.objects.get(pk=first.pk)
    # The lease was renewed while it ran.
    assert renewed.heartbeat_at > renewed.started_at, (renewed.status, renewed.started_at, renewed.heartbeat_at)
    asked = time.monotonic()
    assert transitions.request_cancel(first.pk, actor="user:alice")
    thread.join(5)
    took = time.monotonic() - asked
    assert result.get("outcome") == "cancelled", result
    assert took < 1.0, f"the cancel took {took:.2f} s to end the operation"

    second = services.request_operation(alice, make_instance(alice, running_instance.provider).pk, "restart")
    Task.objects.filter(pk=second.pk).update(timeout_seconds=1)
    thread, result = run_in_thread(second)
    thread.join(5)
    assert result.get("outcome") == "timeout", result
    assert Heartbeat.get() is beater and beater.is_alive()
    names = [t.name for t in threading.enumerate()]
    assert names.count("task-heartbeat") == 1


def _claimed(alice, instance, task_type="stop"):
    """A task claimed by worker w1, as the worker holds it (its `known` copy)."""
    task = services.request_operation(alice, instance.pk, task_type)
    dispatch.admit(instance.provider_id)
    task.refresh_from_db()
    return transitions.claim_task(task.pk, token=task.lease_token, worker="w1")


def test_a_completion_after_a_cancel_request_is_recorded_from_cancelling(alice, running_instance):
    """The worker's copy still says running; the row says cancelling (the user asked
    while the operation was finishing). The completion wins and its event says where
    it really came from."""
    known = _claimed(alice, running_instance)
    assert transitions.request_cancel(known.pk, actor="user:alice", reason="changed my mind")
    assert known.status == "running"

    assert transitions.finish(known.pk, "completed", token=known.lease_token, actor="worker:w1", known=known)

    task = Task.objects.get(pk=known.pk)
    assert (task.status, task.error_code, task.progress) == ("completed", "", 100)
    last = task.events.filter(kind="transition").order_by("id").last()
    assert (last.from_status, last.to_status) == ("cancelling", "completed")
    running_instance.refresh_from_db()
    assert (running_instance.status, running_instance.active_task_id) == ("stopped", None)


def test_a_completion_after_a_force_stop_changes_nothing(alice, running_instance):
    known = _claimed(alice, running_instance)
    assert transitions.force_stop(known.pk, actor="admin:root", reason="stuck")
    events = Task.objects.get(pk=known.pk).events.count()

    assert not transitions.finish(known.pk, "completed", token=known.lease_token, actor="worker:w1", known=known)

    task = Task.objects.get(pk=known.pk)
    assert (task.status, task.error_code, task.events.count()) == ("cancelled", "force_stopped", events)


def test_progress_reported_during_the_run_ends_at_100_on_completion(alice, running_instance):
    known = _claimed(alice, running_instance)
    assert transitions.report_progress(known.pk, token=known.lease_token, progress=40, message="stopping")

    assert transitions.finish(known.pk, "completed", token=known.lease_token, actor="worker:w1", known=known)

    task = Task.objects.get(pk=known.pk)
    assert (task.status, task.progress) == ("completed", 100)
    assert task.events.filter(kind="transition").order_by("id").last().progress == 100


@pytest.mark.mariadb
@pytest.mark.django_db(transaction=True)
def test_a_job_on_a_connection_that_died_while_the_worker_idled_is_still_claimed(alice, running_instance):
    # A database restart or a proxy that cut idle connections: the worker's next statement
    # meets "Lost connection" (2013) or "gone away" (2006). The job is the task's only copy.
    task = services.request_operation(alice, running_instance.pk, "stop")
    dispatch.admit(running_instance.provider_id)
    task.refresh_from_db()
    with connection.cursor() as cur:
        cur.execute("SELECT CONNECTION_ID()")
        victim = cur.fetchone()[0]
    with connections.create_connection("default").cursor() as other:
        other.execute("KILL %s", [victim])
    assert execute(task.pk, task.lease_token) == "completed"
    task.refresh_from_db()
    assert task.status == "completed" and task.attempt_count == 1


@pytest.mark.django_db(transaction=True)  # (a claim inside the test's transaction is never retried)
def test_a_claim_waits_out_a_short_outage_then_gives_up_to_the_sweep(alice, running_instance, monkeypatch, settings):
    task = services.request_operation(alice, running_instance.pk, "stop")
    dispatch.admit(running_instance.provider_id)
    task.refresh_from_db()
    real, failures = transitions.claim_task, []

    def away(*args, **kwargs):
        if len(failures) < 2:
            failures.append(1)
            raise OperationalError(2003, "Can't connect to MySQL server on '127.0.0.1' (111)")
        return real(*args, **kwargs)

    monkeypatch.setattr(transitions, "claim_task", away)
    assert execute(task.pk, task.lease_token) == "completed" and len(failures) == 2

    # Away for longer than the sweep's re-send delay: the job fails, the task stays admitted.
    second = services.request_operation(alice, running_instance.pk, "start")
    dispatch.admit(running_instance.provider_id)
    second.refresh_from_db()
    settings.TASK_DISPATCH_TIMEOUT_SECONDS = 0.5
    failures.clear()
    monkeypatch.setattr(
        transitions, "claim_task", _always(OperationalError(2006, "MySQL server has gone away"), failures)
    )
    with pytest.raises(OperationalError):
        execute(second.pk, second.lease_token)
    assert 2 <= len(failures) <= 5
    second.refresh_from_db()
    assert second.status == "pending" and second.admitted_at is not None

    # A statement the database refused is not an outage: no retry.
    failures.clear()
    monkeypatch.setattr(transitions, "claim_task", _always(OperationalError(1054, "Unknown column"), failures))
    with pytest.raises(OperationalError):
        execute(second.pk, second.lease_token)
    assert len(failures) == 1


def _always(exc, calls):
    def fail(*args, **kwargs):
        calls.append(1)
        raise exc

    return fail
