"""django-q2 brokers of the worker tier: every provider queue (its own broker key) served by one pool.

Each provider keeps its own queue, a broker key ``provider-<id>`` that only its
admitted tasks reach (tasks.engine.dispatch sends the jobs). One django-q2
cluster per machine (the pool, tasks.engine.supervisor) serves every provider
queue placed on that machine: its broker reads the list of keys from the file
the supervisor writes (``WORKER_QUEUES_FILE``, re-read when it changes) and
takes jobs from all of them in one call, plus its own key, where django-q2's
scheduler puts the schedules' jobs:

- Redis (``RedisBroker``): one blocking ``BLPOP`` over all keys, the order
  rotated at every call (BLPOP takes from the first non-empty key it is given,
  so a fixed order would let the first provider starve the others). An idle
  provider costs no command of its own; an idle machine one blocked read.
- ORM (``OrmBroker``): one ``SELECT ... WHERE key IN (...)`` per poll, oldest
  job first across all keys (arrival order: no key starves another), then the
  compare-and-set that hides it. While nothing comes the poll backs off from
  ``Q_POLL_SECONDS`` to ``Q_POLL_IDLE_SECONDS``, and is fast again at once
  when a job arrives.

Producers (the web tier, finishing workers) build the same classes with a
single provider key and only enqueue.

The ORM broker keeps django-q2's table, its semantics (a job is hidden for
``retry`` seconds once pulled, removed on acknowledgement, pulled again if
never acknowledged) and its error handling, and does each step with one
precompiled statement. django-q2's own ORM broker runs close_old_connections()
on every poll and acknowledgement (with CONN_HEALTH_CHECKS, a ping each time)
and builds every statement with the ORM; the stale-connection check runs here
once every CONNECTION_CHECK_SECONDS, and a connection that died in between
costs one retry of the step on a new connection.

The benchmark's "plain django-q2" baselines keep django-q2's own brokers
(``Q_BROKER_CLASS=django_q.brokers.orm.ORM``).
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

from django import db
from django.conf import settings
from django.db import InterfaceError, OperationalError, connections
from django.utils import timezone
from django_q.brokers.orm import ORM
from django_q.brokers.redis_broker import Redis
from django_q.conf import Conf
from django_q.models import OrmQ

CONNECTION_CHECK_SECONDS = 5.0
# How long a Redis pool's blocking read waits before it looks at the queue list again.
REDIS_BLOCK_SECONDS = 1
# How long a gated pusher waits for a free worker before it returns to django-q2's loop
# (which checks whether the cluster is stopping).
GATE_WAIT_SECONDS = 0.5


class QueueSet:
    """The keys a pool's broker serves: its own, plus the provider queues listed in the
    supervisor's file (``WORKER_QUEUES_FILE``, one name per line), re-read when the file
    changes (one stat per call). Without the file (a producer, a test) only its own key."""

    def __init__(self, own: str, path: str | None = None):
        self.own = own
        if path is None and own == Conf.CLUSTER_NAME:  # a pool's broker (a producer names its provider's key)
            path = os.environ.get("WORKER_QUEUES_FILE")
        self.path = path
        self._stamp = None
        self._names: list[str] = [own]
        self._turn = 0

    @property
    def pooled(self) -> bool:
        return bool(self.path)

    def names(self) -> list[str]:
        if self.path:
            try:
                st = os.stat(self.path)
                stamp = (st.st_mtime_ns, st.st_size)
            except FileNotFoundError:
                stamp = None
            if stamp != self._stamp:
                self._stamp = stamp
                listed = read_queues(self.path) if stamp else []
                self._names = [self.own, *[n for n in listed if n != self.own]]
        return self._names

    def rotated(self) -> list[str]:
        """The names in a new order at every call: each key comes first in turn."""
        names = self.names()
        self._turn = (self._turn + 1) % len(names)
        return names[self._turn :] + names[: self._turn]


def read_queues(path) -> list[str]:
    try:
        with open(path) as f:
            return [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        return []


def write_queues(path, names) -> bool:
    """Write the queue list atomically; False when it was already so (no change for the brokers)."""
    names = sorted(set(names))
    if read_queues(path) == names:
        return False
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write("".join(f"{n}\n" for n in names))
    os.replace(tmp, path)
    return True


class OrmBroker(ORM):
    """django-q2's ORM broker, polling with precompiled SQL (see the module docstring)."""

    def __init__(self, list_key: str | None = None):
        super().__init__(list_key=list_key)
        self._checked_at = 0.0
        self._sql: dict[str, str] | None = None
        self.queues = QueueSet(self.list_key)
        self._idle_sleep = Conf.POLL

    def __setstate__(self, state):
        super().__setstate__(state)
        self._checked_at, self._sql = 0.0, None
        self.queues = QueueSet(self.list_key)
        self._idle_sleep = Conf.POLL

    # -- SQL --------------------------------------------------------------------------

    def _conn(self):
        return connections[Conf.ORM]

    def _statements(self) -> dict[str, str]:
        if self._sql is None:
            quote = self._conn().ops.quote_name
            table = quote(OrmQ._meta.db_table)
            key, lock, payload = quote("key"), quote("lock"), quote("payload")
            self._sql = {
                "pull": f"SELECT id, {payload} FROM {table} WHERE {key} IN (%s) AND {lock} < %s ORDER BY id LIMIT %s",
                "ready": f"SELECT {key}, COUNT(*) FROM {table} WHERE {key} IN (%s) AND {lock} < %s GROUP BY {key}",
                "hide": f"UPDATE {table} SET {lock} = %s WHERE id = %s AND {lock} < %s",
                "put": f"INSERT INTO {table} ({key}, {payload}, {lock}) VALUES (%s, %s, %s)",
                "drop": f"DELETE FROM {table} WHERE id = %s",
            }
        return self._sql

    def _time(self, value):
        """A datetime as the lock column stores it (naive UTC on MySQL, text on SQLite)."""
        return OrmQ._meta.get_field("lock").get_db_prep_value(value, self._conn())

    # -- django-q2's broker interface -----------------------------------------------

    def enqueue(self, task) -> int:
        with self._conn().cursor() as cur:
            cur.execute(
                self._statements()["put"], [self.list_key or Conf.CLUSTER_NAME, task, self._time(timezone.now())]
            )
            return cur.lastrowid

    def dequeue(self):
        gate = getattr(self, "gate", None)  # a pool's pusher: only for a free worker (tasks.engine.pool)
        if gate is not None and not gate.wait(GATE_WAIT_SECONDS):
            return None
        pulled = self._retrying(self._pull)
        if pulled:
            self._idle_sleep = Conf.POLL
            return pulled
        # Empty: spare the CPU and the database. A pool backs off while nothing comes
        # (Q_POLL_SECONDS doubling up to Q_POLL_IDLE_SECONDS), so an idle machine costs
        # a few polls a second whatever the number of its providers.
        time.sleep(self._idle_sleep)
        if self.queues.pooled:
            self._idle_sleep = min(max(self._idle_sleep * 2, Conf.POLL), settings.Q_POLL_IDLE_SECONDS)
        return None

    def _in(self, names) -> tuple[str, str]:
        """The pull and ready statements with as many placeholders as keys."""
        marks = ", ".join(["%s"] * len(names))
        st = self._statements()
        return st["pull"].replace("IN (%s)", f"IN ({marks})"), st["ready"].replace("IN (%s)", f"IN ({marks})")

    def ready_counts(self, names) -> dict[str, int]:
        """Jobs waiting to be pulled, per key (the pool's backlog)."""
        if not names:
            return {}
        _, ready = self._in(names)
        with self._conn().cursor() as cur:
            cur.execute(ready, [*names, self._time(timezone.now())])
            return {key: int(n) for key, n in cur.fetchall()}

    def ready_total(self, names) -> int:
        """Jobs waiting to be pulled over these keys (the supervisor's backlog check)."""
        return sum(self.ready_counts(names).values())

    def _pull(self) -> list[tuple[int, str]]:
        statements = self._statements()
        names = self.queues.names()
        pull, _ = self._in(names)
        now = timezone.now()
        at = self._time(now)
        hidden_until = self._time(now + timedelta(seconds=Conf.RETRY))
        pulled = []
        with self._conn().cursor() as cur:
            cur.execute(pull, [*names, at, Conf.BULK])
            for pk, payload in cur.fetchall():
                cur.execute(statements["hide"], [hidden_until, pk, at])
                if cur.rowcount == 1:  # else another cluster of this queue was faster
                    pulled.append((pk, payload))
        return pulled

    def delete(self, task_id) -> None:
        self._retrying(self._drop, task_id)

    def _drop(self, task_id) -> None:
        with self._conn().cursor() as cur:
            cur.execute(self._statements()["drop"], [task_id])

    def _retrying(self, step, *args):
        """Run a poll or an acknowledgement: django-q2's stale-connection check at most
        every CONNECTION_CHECK_SECONDS; a connection that died since then fails the
        step, which runs once more on a new connection (a second failure goes to
        django-q2, which restarts the pusher or logs the monitor's error)."""
        conn = self._conn()
        now = time.monotonic()
        if now - self._checked_at >= CONNECTION_CHECK_SECONDS and not conn.in_atomic_block:
            self._checked_at = now
            db.close_old_connections()
        try:
            return step(*args)
        except (OperationalError, InterfaceError):
            if conn.in_atomic_block:
                raise  # the caller's transaction: not ours to reconnect
            conn.close()
            return step(*args)


