"""MariaDB: the task and event lists' queries never plan a full scan or a sort.

Seeds a table large enough for the optimizer to show its real choice (40,000
tasks, about 100,000 events, 300 users, 1,500 instances, ANALYZEd), loads each list
page and list filter through the admin, and EXPLAINs every query the page runs on
tasks_task and tasks_taskevent. A full table scan (type ALL) or a sort (Using
filesort / Using temporary) fails the test, naming the page and the plan. The
statistics' own aggregates (GROUP BY, measured by bench/api_scale) are left out.

Run: DATABASE_URL=mysql://root@127.0.0.1:3306/cloudhost_<branch> .venv/bin/pytest tests/admin/test_list_plans.py
"""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from tasks import stats
from tasks.admin.task_admin import TaskAdmin

pytestmark = pytest.mark.skipif(connection.vendor != "mysql", reason="query plans are checked on MariaDB")

USERS, PROVIDERS, INSTANCES, TASKS = 300, 10, 1500, 40_000
STATUSES = ["completed"] * 88 + ["failed"] * 6 + ["cancelled"] * 4 + ["timeout"] * 2
TYPES = ["create", "start", "stop", "restart", "delete", "reset", "reset-password", "create-port", "delete-port"]
BIG_TABLES = ("tasks_task", "tasks_taskevent")
AGE_COLUMN = 1 + TaskAdmin.list_display.index("age_col")  # ?o= counts the action checkbox as 0


def insert(cursor, head: str, row: str, rows: list[tuple], chunk: int = 2000) -> None:
    """Multi-row INSERTs of ``chunk`` rows each (``row``: one row's VALUES tuple)."""
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        cursor.execute(f"{head} VALUES {', '.join([row] * len(part))}", [v for r in part for v in r])


