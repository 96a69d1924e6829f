"""django-q2's ORM broker with a cheap poll (the default broker, ``Q_BROKER=orm``).

Every provider has its own queue, so its own django-q2 cluster, whose pusher
polls the broker table every ``Q_POLL_SECONDS``. django-q2's ORM broker does
per poll: close_old_connections() (which makes Django ping the server before
the next query when CONN_HEALTH_CHECKS is on), a SELECT built by the ORM, and
for an acknowledgement a QuerySet.delete() with its own transaction. Measured
on the 2-core VM (bench/pipeline): a worker tier of 4 idle providers spent
about 0.2 s of CPU per second polling, most of it in the ping and the ORM,
and the producers paid a ping per job sent. That grows with every provider.

This broker keeps django-q2's table, its semantics (a job is hidden for
``retry`` seconds once pulled, removed on acknowledgement, pulled again if
never acknowledged) and its error handling, and does the same work with one
precompiled statement per step:

- poll: ``SELECT id, payload ... WHERE key = ? AND lock < now ORDER BY id``
  (oldest first) and the compare-and-set ``UPDATE ... SET lock = now + retry
  WHERE id = ? AND lock < now`` that hides it (a competing cluster's update
  matches no row);
- enqueue: one INSERT, without touching the caller's connections;
- acknowledge: one DELETE.

The stale-connection check django-q2 runs on every poll and acknowledgement
runs here once every CONNECTION_CHECK_SECONDS; in between, a dropped
connection shows up as an error, and the step closes the connection and runs
once more on a new one before django-q2's own handling takes over.

The benchmark's "plain django-q2" baselines keep django-q2's own broker
(``Q_BROKER_CLASS=django_q.brokers.orm.ORM``).
"""

from __future__ import annotations

import time
from datetime import timedelta

from django import db
from django.db import InterfaceError, OperationalError, connections
from django.utils import timezone
from django_q.brokers.orm import ORM
from django_q.conf import Conf
from django_q.models import OrmQ

CONNECTION_CHECK_SECONDS = 5.0


class OrmBroker(ORM):
    """django-q2's ORM broker, polling with precompiled SQL (see the module docstring)."""

    def __init__(self, list_key: str | None = None):
        super().__init__(list_key=list_key)
        self._checked_at = 0.0
        self._sql: dict[str, str] | None = None

    # -- SQL --------------------------------------------------------------------------

    def _conn(self):
        return connections[Conf.ORM]

    def _statements(self) -> dict[str, str]:
        if self._sql is None:
            quote = self._conn().ops.quote_name
            table = quote(OrmQ._meta.db_table)
            key, lock, payload = quote("key"), quote("lock"), quote("payload")
            self._sql = {
                "pull": f"SELECT id, {payload} FROM {table} WHERE {key} = %s AND {lock} < %s ORDER BY id LIMIT %s",
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
        pulled = self._retrying(self._pull)
        if pulled:
            return pulled
        time.sleep(Conf.POLL)  # empty queue: spare the CPU, as django-q2 does
        return None

    def _pull(self) -> list[tuple[int, str]]:
        statements = self._statements()
        now = timezone.now()
        at = self._time(now)
        hidden_until = self._time(now + timedelta(seconds=Conf.RETRY))
        pulled = []
        with self._conn().cursor() as cur:
            cur.execute(statements["pull"], [self.list_key, at, Conf.BULK])
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
