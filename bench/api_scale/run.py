"""API at scale: 1,000,000 tasks, 50 providers, 5,000 users on MariaDB.

Loads the data with bulk multi-row INSERTs (skipped when the database already
holds it), then times requests through the whole Django/DRF stack (token auth,
filters, serializers) in-process and prints p50/p95 per scenario and the
EXPLAIN of the list queries.

    DATABASE_URL=mysql://root@127.0.0.1:3306/cloudhost_bench_api \\
        .venv/bin/python bench/api_scale/run.py [--tasks 1000000] [--reload] [--rounds 100]

Targets (issue 5): lists and detail p95 < 50 ms, stats p95 < 200 ms.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

PROVIDERS = 50
USERS = 5000
INSTANCES_PER_USER = 4
DAYS = 30
BATCH = 5000
SEED = 20261128

TYPE_WEIGHTS = {
    "create": 8,
    "start": 20,
    "stop": 20,
    "restart": 20,
    "delete": 6,
    "reset": 4,
    "reset-password": 8,
    "create-port": 9,
    "delete-port": 5,
}
# Typical run time in seconds per type (the simulated durations are spread around it).
TYPICAL_SECONDS = {
    "create": 60,
    "start": 8,
    "stop": 6,
    "restart": 12,
    "delete": 20,
    "reset": 90,
    "reset-password": 4,
    "create-port": 3,
    "delete-port": 3,
}


def setup_django() -> None:
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith("mysql://"):
        sys.exit("set DATABASE_URL=mysql://root@127.0.0.1:3306/cloudhost_bench_api (MariaDB only)")
    import MySQLdb

    from config.env import parse_database_url

    db = parse_database_url(url, ROOT)
    conn = MySQLdb.connect(host=db["HOST"], port=int(db["PORT"]), user=db["USER"], passwd=db["PASSWORD"])
    conn.cursor().execute(
        f"CREATE DATABASE IF NOT EXISTS `{db['NAME']}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
    )
    conn.close()
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def executemany(cursor, sql: str, rows: list[tuple]) -> None:
    for i in range(0, len(rows), BATCH):
        cursor.executemany(sql, rows[i : i + BATCH])


def load(n_tasks: int) -> None:
    from django.contrib.auth.hashers import make_password
    from django.db import connection, transaction

    from tasks.engine.states import ErrorCode

    rng = random.Random(SEED)
    now = datetime.now(UTC).replace(microsecond=0, tzinfo=None)  # MySQL DATETIME: naive UTC
    start = now - timedelta(days=DAYS)
    t0 = time.monotonic()
    with connection.cursor() as c:
        c.execute("SET SESSION foreign_key_checks=0, unique_checks=0")
        for table in (
            "tasks_taskevent",
            "tasks_tasksecret",
            "tasks_worker",
            "tasks_portmapping",
            "tasks_task",
            "tasks_instance",
            "tasks_userquota",
            "tasks_provider",
            "authtoken_token",
            "auth_user",
        ):
            c.execute(f"TRUNCATE TABLE {table}")
        password = make_password("bench-pass-123")
        users = [
            (i, password, f"user{i:05d}", "", "", f"user{i:05d}@example.com", 0, 1, start, 0)
            for i in range(1, USERS + 1)
        ]
        users.append((USERS + 1, password, "benchadmin", "", "", "admin@example.com", 1, 1, start, 1))
        executemany(
            c,
            "INSERT INTO auth_user (id, password, username, first_name, last_name, email, is_staff, is_active,"
            " date_joined, is_superuser) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
            users,
        )
        providers = []
        for p in range(1, PROVIDERS + 1):
            concurrent = p % 2 == 0
            providers.append(
                (p, f"provider-{p:02d}", "simulated", 1, "{}", "", int(concurrent), 4 if concurrent else 1, 5, 1)
            )
        executemany(
            c,
            "INSERT INTO tasks_provider (id, name, provider_type, enabled, connection, secrets_encrypted,"
            " allow_concurrent_tasks, max_concurrent_tasks, task_poll_interval, enable_task_polling,"
            " unreachable_error, cpu_total, memory_total_mb, disk_total_mb, max_containers, max_vms, cpu_used, memory_used_mb,"
            " disk_used_mb, containers_used, vms_used, port_range_start, port_range_end, default_port_block,"
            " created_at, updated_at) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s, '',"
            " 100000, 100000000, 1000000000, 100000, 100000, 0, 0, 0, 0, 0, 20000, 29999, 5, NOW(), NOW())",
            providers,
        )
        instances = []
        owner_of, provider_of = {}, {}
        n_instances = USERS * INSTANCES_PER_USER
        for i in range(1, n_instances + 1):
            owner = (i - 1) // INSTANCES_PER_USER + 1
            prov = rng.randint(1, PROVIDERS)
            owner_of[i], provider_of[i] = owner, prov
            kind = "vm" if i % 5 == 0 else "container"
            instances.append((i, uuid.uuid4().hex, owner, prov, f"i{i}", f"i{i}", kind, "debian/12", "running", start))
        executemany(
            c,
            "INSERT INTO tasks_instance (id, uuid, owner_id, provider_id, name, live_name, instance_type, image,"
            " status, cpu, memory_mb, disk_mb, bandwidth_mbps, addresses, ssh_port, provider_ref, active_task_id,"
            " holds_resources, needs_reconcile, created_at, updated_at, deleted_at)"
            " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s, 1, 512, 10240, 100, '[]', NULL, '{}', NULL, 1, 0, %s, NOW(), NULL)",
            instances,
        )
        print(f"users, providers, instances loaded in {time.monotonic() - t0:.1f} s", flush=True)

        types = list(TYPE_WEIGHTS)
        weights = list(TYPE_WEIGHTS.values())
        span = (now - start).total_seconds()
        # The newest tasks are the active ones: one per instance at most.
        n_active = min(3200, n_instances // 2)
        active_instances = rng.sample(range(1, n_instances + 1), n_active)
        running_left = {p: (4 if p % 2 == 0 else 1) for p in range(1, PROVIDERS + 1)}
        task_sql = (
            "INSERT INTO tasks_task (id, uuid, task_type, status, progress, status_message, error_code,"
            " error_message, cancel_reason, task_data, owner_id, initiator_id, provider_id, instance_id,"
            " port_mapping_id, timeout_seconds, created_at, admitted_at, started_at, completed_at, lease_token,"
            " lease_expires_at, heartbeat_at, worker, attempt_count, dispatch_count, checkpoints)"
            " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,NULL,0,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,'{}')"
        )
        event_sql = (
            "INSERT INTO tasks_taskevent (task_id, kind, from_status, to_status, actor, reason, progress, message, at)"
            " VALUES (%s,'transition',%s,%s,%s,%s,%s,'',%s)"
        )
        tasks, events = [], []
        active_rows: list[tuple[int, int]] = []
        created = sorted(start + timedelta(seconds=rng.random() * span) for _ in range(n_tasks))
        for tid in range(1, n_tasks + 1):
            created_at = created[tid - 1]
            task_type = rng.choices(types, weights)[0]
            active_index = tid - (n_tasks - n_active) - 1
            if active_index >= 0:
                instance = active_instances[active_index]
            else:
                instance = rng.randint(1, n_instances)
            owner, prov = owner_of[instance], provider_of[instance]
            actor = f"user:user{owner:05d}"
            typical = TYPICAL_SECONDS[task_type]
            admitted = started = completed = lease = heartbeat = None
            token, worker, progress, message, code, err, reason = "", "", 0, "queued", "", "", ""
            attempts = dispatches = 0
            ev = [(tid, "", "pending", actor, "", 0, created_at)]
            if active_index >= 0:
                if running_left[prov] > 0 and rng.random() < 0.5:
                    running_left[prov] -= 1
                    status = "cancelling" if rng.random() < 0.05 else "running"
                    admitted = created_at + timedelta(seconds=1)
                    started = admitted + timedelta(seconds=1)
                    created_at = min(created_at, now - timedelta(seconds=30))
                    heartbeat, lease = now, now + timedelta(seconds=15)
                    token, worker, progress, message = uuid.uuid4().hex, f"bench:{prov}", 40, "working"
                    attempts = dispatches = 1
                    ev.append((tid, "pending", "running", f"worker:{worker}", "", 0, started))
                else:
                    status = "pending"
                active_rows.append((tid, instance))
            else:
                roll = rng.random()
                status = (
                    "completed"
                    if roll < 0.88
                    else "failed"
                    if roll < 0.94
                    else "cancelled"
                    if roll < 0.98
                    else "timeout"
                )
                admitted = created_at + timedelta(seconds=rng.random() * 5)
                if status == "cancelled" and rng.random() < 0.5:
                    completed = admitted  # cancelled while pending
                    admitted = None
                    code = ErrorCode.CANCELLED_BY_USER
                    reason = code
                else:
                    started = admitted + timedelta(seconds=rng.random() * 2)
                    duration = typical * rng.lognormvariate(0, 0.5)
                    completed = started + timedelta(seconds=duration)
                    progress, attempts, dispatches, worker = 100, 1, 1, f"bench:{prov}"
                    ev.append((tid, "pending", "running", f"worker:{worker}", "", 0, started))
                    if status == "failed":
                        code = ErrorCode.WORKER_LOST if rng.random() < 0.1 else ErrorCode.PROVIDER_ERROR
                        err = "simulated failure"
                        progress = 50
                    elif status == "timeout":
                        code, err = ErrorCode.TIMEOUT, "timed out"
                    elif status == "cancelled":
                        code = ErrorCode.CANCELLED_BY_ADMIN if rng.random() < 0.3 else ErrorCode.CANCELLED_BY_USER
                    reason = code
                completed = min(completed, now - timedelta(seconds=1))
                message = status
                ev.append((tid, "running" if started else "pending", status, actor, reason, progress, completed))
            tasks.append(
                (
                    tid,
                    uuid.uuid4().hex,
                    task_type,
                    status,
                    progress,
                    message,
                    code,
                    err,
                    "",
                    "{}",
                    owner,
                    owner,
                    prov,
                    instance,
                    created_at,
                    admitted,
                    started,
                    completed,
                    token,
                    lease,
                    heartbeat,
                    worker,
                    attempts,
                    dispatches,
                )
            )
            events.extend(ev)
            if len(tasks) >= 50_000:
                with transaction.atomic():
                    executemany(c, task_sql, tasks)
                    executemany(c, event_sql, events)
                tasks, events = [], []
                print(f"  {tid:>9} tasks ({time.monotonic() - t0:.0f} s)", flush=True)
        with transaction.atomic():
            executemany(c, task_sql, tasks)
            executemany(c, event_sql, events)
            executemany(c, "UPDATE tasks_instance SET active_task_id=%s WHERE id=%s", active_rows)
        c.execute("SET SESSION foreign_key_checks=1, unique_checks=1")
        c.execute("ANALYZE TABLE tasks_task, tasks_taskevent, tasks_instance, auth_user")
        c.fetchall()
    print(f"loaded {n_tasks} tasks in {time.monotonic() - t0:.1f} s", flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(round(q * len(ordered) + 0.5)) - 1)]


def timed(client, url: str) -> tuple[float, int]:
    t = time.perf_counter()
    response = client.get(url)
    return (time.perf_counter() - t) * 1000, response.status_code


def explain(sql: str) -> str:
    from django.db import connection

    with connection.cursor() as c:
        c.execute("EXPLAIN " + sql)
        cols = [d[0] for d in c.description]
        rows = c.fetchall()
    keep = ("table", "type", "key", "rows", "Extra")
    lines = []
    for row in rows:
        d = dict(zip(cols, row, strict=True))
        lines.append("    " + " | ".join(f"{k}={d.get(k)}" for k in keep))
    return "\n".join(lines)


def show_queries(client, url: str) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as ctx:
        client.get(url)
    print(f"\n  GET {url}: {len(ctx.captured_queries)} queries in all")
    count = next((q for q in ctx.captured_queries if q["sql"].startswith("SELECT COUNT(*)")), None)
    rows = next(
        (
            q
            for q in ctx.captured_queries
            if "FROM `tasks_task`" in q["sql"] and "LIMIT" in q["sql"] and "COUNT(" not in q["sql"]
        ),
        None,
    )
    # The admin list by username counts from the per-owner aggregate: its live part.
    owners = next((q for q in ctx.captured_queries if "`owner_id` AS `owner_id`, COUNT(" in q["sql"]), None)
    for label, q in (("count", count), ("owner counts, live part", owners), ("page", rows)):
        if q is None:
            continue
        sql = q["sql"]
        print(f"    {label} ({float(q['time']) * 1000:.1f} ms): {sql[:300]}{' ...' if len(sql) > 300 else ''}")
        print(explain(sql))


def measure(rounds: int) -> None:
    from django.contrib.auth import get_user_model
    from django.db import connection
    from rest_framework.authtoken.models import Token
    from rest_framework.test import APIClient

    from tasks import stats as stats_module
    from tasks.models import Task

    rng = random.Random(7)
    User = get_user_model()

    def client(user) -> APIClient:
        token, _ = Token.objects.get_or_create(user=user)
        c = APIClient()
        c.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
        return c

    admin = client(User.objects.get(username="benchadmin"))
    sample_users = list(User.objects.filter(is_staff=False).order_by("?")[:40])
    user_clients = [(u, client(u)) for u in sample_users]
    max_id = Task.objects.order_by("-id").values_list("id", flat=True).first()
    with connection.cursor() as c:
        c.execute("SELECT @@innodb_buffer_pool_size, VERSION()")
        pool, version = c.fetchone()
    print(f"\nMariaDB {version}, innodb_buffer_pool_size={int(pool) // 2**20} MiB, tasks={Task.objects.count()}")
    print(f"load average before measuring: {os.getloadavg()} on {os.cpu_count()} CPUs")

    status_sets = ["completed", "pending,running", "failed,timeout", "cancelled", "running,cancelling"]
    # What operators type: part of a name, matching 1 to 11 users.
    substrings = ["user0012", "r0345", "er0499", "user01234", "r00777", "4321"]

    def admin_status_provider():
        st = rng.choice(status_sets)
        return admin, f"/api/v1/admin/tasks/?status={st}&provider={rng.randint(1, PROVIDERS)}"

    def admin_username():
        return admin, f"/api/v1/admin/tasks/?username={rng.choice(substrings)}"

    def admin_username_broad():
        return admin, "/api/v1/admin/tasks/?username=user04"  # 1,000 users, 200,000 tasks

    def admin_username_broad_status():
        return admin, f"/api/v1/admin/tasks/?username=user04&status={rng.choice(status_sets)}"

    def admin_username_everyone():
        return admin, "/api/v1/admin/tasks/?username=user"  # all 5,000 users

    def admin_status_only():
        return admin, f"/api/v1/admin/tasks/?status={rng.choice(['completed', 'failed', 'pending'])}"

    def admin_unfiltered():
        return admin, "/api/v1/admin/tasks/"

    def user_list():
        _, c = rng.choice(user_clients)
        return c, "/api/v1/tasks/"

    def user_list_filtered():
        _, c = rng.choice(user_clients)
        return c, "/api/v1/tasks/?status=completed,failed&ordering=-completed_at"

    own_tasks = {u.pk: list(Task.objects.filter(owner=u).values_list("id", flat=True)[:50]) for u, _ in user_clients}

    def user_detail():
        u, c = rng.choice(user_clients)
        ids = own_tasks[u.pk] or [1]
        return c, f"/api/v1/tasks/{rng.choice(ids)}/"

    def admin_detail():
        return admin, f"/api/v1/admin/tasks/{rng.randint(1, max_id)}/"

    def stats():
        return admin, "/api/v1/admin/tasks/stats/"

    def metrics():
        return admin, "/metrics"

    scenarios = [
        ("admin list, status+provider filters", admin_status_provider, 50),
        ("admin list, username substring", admin_username, 50),
        ("admin list, username matching 1000 users", admin_username_broad, 50),
        ("admin list, same + status filter", admin_username_broad_status, 50),
        ("admin list, username matching all 5000 users", admin_username_everyone, 50),
        ("admin list, no filter", admin_unfiltered, 50),
        ("admin list, status filter only", admin_status_only, 50),
        ("user list", user_list, 50),
        ("user list, status filter + ordering", user_list_filtered, 50),
        ("task detail (owner)", user_detail, 50),
        ("task detail (admin)", admin_detail, 50),
        ("stats (warm base)", stats, 200),
        ("metrics scrape (warm base)", metrics, 200),
    ]
    # Cold start of the stats base (once per hour per process in production).
    stats_module.reset_cache()
    cold, code = timed(admin, "/api/v1/admin/tasks/stats/")
    print(f"stats, cold (builds the hourly base aggregate): {cold:.0f} ms (HTTP {code})")
    cold, code = timed(admin, "/api/v1/admin/tasks/?username=user04")
    print(f"admin list by username, cold (adds the per-owner counts to the base): {cold:.0f} ms (HTTP {code})")
    import config.wsgi  # noqa: F401  (as gunicorn's workers: URLconf loaded, startup objects frozen for the GC)

    print(f"\n{'scenario':45} {'n':>5} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'target':>8}")
    for name, make, target in scenarios:
        for _ in range(3):
            c, url = make()
            c.get(url)
        times, codes = [], set()
        for _ in range(rounds):
            c, url = make()
            ms, code = timed(c, url)
            times.append(ms)
            codes.add(code)
        p50, p95 = percentile(times, 0.5), percentile(times, 0.95)
        flag = "ok" if p95 < target else "MISS"
        print(f"{name:45} {rounds:>5} {p50:8.1f} {p95:8.1f} {max(times):8.1f} {target:>5} {flag} {sorted(codes)}")

    print(f"load average after measuring: {os.getloadavg()}")
    print("\nQueries and EXPLAIN of the list endpoints:")
    show_queries(admin, "/api/v1/admin/tasks/?status=completed&provider=7")
    show_queries(admin, "/api/v1/admin/tasks/?status=pending,running&provider=8")
    show_queries(admin, "/api/v1/admin/tasks/?username=user0012")
    show_queries(admin, "/api/v1/admin/tasks/?username=user04")
    show_queries(admin, "/api/v1/admin/tasks/?status=completed")
    show_queries(user_clients[0][1], "/api/v1/tasks/")
    show_queries(admin, "/api/v1/admin/tasks/")


def refresh_recent(per_second: float = 10.0, minutes: int = 6) -> None:
    """Make the newest finished tasks finish in the last few minutes, as in a busy system.

    The data was loaded a while ago; without this the live part of the stats
    (tasks finished since the base's boundary) would be empty and flatter the figures.
    """
    from django.db import connection

    now = datetime.now(UTC).replace(tzinfo=None)
    n = int(per_second * minutes * 60)
    with connection.cursor() as c:
        c.execute(
            "SELECT id, started_at, completed_at FROM tasks_task WHERE completed_at IS NOT NULL"
            " ORDER BY id DESC LIMIT %s",
            [n],
        )
        rows = c.fetchall()
        updates = []
        for i, (tid, started, completed) in enumerate(rows):
            done = now - timedelta(seconds=i / per_second)
            shift = done - completed
            updates.append((started + shift if started else None, done, tid))
        c.executemany("UPDATE tasks_task SET started_at=%s, completed_at=%s WHERE id=%s", updates)
    print(f"{len(updates)} tasks now finished within the last {minutes} minutes ({per_second}/s)")


def verify_stats() -> None:
    """The cached stats equal a direct GROUP BY over the whole table."""
    from django.db import connection

    from tasks.stats import task_stats

    stats = task_stats()
    with connection.cursor() as c:
        c.execute("SELECT status, COUNT(*) FROM tasks_task GROUP BY status")
        by_status = dict(c.fetchall())
        c.execute("SELECT task_type, COUNT(*) FROM tasks_task GROUP BY task_type")
        by_type = dict(c.fetchall())
    ok = all(stats["by_status"][k] == by_status.get(k, 0) for k in stats["by_status"]) and all(
        stats["by_type"][k] == by_type.get(k, 0) for k in stats["by_type"]
    )
    print(f"\nstats equal a direct GROUP BY: {ok}  total={stats['total']}  by_status={stats['by_status']}")
    if not ok:
        print(f"  direct: {by_status} {by_type}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--reload", action="store_true", help="load again even if the data is there")
    parser.add_argument("--rounds", type=int, default=100, help="requests per scenario")
    args = parser.parse_args()
    setup_django()
    from tasks.models import Task

    have = Task.objects.order_by("-id").values_list("id", flat=True).first() or 0
    if args.reload or have != args.tasks:
        load(args.tasks)
    else:
        print(f"database already holds {have} tasks; --reload to load again")
    refresh_recent()
    verify_stats()
    measure(args.rounds)


if __name__ == "__main__":
    main()
