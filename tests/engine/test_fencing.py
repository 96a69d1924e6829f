"""Fencing (issue 22): ending a task keeps its slot and instance held until its worker
has stopped; a worker that cannot prove its lease stops by itself; requests survive
deadlocks; no worker event after the end; leases on the database's clock.

In-process tests here; the ones marked mariadb need real row locks; the worker-process
ones are in test_fencing_processes.py.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from django.db import connection, connections, transaction
from django.utils import timezone

from providers.base import CANCEL_LEASE_LOST, CancelToken, LeaseClock, OperationCancelled
from providers.simulated import SimulatedDriver
from tasks import operations, ports, services
from tasks.engine import clock, dispatch, maintenance, transitions
from tasks.engine.worker import execute
from tasks.errors import InstanceBusy
from tasks.models import Instance, Provider, Task, TaskEvent, UserQuota
from tasks.operations.base import Operation


def admitted(task: Task) -> Task:
    dispatch.admit(task.provider_id)
    return Task.objects.get(pk=task.pk)


def claimed(alice, instance, task_type="stop") -> Task:
    task = admitted(services.request_operation(alice, instance.pk, task_type))
    assert transitions.claim(task.pk, token=task.lease_token, worker="w1")
    return Task.objects.get(pk=task.pk)


# ----------------------------------------------------------------- the cancel token's lease


def test_an_unproven_lease_stops_the_operation_at_its_next_safe_point():
    lease = LeaseClock(time.monotonic() + 0.3)
    token = CancelToken(deadline=time.monotonic() + 60, lease=lease)
    started = time.monotonic()
    with pytest.raises(OperationCancelled) as err:
        token.sleep(10)
    assert err.value.reason == CANCEL_LEASE_LOST and 0.25 < time.monotonic() - started < 1.0
    # A cleanup token shares the lease: an undo stops with it too.
    assert CancelToken(deadline=time.monotonic() + 60, lease=lease).cancelled


def test_each_renewal_moves_the_lease_deadline_on():
    lease = LeaseClock(time.monotonic() + 0.3)
    token = CancelToken(lease=lease)

    def renew_twice():
        for _ in range(2):
            time.sleep(0.2)
            lease.extend(time.monotonic() + 0.3)

    threading.Thread(target=renew_twice).start()
    started = time.monotonic()
    with pytest.raises(OperationCancelled):
        token.sleep(5)  # not woken early by the first deadline: the renewals moved it
    assert 0.6 < time.monotonic() - started < 1.5


# ----------------------------------------------------------------- the stopping hold


def test_a_force_stopped_task_holds_its_slot_and_instance_until_its_worker_reports_its_exit(
    alice, provider, make_instance
):
    first, second = make_instance(alice, provider), make_instance(alice, provider)
    task = claimed(alice, first)
    assert services.force_stop_task(_admin(), task.pk, reason="stuck").status == "cancelled"
    task.refresh_from_db()
    assert task.held_until is not None and task.lease_token
    # The instance is still busy with it, and the provider's only slot still used.
    with pytest.raises(InstanceBusy) as err:
        services.request_operation(alice, first.pk, "start")
    assert err.value.extra["active_task"] == task.pk
    waiting = services.request_operation(alice, second.pk, "stop")
    assert dispatch.slots_in_use(provider.pk) == 1 and Task.objects.get(pk=waiting.pk).admitted_at is None
    assert dispatch.admit(provider.pk) == []
    # Its worker stops and says so: both are free, and the next task is admitted at once.
    assert transitions.release_hold(task.pk, token=task.lease_token)
    assert Task.objects.get(pk=waiting.pk).admitted_at is not None
    assert Instance.objects.get(pk=first.pk).active_task_id is None
    assert transitions.release_hold(task.pk, token=task.lease_token) is False  # once


def test_the_sweep_frees_a_hold_once_the_revoked_lease_has_run_out(alice, provider, make_instance):
    first, second = make_instance(alice, provider), make_instance(alice, provider)
    task = claimed(alice, first)
    assert transitions.force_stop(task.pk, actor="admin:root", reason="stuck")
    waiting = services.request_operation(alice, second.pk, "stop")
    maintenance.sweep()
    assert Task.objects.get(pk=task.pk).held_until is not None, "the lease has not run out yet"
    Task.objects.filter(pk=task.pk).update(held_until=clock.now() - timedelta(seconds=1))
    report = maintenance.sweep()
    assert report.released == 1
    assert Task.objects.get(pk=waiting.pk).admitted_at is not None
    assert Instance.objects.get(pk=first.pk).active_task_id is None


def test_recovery_acts_only_once_the_lease_has_run_out_and_holds_nothing_after(
    alice, provider, make_instance, settings
):
    settings.TASK_MAX_ATTEMPTS = 1  # its last attempt: it ends (resumption: test_resumption.py)
    instance = make_instance(alice, provider)
    task = claimed(alice, instance)
    assert transitions.recover_lost(task.pk) is False
    Task.objects.filter(pk=task.pk).update(lease_expires_at=clock.now() - timedelta(seconds=1))
    assert transitions.recover_lost(task.pk)
    task.refresh_from_db()
    assert (task.status, task.error_code, task.held_until) == ("failed", "worker_lost", None)
    assert Instance.objects.get(pk=instance.pk).active_task_id is None


def _admin():
    from django.contrib.auth import get_user_model

    return get_user_model().objects.get_or_create(username="fence-admin", defaults={"is_staff": True})[0]


# ----------------------------------------------------------------- a hung heartbeat


class Waits(Operation):
    task_type = "restart"

    def run(self, ctx):
        ctx.cancel.sleep(30)


@pytest.mark.django_db(transaction=True)
def test_a_hung_database_call_in_the_heartbeat_fences_the_worker(alice, running_instance, monkeypatch, settings):
    """Its renewal never returns (a half-open connection): the operation still stops once the
    lease can no longer be proven, and the end of the task does not wait for the hung tick."""
    settings.TASK_LEASE_SECONDS, settings.TASK_HEARTBEAT_SECONDS, settings.TASK_CANCEL_POLL_SECONDS = 1.5, 0.3, 0.1
    operations.get_operation("restart")
    monkeypatch.setitem(operations._REGISTRY, "restart", Waits())
    hung = threading.Event()
    stuck = threading.Event()

    def never_returns(*args, **kwargs):
        stuck.set()
        hung.wait(60)
        return None

    monkeypatch.setattr(transitions, "renew_lease", never_returns)
    monkeypatch.setattr(transitions, "read_status", never_returns)
    task = admitted(services.request_operation(alice, running_instance.pk, "restart"))
    result = {}

    def run():
        result["outcome"] = execute(task.pk, task.lease_token)
        connection.close()

    thread = threading.Thread(target=run)
    started = time.monotonic()
    thread.start()
    try:
        thread.join(10)
        took = time.monotonic() - started
        assert stuck.is_set()
        assert result.get("outcome") == "fenced", result
        # lease 1.5 s - heartbeat 0.3 s, then at most UNWATCH_WAIT_SECONDS (2 s) for the hung tick
        assert took < 1.2 + 2.0 + 1.0, f"the worker stopped after {took:.1f} s"
    finally:
        hung.set()
        thread.join(5)


# ----------------------------------------------------------------- re-dispatch


def test_redispatch_backs_off_and_sends_nothing_for_a_disabled_provider(alice, provider, make_instance, monkeypatch):
    sent = []
    monkeypatch.setattr(dispatch, "enqueue_job", lambda *args: sent.append(args[0]))
    # Nobody serves the queue: every copy sent stays in it.
    monkeypatch.setattr(dispatch, "jobs_waiting", lambda ids: {pid: len(sent) for pid in ids})
    task = admitted(services.request_operation(alice, make_instance(alice, provider).pk, "stop"))
    assert task.admitted_at is not None
    base = clock.now()
    # A sweep every 10 s for ten minutes.
    for k in range(1, 61):
        monkeypatch.setattr(clock, "now", lambda k=k: base + timedelta(seconds=10 * k + 0.5))
        dispatch.redispatch_stale()
    assert 3 <= len(sent) <= 7, f"{len(sent)} copies in ten minutes"
    Provider.objects.filter(pk=provider.pk).update(enabled=False)
    sent.clear()
    for k in range(61, 200):
        monkeypatch.setattr(clock, "now", lambda k=k: base + timedelta(seconds=10 * k + 0.5))
        dispatch.redispatch_stale()
    assert sent == []


def test_a_job_lost_from_its_queue_is_sent_again_without_waiting_out_the_backoff(
    alice, provider, make_instance, monkeypatch, settings, django_capture_on_commit_callbacks
):
    """Earlier copies (several machines' start-up re-sends, a resumption) must not put
    minutes between a lost job and its next copy when the queue shows none is left."""
    from django_q.models import OrmQ

    with django_capture_on_commit_callbacks(execute=True):  # the job goes out on commit
        task = admitted(services.request_operation(alice, make_instance(alice, provider).pk, "stop"))
    Task.objects.filter(pk=task.pk).update(dispatch_count=6)  # the backoff would be 5 x 2^5 s
    base = clock.now()
    monkeypatch.setattr(clock, "now", lambda: base + timedelta(seconds=settings.TASK_DISPATCH_TIMEOUT_SECONDS + 1))
    assert OrmQ.objects.filter(key=provider.queue_name).count() == 1
    assert dispatch.jobs_waiting([provider.pk]) == {provider.pk: 1}
    assert dispatch.redispatch_stale() == []  # its copy still waits in the queue: back off
    OrmQ.objects.filter(key=provider.queue_name).delete()  # the broker lost it
    assert dispatch.jobs_waiting([provider.pk]) == {provider.pk: 0}
    assert dispatch.redispatch_stale() == [task.pk]
    assert OrmQ.objects.filter(key=provider.queue_name).count() == 1
    task.refresh_from_db()
    assert task.dispatch_count == 7 and task.status == "pending"


# ----------------------------------------------------------------- create's provider ref


def test_a_fenced_create_does_not_write_the_provider_ref(alice, provider, monkeypatch):
    """A driver with host-allocated ids (Proxmox) stores the reserved id before creating; a
    worker whose task was force-stopped meanwhile must not write it on the instance."""

    def reserve(self, spec):
        running = Task.objects.get(status="running")
        assert transitions.force_stop(running.pk, actor="admin:root", reason="test")
        return {"vmid": 4242}

    monkeypatch.setattr(SimulatedDriver, "reserve", reserve, raising=False)
    instance, task = services.create_instance(alice, provider=provider, image="debian/12")
    task = admitted(task)
    assert execute(task.pk, task.lease_token, heartbeat=False) == "fenced"
    assert "vmid" not in (Instance.objects.get(pk=instance.pk).provider_ref or {})
    assert Task.objects.get(pk=task.pk).error_code == "force_stopped"


# ----------------------------------------------------------------- MariaDB: deadlocks


def _weigh(n: int = 20) -> None:
    """Change some rows, so InnoDB picks the other transaction as the deadlock's victim."""
    ids = list(Instance.objects.filter(name__startswith="ballast-").values_list("pk", flat=True)[:n])
    for pk in ids:
        Instance.objects.filter(pk=pk).update(bandwidth_mbps=int(time.time() * 1000) % 1000 + 1)


def _deadlock_with(request, first, second) -> None:
    """Run ``request`` while another transaction holds ``first`` and then asks for
    ``second``, a lock the request holds, in the reverse of the request's order: a real
    deadlock, the request its victim (it has changed the fewest rows)."""
    errors = []
    done = threading.Event()

    def blocker():
        try:
            with transaction.atomic():
                _weigh()
                first()
                time.sleep(0.6)  # the request now holds its first lock and waits for ours
                second()
        except Exception as exc:  # (if InnoDB chose us after all, the request simply proceeds)
            errors.append(exc)
        finally:
            connections.close_all()
            done.set()

    thread = threading.Thread(target=blocker)
    thread.start()
    time.sleep(0.2)
    try:
        request()
    finally:
        done.wait(15)
        thread.join(5)


@pytest.mark.mariadb
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("path", ["request_operation", "create_port", "delete_port", "create_instance"])
def test_request_paths_survive_a_deadlock(alice, provider, make_instance, path, caplog):
    for i in range(20):
        make_instance(alice, provider, name=f"ballast-{i}")
    instance = make_instance(alice, provider)
    if path == "delete_port":
        mapping = ports.reserve(provider, instance, protocol="tcp", guest_port=8080, host_port=None, count=1)
        mapping.status = mapping.STATUS_ACTIVE
        mapping.save()
    lock_instance = lambda: Instance.objects.select_for_update().get(pk=instance.pk)  # noqa: E731
    lock_provider = lambda: Provider.objects.select_for_update().get(pk=provider.pk)  # noqa: E731
    lock_quota = lambda: UserQuota.objects.select_for_update().get(user=alice)  # noqa: E731
    requests = {
        "request_operation": lambda: services.request_operation(alice, instance.pk, "stop"),
        "create_port": lambda: services.create_port(alice, instance.pk, protocol="tcp", guest_port=80),
        "delete_port": lambda: services.delete_port(alice, instance.pk, mapping.pk),
        "create_instance": lambda: services.create_instance(alice, provider=provider, image="debian/12"),
    }
    if path == "create_instance":
        from tasks import resources

        resources.ensure_quota(alice)
        # A request locks quota -> provider; this takes the provider, then the quota.
        _deadlock_with(requests[path], lock_provider, lock_quota)
    else:
        # A request locks provider -> instance; the claim's foreign-key check took the
        # provider's row after the instance (the finding).
        _deadlock_with(requests[path], lock_instance, lock_provider)
    assert "database error 1213, retrying" in caplog.text, "a deadlock happened and was retried"
    assert Task.objects.filter(provider=provider).exists()


# ----------------------------------------------------------------- MariaDB: event order


@pytest.mark.mariadb
@pytest.mark.django_db(transaction=True)
def test_no_worker_step_is_recorded_after_a_force_stop(alice, running_instance):
    """The force-stop lands right after the worker's progress update, before its step event."""
    task = claimed(alice, running_instance)
    table = Task._meta.db_table
    stopper = {"updated": False}

    def force_stop_now():
        stopper["ok"] = transitions.force_stop(task.pk, actor="admin:root", reason="stuck")
        connections.close_all()

    def hook(execute_sql, sql, params, many, context):
        if stopper["updated"] and "thread" not in stopper:
            stopper["thread"] = threading.Thread(target=force_stop_now)
            stopper["thread"].start()
            stopper["thread"].join(1.0)  # it either ends now, or waits for the worker's transaction
        result = execute_sql(sql, params, many, context)
        if sql.lstrip().upper().startswith("UPDATE") and table in sql and "progress" in sql:
            stopper["updated"] = True
        return result

    with connection.execute_wrapper(hook):
        transitions.report_progress(task.pk, token=task.lease_token, progress=40, message="copying disks", step=True)
    stopper["thread"].join(10)
    assert stopper["ok"]
    timeline = list(
        TaskEvent.objects.filter(task_id=task.pk).order_by("at", "id").values_list("id", "kind", "to_status")
    )
    assert timeline[-1][1:] == (TaskEvent.KIND_TRANSITION, "cancelled"), timeline
    assert [e[0] for e in timeline] == sorted(e[0] for e in timeline), "recorded in the order shown"


# ----------------------------------------------------------------- MariaDB: the database's clock


@pytest.mark.mariadb
def test_leases_and_recovery_use_the_database_clock(alice, provider, make_instance, monkeypatch):
    real = timezone.now

    def machine_clock(skew: float) -> None:
        monkeypatch.setattr(timezone, "now", lambda: real() + timedelta(seconds=skew))
        clock.reset()

    try:
        # A worker machine 30 s behind claims a task: its lease is still the database's 15 s.
        machine_clock(-30)
        task = claimed(alice, make_instance(alice, provider))
        remaining = (task.lease_expires_at - real()).total_seconds()
        assert abs(remaining - 15) < 2, remaining
        # Neither a machine on time nor one 30 s ahead recovers it.
        for skew in (0, 30):
            machine_clock(skew)
            maintenance.recover(maintenance.SweepReport())
            assert Task.objects.get(pk=task.pk).status == "running", f"recovered by a machine {skew} s off"
        # It really expires: recovery acts (it resumes the task: back to pending).
        Task.objects.filter(pk=task.pk).update(lease_expires_at=real() - timedelta(seconds=1))
        maintenance.recover(maintenance.SweepReport())
        assert Task.objects.get(pk=task.pk).status == "pending"
    finally:
        monkeypatch.setattr(timezone, "now", real)
        clock.reset()


def test_worker_tier_processes_get_read_and_write_timeouts_below_the_lease(tmp_path):
    """Only the worker tier: a migration or a purge elsewhere may run longer than a lease."""
    import json
    import subprocess
    import sys

    from tests.engine.harness import ROOT

    code = (
        "import sys, json, django, os; sys.argv = ['manage.py', sys.argv[1]];"
        " os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'config.settings'); django.setup();"
        " from django.conf import settings as s;"
        " print(json.dumps([s.DATABASES['default']['OPTIONS'].get(k) for k in"
        " ('read_timeout', 'write_timeout', 'connect_timeout')] + [s.TASK_LEASE_SECONDS - s.TASK_HEARTBEAT_SECONDS]))"
    )
    env = {"DATABASE_URL": "mysql://root@127.0.0.1:3306/none", "PATH": "/usr/bin:/bin", "VAR_DIR": str(tmp_path)}
    env["TASK_LEASE_SECONDS"], env["TASK_HEARTBEAT_SECONDS"] = "15", "3"

    def options(command: str) -> list:
        out = subprocess.run([sys.executable, "-c", code, command], cwd=ROOT, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    read, write, connect, limit = options("qcluster")
    assert read == write == 11 and read < limit and connect <= read
    assert options("run_workers")[:2] == [11, 11]
    assert options("migrate")[:2] == [None, None]
    env["DB_READ_TIMEOUT_SECONDS"] = "12"
    bad = subprocess.run([sys.executable, "-c", code, "qcluster"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "must be below" in bad.stderr