@pytest.fixture(scope="module")
def seeded(django_db_setup, django_db_blocker):
    """The rows, committed once for the module (ANALYZE TABLE commits), removed after."""
    rng = random.Random(21)
    now = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    start = now - timedelta(days=30)
    with django_db_blocker.unblock(), connection.cursor() as c:
        c.execute("SET SESSION foreign_key_checks=0")
        insert(
            c,
            "INSERT INTO auth_user (id, password, username, first_name, last_name, email, is_staff, is_active,"
            " date_joined, is_superuser)",
            "(%s, '!', %s, '', '', '', 0, 1, %s, 0)",
            [(i, f"user{i:04d}", start) for i in range(1, USERS + 1)],
        )
        c.executemany(
            "INSERT INTO tasks_provider (id, name, provider_type, enabled, connection, secrets_encrypted,"
            " allow_concurrent_tasks, max_concurrent_tasks, task_poll_interval, enable_task_polling,"
            " unreachable_error, cpu_total, memory_total_mb, disk_total_mb, max_containers, max_vms, cpu_used,"
            " memory_used_mb, disk_used_mb, containers_used, vms_used, port_range_start, port_range_end,"
            " default_port_block, created_at, updated_at)"
            " VALUES (%s, %s, 'simulated', 1, '{}', '', 1, 4, 5, 1, '', 64, 1, 1, 1, 1, 0, 0, 0, 0, 0,"
            " 20000, 29999, 5, NOW(), NOW())",
            [(p, f"provider-{p}") for p in range(1, PROVIDERS + 1)],
        )
        instances = [(i, (i - 1) % USERS + 1, rng.randint(1, PROVIDERS)) for i in range(1, INSTANCES + 1)]
        insert(
            c,
            "INSERT INTO tasks_instance (id, uuid, owner_id, provider_id, name, live_name, instance_type, image,"
            " status, cpu, memory_mb, disk_mb, bandwidth_mbps, addresses, provider_ref, holds_resources,"
            " needs_reconcile, created_at, updated_at)",
            "(%s, %s, %s, %s, %s, %s, %s, 'debian/12', 'running', 1, 512, 10240, 100, '[]', '{}', 1, 0, %s, NOW())",
            [
                (i, uuid.uuid4().hex, owner, prov, f"i{i}", f"i{i}", "vm" if i % 5 == 0 else "container", start)
                for i, owner, prov in instances
            ],
        )
        tasks, events = [], []
        for tid in range(1, TASKS + 1):
            i, owner, prov = instances[rng.randrange(INSTANCES)]
            created = start + timedelta(seconds=tid * 30 * 86400 // TASKS)
            status = "pending" if tid > TASKS - 200 else rng.choice(STATUSES)
            done = None if status == "pending" else created + timedelta(seconds=30)
            tasks.append((tid, uuid.uuid4().hex, rng.choice(TYPES), status, owner, owner, prov, i, created, done))
            events.append((tid, "transition", "", "pending", created))
            if done:
                events.append((tid, "step", "running", "running", created + timedelta(seconds=10)))
                events.append((tid, "transition", "running", status, done))
        insert(
            c,
            "INSERT INTO tasks_task (id, uuid, task_type, status, progress, status_message, error_code,"
            " error_message, cancel_reason, task_data, owner_id, initiator_id, provider_id, instance_id,"
            " timeout_seconds, created_at, completed_at, lease_token, worker, attempt_count, dispatch_count,"
            " checkpoints)",
            "(%s, %s, %s, %s, 0, '', '', '', '', '{}', %s, %s, %s, %s, 0, %s, %s, '', '', 0, 0, '{}')",
            tasks,
        )
        insert(
            c,
            "INSERT INTO tasks_taskevent (task_id, kind, from_status, to_status, actor, reason, progress, message, at)",
            "(%s, %s, %s, %s, 'worker', '', 0, '', %s)",
            events,
        )
        c.execute("SET SESSION foreign_key_checks=1")
        c.execute("ANALYZE TABLE tasks_task, tasks_taskevent, tasks_instance, auth_user")
        c.fetchall()
    stats.reset_cache()
    yield {"task": TASKS // 2, "user": "user0042", "uuid": tasks[TASKS // 3][1]}
    with django_db_blocker.unblock(), connection.cursor() as c:
        c.execute("SET SESSION foreign_key_checks=0")
        for table in ("tasks_taskevent", "tasks_task", "tasks_instance", "tasks_provider", "auth_user"):
            c.execute(f"DELETE FROM {table}")
        c.execute("SET SESSION foreign_key_checks=1")
    stats.reset_cache()


def task_pages(seeded) -> list[str]:
    since = (datetime.now(UTC) - timedelta(days=7)).strftime("%Y-%m-%d")
    pages = [
        "",
        "p=2",
        f"p={TASKS // 50}",  # the last page: read from the other end
        f"o={AGE_COLUMN}",  # oldest first
        f"o=-{AGE_COLUMN}",
        f"q={seeded['task']}",
        f"q={seeded['uuid']}",
        f"q={seeded['user']}",
        "q=i77",  # an instance name
        "state=active",
        "state=finished",
        "state=problem",
        "provider__id__exact=3",
        "status__exact=failed&provider__id__exact=3",
        "instance_type=vm",
        "instance_type=container",
        f"created_at__gte={since}",
        # triage (tasks/admin/triage.py): error code, finished within, stuck, and combinations
        "error_code=provider_error",
        "error_code=force_stopped&state=problem",
        "finished=15m",
        "finished=1h",
        "finished=24h",
        "finished=1h&state=problem",
        "finished=1h&error_code=provider_error",
        "finished=24h&status__exact=failed",
        "finished=1h&provider__id__exact=3",
        "stuck=yes",
    ]
    pages += [f"status__exact={s}" for s in ("pending", "completed", "failed", "cancelled", "timeout")]
    pages += [f"task_type__exact={t}" for t in TYPES]
    return ["/admin/tasks/task/?" + page for page in pages]


def event_pages(seeded) -> list[str]:
    pages = [
        "",
        "p=2",
        f"task__id__exact={seeded['task']}",
        f"q={seeded['task']}",
        f"q={seeded['uuid']}",
        "kind=step",
        "kind=transition",
    ]
    pages += [f"to_status={s}" for s in ("pending", "running", "completed", "failed", "cancelled", "timeout")]
    return ["/admin/tasks/taskevent/?" + page for page in pages]


def plans_of(client, url: str) -> list[tuple[str, list[dict]]]:
    """(sql, EXPLAIN rows) of every query of the page on the big tables, but the statistics' aggregates."""
    client.get(url)  # the first load builds the statistics base
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(url)
    assert response.status_code == 200, (url, response.status_code)
    result = []
    for query in ctx.captured_queries:
        sql = query["sql"]
        if not sql.startswith("SELECT") or not any(f"`{t}`" in sql for t in BIG_TABLES) or "GROUP BY" in sql:
            continue
        if sql.startswith("SELECT MIN("):  # the statistics' id bounds: read off the index ends
            continue
        with connection.cursor() as c:
            c.execute("EXPLAIN " + sql)
            names = [d[0] for d in c.description]
            result.append((sql, [dict(zip(names, row, strict=True)) for row in c.fetchall()]))
    return result


def bad_steps(plan: list[dict]) -> list[dict]:
    """Steps that scan a big table, or sort (on any table of the join: MariaDB marks the
    sort on the table that drives it, auth_user in the console's old front page)."""
    return [
        row
        for row in plan
        if (row["table"] in BIG_TABLES and row["type"] == "ALL")
        or "filesort" in (row["Extra"] or "")
        or "temporary" in (row["Extra"] or "")
    ]


@pytest.mark.django_db
@pytest.mark.parametrize("which", ["task", "event"])
def test_list_queries_use_an_index_without_sorting(seeded, admin_client, which):
    urls = task_pages(seeded) if which == "task" else event_pages(seeded)
    failures = []
    for url in urls:
        plans = plans_of(admin_client, url)
        assert plans, url
        for sql, plan in plans:
            if bad_steps(plan):
                failures.append(f"{url}\n  {sql}\n  " + "\n  ".join(map(str, plan)))
    assert not failures, "full scan or sort:\n" + "\n".join(failures)


@pytest.mark.django_db
def test_the_check_sees_a_sorting_plan(seeded):
    """The check itself: the joined page query the console used to run (a username search) is caught."""
    sql = (
        "SELECT tasks_task.id FROM tasks_task INNER JOIN auth_user ON auth_user.id = tasks_task.owner_id"
        " WHERE auth_user.username LIKE '%user00%' ORDER BY tasks_task.created_at DESC, tasks_task.id DESC LIMIT 50"
    )
    with connection.cursor() as c:
        c.execute("EXPLAIN " + sql)
        names = [d[0] for d in c.description]
        plan = [dict(zip(names, row, strict=True)) for row in c.fetchall()]
    assert bad_steps(plan), plan