class RedisBroker(Redis):
    """django-q2's Redis broker; a pool's instance reads every provider key with one BLPOP."""

    def __init__(self, list_key: str | None = None):
        super().__init__(list_key=list_key)
        self.queues = QueueSet(self.name)

    def __getstate__(self):
        return self.name, self._info

    def __setstate__(self, state):
        name, self._info = state
        self.list_key = redis_key(name)
        self.connection = self.get_connection(self.list_key)
        self.cache = self.get_cache()
        self.queues = QueueSet(name)

    @property
    def name(self) -> str:
        """The queue name (django-q2 stores the Redis key ``django_q:<name>:q``)."""
        return self.list_key[len("django_q:") : -len(":q")]

    def dequeue(self):
        gate = getattr(self, "gate", None)  # a pool's pusher: only for a free worker (tasks.engine.pool)
        if gate is not None and not gate.wait(GATE_WAIT_SECONDS):
            return None
        keys = [redis_key(n) for n in self.queues.rotated()] if self.queues.pooled else [self.list_key]
        task = self.connection.blpop(keys, REDIS_BLOCK_SECONDS)
        if task:
            return [(None, task[1])]
        return None

    def ready_counts(self, names) -> dict[str, int]:
        """Jobs waiting to be pulled, per key: one round trip for all of them."""
        if not names:
            return {}
        pipe = self.connection.pipeline(transaction=False)
        for name in names:
            pipe.llen(redis_key(name))
        return {name: int(n) for name, n in zip(names, pipe.execute(), strict=True) if n}

    def ready_total(self, names) -> int:
        """Jobs waiting to be pulled over these keys, summed by Redis: one command whatever
        the number of keys. The supervisor asks four times a second; a pipeline of one
        LLEN per key cost the idle tier 0.8% of a core more at 100 providers than at 1."""
        if not names:
            return 0
        script = getattr(self, "_sum_script", None)
        if script is None:
            script = self._sum_script = self.connection.register_script(SUM_LENGTHS)
        return int(script(keys=[redis_key(n) for n in names]))


# Server-side sum of the lengths of KEYS (EVALSHA; redis-py loads it again after a flush).
SUM_LENGTHS = "local n = 0 for _, key in ipairs(KEYS) do n = n + redis.call('LLEN', key) end return n"


def redis_key(name: str) -> str:
    return f"django_q:{name}:q"
