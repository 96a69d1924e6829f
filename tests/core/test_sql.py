"""tasks.engine.sql: hand-written statements give what the ORM gives, and its transactions hold.

The START TRANSACTION path only runs on MariaDB outside any open transaction,
hence the transactional tests (transaction=True) there.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import IntegrityError, connection, transaction
from django.db.transaction import TransactionManagementError
from django.utils import timezone

from tasks import services
from tasks.engine import sql
from tasks.models import Instance, Provider, Task, TaskEvent, Worker
from tests.conftest import IS_MYSQL


def test_rows_come_back_as_the_orm_builds_them(alice, running_instance):
    task = services.request_operation(alice, running_instance.pk, "stop", task_data={"k": [1, "two"]})
    raw = sql.get(Task, task.pk)
    orm = Task.objects.get(pk=task.pk)
    for field in Task._meta.concrete_fields:
        assert getattr(raw, field.attname) == getattr(orm, field.attname), field.name
    assert raw.created_at.tzinfo is not None and raw.task_data == {"k": [1, "two"]}
    # Built without Model.__init__: the same instance state, and it behaves as one.
    assert {k for k in vars(raw) if k != "_state"} == {k for k in vars(orm) if k != "_state"}
    assert (raw._state.adding, raw._state.db) == (orm._state.adding, orm._state.db) == (False, "default")
    assert raw == orm and raw.instance == running_instance and raw.provider.pk == running_instance.provider_id
    raw.status_message = "saved through the ORM"
    raw.save(update_fields=["status_message"])
    assert Task.objects.get(pk=task.pk).status_message == "saved through the ORM"
    assert isinstance(sql.get(Instance, running_instance.pk).needs_reconcile, bool)
    assert sql.get(Task, 10**9) is None
    owner = f"{sql.col(Task, 'owner')} = %s"
    assert sql.values(Task, task.pk, ["status", "instance"]) == ("pending", running_instance.pk)
    assert sql.values(Task, task.pk, ["status"], where=owner, params=[alice.pk]) == ("pending",)
    assert sql.values(Task, task.pk, ["status"], where=owner, params=[alice.pk + 1]) is None
    assert sql.values(Task, 10**9, ["status"]) is None


def test_insert_applies_defaults_and_auto_now_like_save(provider):
    before = timezone.now()
    worker = sql.insert(Worker(name="n:1", node="n", host="h", pid=1, queue="q"))
    row = Worker.objects.get(pk=worker.pk)
    assert row.tasks_run == 0 and row.started_at >= before and row.role == "worker"
    second = sql.insert(Provider(name="p2"))
    stored = Provider.objects.get(pk=second.pk)
    assert stored.created_at is not None and stored.updated_at is not None and stored.connection == {}


def test_update_with_increment_and_changed_fields_only(alice, running_instance):
    task = services.request_operation(alice, running_instance.pk, "stop")
    t = sql.table(Task)
    assert sql.update(Task, {"dispatch_count": sql.Inc(2), "status_message": "x"}, f"{t.quoted['id']} = %s", [task.pk])
    task.refresh_from_db()
    assert (task.dispatch_count, task.status_message) == (3, "x")  # admitted at creation: 1 + 2
    instance = sql.get(Instance, running_instance.pk)
    before = sql.snapshot(instance)
    assert not sql.save_changes(instance, before)  # nothing changed: no statement
    instance.addresses.append("10.0.0.9")  # changed in place: a JSON value is compared by content
    stamp = timezone.now() + timedelta(seconds=5)
    assert sql.save_changes(instance, before, now=stamp)
    stored = Instance.objects.get(pk=running_instance.pk)
    assert stored.addresses == ["10.0.0.9"] and stored.updated_at == stamp


@pytest.mark.mariadb
@pytest.mark.django_db(transaction=True)
def test_raw_transaction_commits_rolls_back_and_runs_callbacks_after_commit(alice, running_instance):
    assert IS_MYSQL and not connection.in_atomic_block
    ran = []
    with sql.atomic():
        assert connection.in_atomic_block and not connection.get_autocommit()
        sql.update(Instance, {"status": "stopped"}, "id = %s", [running_instance.pk])
        transaction.on_commit(lambda: ran.append("committed"))
        assert ran == []
    assert ran == ["committed"] and connection.get_autocommit()
    assert Instance.objects.get(pk=running_instance.pk).status == "stopped"

    with pytest.raises(RuntimeError), sql.atomic():
        sql.update(Instance, {"status": "error"}, "id = %s", [running_instance.pk])
        transaction.on_commit(lambda: ran.append("never"))
        raise RuntimeError("boom")
    assert ran == ["committed"] and not connection.in_atomic_block
    assert Instance.objects.get(pk=running_instance.pk).status == "stopped"


@pytest.mark.mariadb
@pytest.mark.django_db(transaction=True)
def test_raw_transaction_hosts_orm_savepoints_and_row_locks(alice, running_instance):
    with sql.atomic():
        # The ORM sees an ordinary transaction: select_for_update is allowed ...
        Instance.objects.select_for_update().get(pk=running_instance.pk)
        # ... and a failed inner block rolls back to its savepoint only.
        with pytest.raises(IntegrityError), transaction.atomic():
            TaskEvent.objects.create(task_id=10**9, to_status="x", actor="y")
        sql.update(Instance, {"status": "stopped"}, "id = %s", [running_instance.pk])
    assert Instance.objects.get(pk=running_instance.pk).status == "stopped"


@pytest.mark.mariadb
@pytest.mark.django_db(transaction=True)
def test_a_lost_connection_inside_the_transaction_rolls_back(alice, running_instance):
    # Django refuses to go on in a transaction whose connection was closed.
    with pytest.raises(TransactionManagementError), sql.atomic():
        sql.update(Instance, {"status": "error"}, "id = %s", [running_instance.pk])
        connection.close()
        sql.fetchone("SELECT 1")
    assert not connection.in_atomic_block
    assert Instance.objects.get(pk=running_instance.pk).status == "running"
