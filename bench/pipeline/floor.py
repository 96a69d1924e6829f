"""The floor: what the database rules alone cost per task, with nothing else around them.

    .venv/bin/python bench/pipeline/floor.py [--tasks 5000] [--threads 8]
        [--database mysql://root@127.0.0.1:3306/cloudhost_bench]

DESIGN.md asks, per task, for three transactions that each change the task,
write a TaskEvent and change the instance: created (insert the task, make it
the instance's active task), running (claim) and completed (finish). This
runs exactly those nine writes and three commits per task, as bare SQL on raw
MySQLdb connections from several threads: no reads, no row locks, no
admission, no Django, no broker. Whatever the pipeline does costs at least
this much CPU, so ``cores / (server + client CPU per task)`` is a ceiling on
the throughput of any implementation of these rules on this machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.common import reset_data, setup_django  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--tasks", type=int, default=5000)
p.add_argument("--threads", type=int, default=8)
p.add_argument("--database", default="mysql://root@127.0.0.1:3306/cloudhost_bench")
ARGS = p.parse_args()
setup_django(ARGS.database, "redis", WORKER_NODE="bench")

import MySQLdb  # noqa: E402
from django.contrib.auth import get_user_model  # noqa: E402
from django.db import connection  # noqa: E402

from config.env import parse_database_url  # noqa: E402
from tasks.models import Instance, Provider  # noqa: E402


def server_cpu() -> float:
    pid = subprocess.check_output(["pgrep", "-x", "mariadbd"]).split()[0].decode()
    fields = Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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

    def run(chunk):
        db = MySQLdb.connect(host=d["HOST"], user=d["USER"], passwd=d["PASSWORD"], port=int(d["PORT"]), db=d["NAME"])
        db.autocommit(True)
        c = db.cursor()
        for inst in chunk:
            now = time.strftime("%Y-%m-%d %H:%M:%S")
            c.execute("START TRANSACTION")
            c.execute(
                "INSERT INTO tasks_task (uuid, task_type, status, progress, status_message, error_code, error_message,"
                " cancel_reason, task_data, owner_id, provider_id, instance_id, timeout_seconds, created_at,"
                " admitted_at, dispatched_at, lease_token, worker, attempt_count, dispatch_count)"
                " VALUES (REPLACE(UUID(), '-', ''), 'restart', 'pending', 0, 'queued', '', '', '', '{}', %s, %s, %s,"
                " 0, %s, %s, %s, 'token', '', 0, 1)",
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
    before, mine, t0 = server_cpu(), os.times(), time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - t0
    after, mine2 = server_cpu(), os.times()
    n = ARGS.tasks
    server = (after - before) * 1000 / n
    client = ((mine2.user - mine.user) + (mine2.system - mine.system)) * 1000 / n
    cores = os.cpu_count() or 1
    print(f"\nfloor: {n} tasks x (3 transactions, 9 writes), {ARGS.threads} threads, raw MySQLdb, {cores} cores")
    print(f"  database server CPU per task   {server:6.2f} ms")
    print(f"  client CPU per task            {client:6.2f} ms")
    print(f"  measured                       {n / wall:6.0f} tasks/s")
    print(f"  ceiling, cores / CPU per task  {cores * 1000 / (server + client):6.0f} tasks/s")


if __name__ == "__main__":
    main()
