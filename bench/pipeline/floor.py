"""The floor: what the database rules alone cost per task, with nothing else around them.

    .venv/bin/python bench/pipeline/floor.py [--tasks 5000] [--threads 8]
        [--mode writes|statements|procedures]
        [--database mysql://root@127.0.0.1:3306/cloudhost_bench]

DESIGN.md asks, per task, for three transactions that each change the task,
write a TaskEvent and change the instance: created (insert the task, make it
the instance's active task), running (claim) and completed (finish). This
runs exactly those nine writes and three commits per task, as bare SQL on raw
MySQLdb connections from several threads: no reads, no row locks, no
admission, no Django, no broker. Whatever the pipeline does costs at least
this much CPU, so ``cores / (server + client CPU per task)`` is a ceiling on
the throughput of any implementation of these rules on this machine.

``--mode statements`` adds what the pipeline reads around those writes (the
provider, instance and task row locks, the slot count, the admission
candidates), still one round trip per statement; ``--mode procedures`` runs
exactly the same statements inside three stored procedures, one CALL per
transaction. The difference between the two is the price of the round trips.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.common import cpu_report, cpu_snapshot, reset_data, setup_django  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--tasks", type=int, default=5000)
p.add_argument("--threads", type=int, default=8)
p.add_argument("--mode", choices=("writes", "statements", "procedures"), default="writes")
p.add_argument("--database", default="mysql://root@127.0.0.1:3306/cloudhost_bench")
ARGS = p.parse_args()
setup_django(ARGS.database, "redis", WORKER_NODE="bench")

import MySQLdb  # noqa: E402
from django.contrib.auth import get_user_model  # noqa: E402
from django.db import connection  # noqa: E402

from config.env import parse_database_url  # noqa: E402
from tasks.models import Instance, Provider  # noqa: E402

TASK_INSERT = (
    "INSERT INTO tasks_task (uuid, task_type, status, progress, status_message, error_code, error_message,"
    " cancel_reason, task_data, owner_id, provider_id, instance_id, timeout_seconds, created_at,"
    " admitted_at, dispatched_at, lease_token, worker, attempt_count, dispatch_count, checkpoints)"
    " VALUES (UUID(), 'restart', 'pending', 0, 'queued', '', '', '', '{{}}', {owner}, {provider}, {instance},"
    " 0, {now}, {now}, {now}, 'token', '', 0, 1, '{{}}')"
)
EVENT = (
    "INSERT INTO tasks_taskevent (task_id, kind, from_status, to_status, actor, reason, progress,"
    " message, at) VALUES ({task}, 'transition', {from_}, {to}, 'bench', '', 0, '', {now})"
)
SLOTS = (
    "SELECT (SELECT COUNT(*) FROM tasks_task WHERE provider_id = {provider} AND status IN ('running', 'cancelling'))"
    " + (SELECT COUNT(*) FROM tasks_task WHERE provider_id = {provider} AND status = 'pending'"
    " AND admitted_at IS NOT NULL)"
)
CANDIDATES = (
    "SELECT id FROM tasks_task WHERE provider_id = {provider} AND status = 'pending' AND admitted_at IS NULL"
    " ORDER BY created_at, id LIMIT 2"
)


def transactions(owner, provider) -> dict[str, tuple[list[str], str]]:
    """The three transactions with their reads: (statements, parameters of the procedure).

    Statements use {instance}, {task}, {now} (procedure parameters p_instance,
    p_task, p_now) and the fixed owner and provider.
    """
    fixed = {"owner": owner, "provider": provider}

    def f(sql: str, **extra) -> str:
        names = {"instance": "p_instance", "task": "p_task", "now": "p_now", "from_": "''", "to": "''"}
        names.update(fixed)
        names.update(extra)
        return sql.format(**names)

    create = [
        f"SELECT id FROM tasks_provider WHERE id = {provider} FOR UPDATE",
        f("SELECT id, active_task_id FROM tasks_instance WHERE id = {instance} FOR UPDATE"),
        f(SLOTS),
        f(TASK_INSERT),
        "SET @task = LAST_INSERT_ID()",
        f("UPDATE tasks_instance SET active_task_id = @task WHERE id = {instance} AND active_task_id IS NULL"),
        f(EVENT, task="@task", to="'pending'"),
    ]
    claim = [
        f("SELECT id, status FROM tasks_task WHERE id = {task}"),
        f("SELECT id FROM tasks_instance WHERE id = {instance} FOR UPDATE"),
        f(
            "UPDATE tasks_task SET status = 'running', started_at = {now}, heartbeat_at = {now},"
            " lease_expires_at = {now}, worker = 'w', attempt_count = attempt_count + 1"
            " WHERE id = {task} AND status = 'pending' AND lease_token = 'token'"
        ),
        f(EVENT, from_="'pending'", to="'running'"),
        f("UPDATE tasks_instance SET status = 'restarting', updated_at = {now} WHERE id = {instance}"),
    ]
    finish = [
        f"SELECT id FROM tasks_provider WHERE id = {provider} FOR UPDATE",
        f("SELECT id FROM tasks_instance WHERE id = {instance} FOR UPDATE"),
        f("SELECT id, status, lease_token FROM tasks_task WHERE id = {task} FOR UPDATE"),
        f(
            "UPDATE tasks_task SET status = 'completed', completed_at = {now}, progress = 100"
            " WHERE id = {task} AND status = 'running' AND lease_token = 'token'"
        ),
        f(EVENT, from_="'running'", to="'completed'"),
        f(
            "UPDATE tasks_instance SET status = 'running', active_task_id = NULL, updated_at = {now}"
            " WHERE id = {instance}"
        ),
        f(CANDIDATES),
    ]
    return {
        "create": (create, "p_instance BIGINT, p_now DATETIME(6)"),
        "claim": (claim, "p_task BIGINT, p_instance BIGINT, p_now DATETIME(6)"),
        "finish": (finish, "p_task BIGINT, p_instance BIGINT, p_now DATETIME(6)"),
    }


def into(sql: str) -> str:
    """A statement as a procedure runs it: a read goes into variables (no result set to the client)."""
    if not sql.startswith("SELECT") or sql.startswith("SELECT @"):
        return sql
    if sql.startswith("SELECT ("):  # the slot count: no outer FROM
        return f"{sql} INTO @used"
    head, _, rest = sql.partition(" FROM ")
    variables = ", ".join(f"@v{i}" for i in range(head.count(",") + 1))
    return f"{head} INTO {variables} FROM {rest.replace('LIMIT 2', 'LIMIT 1')}"


def bound(sql: str, **values) -> str:
    for name, value in values.items():
        sql = sql.replace(f"p_{name}", value)
    return sql


def main() -> None:
    reset_data()
    user = get_user_model().objects.get_or_create(username="bench")[0]
    provider = Provider.objects.create(name="floor")
    instances = Instance.objects.bulk_create(
        Instance(owner=user, provider=provider, name=f"f{i}", live_name=f"f{i}", image="noop", status="running")
        for i in range(ARGS.tasks)
    )
    connection.close()
    d = parse_database_url(ARGS.database, ROOT)
    chunks = [instances[i :: ARGS.threads] for i in range(ARGS.threads)]

    def connect():
        db = MySQLdb.connect(host=d["HOST"], user=d["USER"], passwd=d["PASSWORD"], port=int(d["PORT"]), db=d["NAME"])
        db.autocommit(True)
        db.cursor().execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")  # as Django sets it
        return db

    retried = [0]

    def retrying(c, func, *args):
        """Run one transaction, again after a deadlock (as the pipeline's retry_on_deadlock does)."""
        while True:
            try:
                return func(*args)
            except MySQLdb.OperationalError as exc:
                if exc.args[0] != 1213:
                    raise
                retried[0] += 1
                c.execute("ROLLBACK")

    txs = transactions(user.pk, provider.pk)
    if ARGS.mode == "procedures":
        setup = connect().cursor()
        for name, (statements, params) in txs.items():
            setup.execute(f"DROP PROCEDURE IF EXISTS bench_{name}")
            body = ";\n  ".join(into(sql) for sql in statements)
            result = "  SELECT @task;\n" if name == "create" else ""
            setup.execute(
                f"CREATE PROCEDURE bench_{name}({params})\nBEGIN\n  START TRANSACTION;\n  {body};\n"
                f"  COMMIT;\n{result}END"
            )

    def drain(c) -> None:
        while True:
            if c.description:
                c.fetchall()
            if not c.nextset():
                return

    def run_with_reads(chunk):
        db = connect()
        c = db.cursor()
        for inst in chunk:
            now = "'" + time.strftime("%Y-%m-%d %H:%M:%S") + "'"
            values = {"instance": str(inst.pk), "now": now}
            if ARGS.mode == "procedures":

                def call(sql):
                    c.execute(sql)
                    rows = c.fetchall()
                    drain(c)
                    return rows

                task_id = retrying(c, call, f"CALL bench_create({inst.pk}, {now})")[0][0]
                for name in ("claim", "finish"):
                    retrying(c, call, f"CALL bench_{name}({task_id}, {inst.pk}, {now})")
                continue

            def transaction(name, values):
                c.execute("START TRANSACTION")
                for sql in txs[name][0]:
                    c.execute(bound(sql, **values))
                    c.fetchall()
                c.execute("COMMIT")

            retrying(c, transaction, "create", values)
            c.execute("SELECT @task")
            values["task"] = str(c.fetchone()[0])
            for name in ("claim", "finish"):
                retrying(c, transaction, name, values)
        db.close()

    def run(chunk):
        if ARGS.mode != "writes":
            return run_with_reads(chunk)
        db = connect()
        c = db.cursor()
        for inst in chunk:
            now = time.strftime("%Y-%m-%d %H:%M:%S")
            c.execute("START TRANSACTION")
            c.execute(
                "INSERT INTO tasks_task (uuid, task_type, status, progress, status_message, error_code, error_message,"
                " cancel_reason, task_data, owner_id, provider_id, instance_id, timeout_seconds, created_at,"
                " admitted_at, dispatched_at, lease_token, worker, attempt_count, dispatch_count, checkpoints)"
                " VALUES (REPLACE(UUID(), '-', ''), 'restart', 'pending', 0, 'queued', '', '', '', '{}', %s, %s, %s,"
                " 0, %s, %s, %s, 'token', '', 0, 1, '{}')",
                (user.pk, provider.pk, inst.pk, now, now, now),
            )
            task_id = c.lastrowid
            c.execute("UPDATE tasks_instance SET active_task_id = %s WHERE id = %s", (task_id, inst.pk))
            event = (
                "INSERT INTO tasks_taskevent (task_id, kind, from_status, to_status, actor, reason, progress,"
                " message, at) VALUES (%s, 'transition', %s, %s, 'bench', '', 0, '', %s)"
            )
            c.execute(event, (task_id, "", "pending", now))
            c.execute("COMMIT")
            c.execute("START TRANSACTION")
            c.execute(
                "UPDATE tasks_task SET status = 'running', started_at = %s, heartbeat_at = %s,"
                " lease_expires_at = %s, worker = 'w', attempt_count = attempt_count + 1"
                " WHERE id = %s AND status = 'pending' AND lease_token = 'token'",
                (now, now, now, task_id),
            )
            c.execute(event, (task_id, "pending", "running", now))
            c.execute("UPDATE tasks_instance SET status = 'restarting', updated_at = %s WHERE id = %s", (now, inst.pk))
            c.execute("COMMIT")
            c.execute("START TRANSACTION")
            c.execute(
                "UPDATE tasks_task SET status = 'completed', completed_at = %s, progress = 100"
                " WHERE id = %s AND status = 'running' AND lease_token = 'token'",
                (now, task_id),
            )
            c.execute(event, (task_id, "running", "completed", now))
            c.execute(
                "UPDATE tasks_instance SET status = 'running', active_task_id = NULL, updated_at = %s WHERE id = %s",
                (now, inst.pk),
            )
            c.execute("COMMIT")
        db.close()

    threads = [threading.Thread(target=run, args=(chunk,)) for chunk in chunks]
    before, t0 = cpu_snapshot(), time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - t0
    n = ARGS.tasks
    from tasks.models import Task

    done = Task.objects.filter(provider_id=provider.pk, status="completed").count()
    if done < n:  # a thread died (its traceback is above): no figure is better than a wrong one
        raise SystemExit(f"floor: only {done} of {n} tasks completed")
    per_role = dict(cpu_report(before, cpu_snapshot(), n))
    server = per_role.get("database server", 0.0)
    client = per_role.get("benchmark process (producers)", 0.0)
    cores = os.cpu_count() or 1
    what = {
        "writes": "9 writes",
        "statements": "the writes and the reads, a round trip each",
        "procedures": "the writes and the reads in 3 stored procedures, a CALL each",
    }[ARGS.mode]
    print(f"\nfloor: {n} tasks x (3 transactions: {what}), {ARGS.threads} threads, raw MySQLdb, {cores} cores")
    print(f"  database server CPU per task   {server:6.2f} ms")
    print(f"  client CPU per task            {client:6.2f} ms")
    print(f"  measured                       {n / wall:6.0f} tasks/s")
    print(f"  ceiling, cores / CPU per task  {cores * 1000 / (server + client):6.0f} tasks/s")
    if ARGS.mode != "writes":
        print(f"  deadlocks retried              {retried[0]:6d}")
    if ARGS.mode == "procedures":
        cleanup = connect().cursor()
        for name in txs:
            cleanup.execute(f"DROP PROCEDURE IF EXISTS bench_{name}")


if __name__ == "__main__":
    main()
