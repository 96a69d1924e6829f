"""tasks.engine.broker.OrmBroker: django-q2's ORM broker semantics, with the cheap poll."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone
from django_q.brokers import get_broker
from django_q.brokers.orm import ORM
from django_q.conf import Conf
from django_q.models import OrmQ

from tasks.engine.broker import OrmBroker

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def broker(monkeypatch):
    monkeypatch.setattr(Conf, "POLL", 0.001)  # an empty poll sleeps this long
    return OrmBroker(list_key="provider-7")


def test_the_default_orm_broker_is_ours():
    assert type(get_broker("provider-1")) is OrmBroker


def test_a_job_goes_to_one_puller_until_acknowledged(broker):
    job = broker.enqueue("payload-1")
    other = OrmBroker(list_key="provider-7")  # a second cluster serving the same queue

    assert broker.dequeue() == [(job, "payload-1")]
    assert other.dequeue() is None, "hidden while the first cluster has it"
    assert OrmQ.objects.get(pk=job).lock > timezone.now() + timedelta(seconds=Conf.RETRY - 60)

    broker.acknowledge(job)
    assert not OrmQ.objects.filter(pk=job).exists()
    assert other.dequeue() is None


def test_a_job_never_acknowledged_is_pulled_again_after_retry(broker):
    job = broker.enqueue("payload-1")
    assert broker.dequeue() == [(job, "payload-1")]
    # The cluster that pulled it died; its hiding time ran out.
    OrmQ.objects.filter(pk=job).update(lock=timezone.now() - timedelta(seconds=1))
    assert OrmBroker(list_key="provider-7").dequeue() == [(job, "payload-1")]


def test_oldest_first_and_only_its_own_queue(broker):
    first = broker.enqueue("first")
    OrmBroker(list_key="provider-8").enqueue("someone else's")
    second = broker.enqueue("second")

    assert broker.dequeue() == [(first, "first")]
    assert broker.dequeue() == [(second, "second")]
    assert broker.dequeue() is None
    assert OrmQ.objects.filter(key="provider-8").count() == 1


def test_django_q2_reads_what_it_writes_and_the_other_way_round(broker):
    """Same table, same columns: a machine still running django-q2's broker interoperates."""
    stock = ORM(list_key="provider-7")
    ours = broker.enqueue("from ours")
    assert stock.dequeue() == [(ours, "from ours")]
    theirs = stock.enqueue("from django-q2")
    assert broker.dequeue() == [(theirs, "from django-q2")]
    assert stock.queue_size() == 0 and stock.lock_size() == 2


@pytest.mark.mariadb
def test_a_connection_dropped_between_polls_costs_no_poll(broker):
    """The server closed the pusher's connection (restart, wait_timeout): the next poll
    reconnects and still delivers, instead of django-q2 restarting the pusher."""
    import MySQLdb

    assert broker.dequeue() is None  # a poll: the periodic connection check is done
    job = broker.enqueue("payload-1")
    with connection.cursor() as cur:
        cur.execute("SELECT CONNECTION_ID()")
        (old_id,) = cur.fetchone()
    # The server ends the connection (as a restart or wait_timeout would).
    d = connection.settings_dict
    killer = MySQLdb.connect(host=d["HOST"], user=d["USER"], passwd=d["PASSWORD"], port=int(d["PORT"]))
    killer.cursor().execute(f"KILL {int(old_id)}")
    killer.close()

    assert broker.dequeue() == [(job, "payload-1")]
    with connection.cursor() as cur:
        cur.execute("SELECT CONNECTION_ID()")
        assert cur.fetchone()[0] != old_id
    broker.acknowledge(job)
    assert not OrmQ.objects.filter(pk=job).exists()
