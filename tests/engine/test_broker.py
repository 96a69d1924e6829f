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

from tasks.engine.broker import OrmBroker, QueueSet, RedisBroker, write_queues

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


@pytest.fixture
def queues_file(tmp_path, monkeypatch):
    path = tmp_path / "queues"
    monkeypatch.setenv("WORKER_QUEUES_FILE", str(path))
    return path


def test_a_pool_takes_from_every_listed_queue_oldest_first_and_follows_the_list(queues_file, monkeypatch):
    monkeypatch.setattr(Conf, "POLL", 0.001)
    write_queues(queues_file, ["provider-1", "provider-2"])
    pool = OrmBroker()  # the pool's own key (django-q2's schedules) plus the listed ones
    a = OrmBroker(list_key="provider-1").enqueue("a")
    b = OrmBroker(list_key="provider-2").enqueue("b")
    OrmBroker(list_key="provider-3").enqueue("not served here")
    schedule = OrmBroker(list_key=Conf.CLUSTER_NAME).enqueue("schedule")
    assert [pool.dequeue(), pool.dequeue(), pool.dequeue(), pool.dequeue()] == [
        [(a, "a")],
        [(b, "b")],
        [(schedule, "schedule")],
        None,
    ]
    assert pool.ready_counts(["provider-1", "provider-3"]) == {"provider-3": 1}
    assert pool.ready_total(["provider-1", "provider-3"]) == 1
    write_queues(queues_file, ["provider-1", "provider-2", "provider-3"])
    assert pool.dequeue()[0][1] == "not served here", "a provider added while running is served at once"
    assert OrmBroker(list_key="provider-1").queues.names() == ["provider-1"], "a producer serves nothing else"


def test_an_idle_pool_backs_off_and_is_fast_again_when_a_job_comes(queues_file, monkeypatch, settings):
    monkeypatch.setattr(Conf, "POLL", 0.001)
    settings.Q_POLL_IDLE_SECONDS = 0.004
    write_queues(queues_file, ["provider-1"])
    pool = OrmBroker()
    slept = []
    monkeypatch.setattr("tasks.engine.broker.time.sleep", slept.append)
    for _ in range(5):
        assert pool.dequeue() is None
    assert slept == [0.001, 0.002, 0.004, 0.004, 0.004]
    OrmBroker(list_key="provider-1").enqueue("x")
    assert pool.dequeue()
    assert pool.dequeue() is None and slept[-1] == 0.001


def test_the_redis_pool_reads_all_keys_in_one_call_rotating_so_none_starves(queues_file, monkeypatch):
    redis = pytest.importorskip("redis")
    from tasks.engine.broker import redis_key

    client = redis.Redis.from_url("redis://127.0.0.1:6379/15")
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    client.flushdb()
    names = [f"provider-{n}" for n in range(1, 4)]
    write_queues(queues_file, names)
    monkeypatch.setattr(Conf, "REDIS", "redis://127.0.0.1:6379/15")
    try:
        pool = RedisBroker(list_key=Conf.CLUSTER_NAME)
        calls = []
        real = pool.connection.blpop
        pool.connection.blpop = lambda keys, timeout: calls.append(list(keys)) or real(keys, timeout)
        # provider-1 has a backlog; the others one job each: they are not left behind it.
        for n in range(20):
            client.rpush(redis_key("provider-1"), f"1-{n}")
        client.rpush(redis_key("provider-2"), "2-0")
        client.rpush(redis_key("provider-3"), "3-0")
        got = [pool.dequeue()[0][1].decode() for _ in range(4)]
        assert "2-0" in got and "3-0" in got, got
        assert len(calls) == 4 and all(len(keys) == 4 for keys in calls), "one call over every key"
        assert len({keys[0] for keys in calls}) == 4, "each key comes first in turn"
        assert pool.ready_counts(names) == {"provider-1": 18}
        client.rpush(redis_key("provider-3"), "3-1", "3-2")
        assert pool.ready_total(names) == 20 and pool.ready_total(names[1:]) == 2 and pool.ready_total([]) == 0
        client.script_flush()  # (a restarted Redis has no script: it is loaded again)
        assert pool.ready_total(names) == 20
    finally:
        client.flushdb()


def test_queue_set_rotation_visits_every_key():
    q = QueueSet("own", path="")
    q._names = ["own", "a", "b"]
    q.path = ""
    assert [q.rotated()[0] for _ in range(3)] == ["a", "b", "own"]
