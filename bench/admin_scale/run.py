"""The admin console at a million tasks: every page an operator clicks, over HTTP.

Runs against the bench/api_scale database (1,000,000 tasks, ~3M events, 5,000
users, 20,000 instances; loaded by bench/api_scale when missing), adds what that
benchmark does not load (a port mapping per instance, a quota per user, worker
rows), starts gunicorn (2 workers x 4 threads, as run.sh), logs in through the
login form, and loads every page the console offers: each list, each list
filter (every choice of it), the searches, deep pages, the task and instance
pages, the dashboard. Per page: p50/p95 of 20 loads, met/missed against the
target, and the EXPLAIN of the page's slowest query (measured in-process on the
same database, with the same user).

    DATABASE_URL=mysql://root@127.0.0.1:3306/cloudhost_bench_api \\
        .venv/bin/python bench/admin_scale/run.py [--loads 20] [--only task] [--port 8021]

Target (issue 21): every page p95 < 300 ms at 1M tasks.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

from bench.api_scale import run as api_scale  # noqa: E402

TARGET_MS = 300
ADMIN_USER, ADMIN_PASSWORD = "benchadmin", "bench-pass-123"
WARMUP = 4  # per page: reaches both gunicorn workers (each keeps its own statistics base)


# ------------------------------------------------------------------ data


def ensure_extras() -> None:
    """Port mappings, quotas and worker rows, once (idempotent)."""
    from django.db import connection

    from tasks.models import PortMapping, UserQuota, Worker

    with connection.cursor() as c:
        if not PortMapping.objects.exists():
            c.execute(
                "INSERT INTO tasks_portmapping (instance_id, provider_id, protocol, host_port_start, host_port_end,"
                " guest_port_start, guest_port_end, is_ssh, description, status, created_at, updated_at)"
                " SELECT id, provider_id, 'tcp', 20000 + id % 10000, 20000 + id % 10000, 22, 22, 1, 'ssh',"
                " IF(id % 50 = 0, 'deleted', 'active'), created_at, NOW() FROM tasks_instance"
            )
            print(f"port mappings: {c.rowcount} added")
        if not UserQuota.objects.exists():
            c.execute(
                "INSERT INTO tasks_userquota (user_id, max_instances, max_cpu, max_memory_mb, max_disk_mb,"
                " max_ports, used_instances, used_cpu, used_memory_mb, used_disk_mb)"
                " SELECT u.id, 10, 40, 65536, 1048576, 50, COUNT(i.id), COUNT(i.id), 512 * COUNT(i.id),"
                " 10240 * COUNT(i.id) FROM auth_user u LEFT JOIN tasks_instance i ON i.owner_id = u.id GROUP BY u.id"
            )
            print(f"user quotas: {c.rowcount} added")
        if not Worker.objects.exists():
            rows = []
            for node in range(1, 5):
                for n in range(25):
                    stale = n >= 20
                    rows.append(
                        (
                            f"node{node}:{1000 + n}",
                            f"node{node}",
                            f"node{node}.example",
                            1000 + n,
                            f"provider-{(node * 25 + n) % 50 + 1:02d}" if n else "supervisor",
                            "supervisor" if n == 0 else "worker",
                            3600 if stale else 2,
                            n * 7,
                            int(n == 5),
                        )
                    )
            c.executemany(
                "INSERT INTO tasks_worker (name, node, host, pid, queue, role, started_at, last_heartbeat,"
                " current_task_id, tasks_run, draining)"
                " VALUES (%s,%s,%s,%s,%s,%s, NOW() - INTERVAL 1 DAY, NOW() - INTERVAL %s SECOND, NULL, %s, %s)",
                rows,
            )
            print(f"workers: {len(rows)} added")
        c.execute("ANALYZE TABLE tasks_portmapping, tasks_userquota, tasks_worker")
        c.fetchall()


# ------------------------------------------------------------------ pages


def pages(rng: random.Random) -> list[tuple[str, object]]:
    """(name, url or a function giving a url per load): the issue's table, then every filter."""
    from tasks.engine.states import TaskStatus, TaskType
    from tasks.models import Instance, PortMapping, Provider, Task

    max_task = Task.objects.order_by("-id").values_list("id", flat=True).first()
    max_instance = Instance.objects.order_by("-id").values_list("id", flat=True).first()
    providers = list(Provider.objects.values_list("id", flat=True))
    t, e, i = "/admin/tasks/task/", "/admin/tasks/taskevent/", "/admin/tasks/instance/"
    p, q, w = "/admin/tasks/portmapping/", "/admin/tasks/userquota/", "/admin/tasks/worker/"
    last_page = (Task.objects.count() + 49) // 50
    uuids = [
        str(u)
        for u in Task.objects.filter(id__in=rng.sample(range(1, max_task + 1), 40)).values_list("uuid", flat=True)
    ]

    def some(fmt, values):
        return lambda: fmt.format(rng.choice(values))

    def task_id():
        return rng.randint(1, max_task)

    result: list[tuple[str, object]] = [
        # the table
        ("task list (front page)", t),
        ("task list, search by username", lambda: f"{t}?q=user{rng.randint(1, 5000):05d}"),
        ("task list, search by task id", lambda: f"{t}?q={task_id()}"),
        ("task list, search by task uuid", some(t + "?q={}", uuids)),
        ("task list, page 500", f"{t}?p=500"),
        ("task list, type = create", f"{t}?task_type__exact=create"),
        ("task list, status = failed", f"{t}?status__exact=failed"),
        ("task list, status = failed, show counts", f"{t}?status__exact=failed&_facets=True"),
        ("events list", e),
        ("events of one task", lambda: f"{e}?task__id__exact={task_id()}"),
        ("task list, active", f"{t}?state=active"),
        ("task list, provider", some(t + "?provider__id__exact={}", providers)),
        ("task page", lambda: f"{t}{task_id()}/change/"),
        ("dashboard", f"{t}dashboard/"),
        ("instance list", i),
        ("provider list", "/admin/tasks/provider/"),
        # deep pages and searches
        ("task list, page 2", f"{t}?p=2"),
        ("task list, last page", f"{t}?p={last_page}"),
        ("task list, oldest first", f"{t}?o=9"),
        ("task list, search by instance name", lambda: f"{t}?q=i{rng.randint(1, max_instance)}"),
        ("task list, search matching 1000 users", f"{t}?q=user04"),
        ("task list, search matching every user", f"{t}?q=user"),
        ("task list, search without a match", f"{t}?q=nobody-here"),
        ("task list, status = failed + provider", some(t + "?status__exact=failed&provider__id__exact={}", providers)),
        ("task list, finished + type = create", f"{t}?state=finished&task_type__exact=create"),
    ]
    # every choice of every task filter
    result += [(f"task list, state = {key}", f"{t}?state={key}") for key in ("finished", "problem")]
    result += [(f"task list, status = {s}", f"{t}?status__exact={s}") for s in TaskStatus.values if s != "failed"]
    result += [(f"task list, type = {s}", f"{t}?task_type__exact={s}") for s in TaskType.values if s != "create"]
    result += [(f"task list, instance type = {s}", f"{t}?instance_type={s}") for s in ("container", "vm")]
    for label, days in (("today", 0), ("past 7 days", 7), ("this month", -1), ("this year", -2)):
        result.append((f"task list, created {label}", date_filter_url(t, "created_at", days)))
    # events
    result += [
        ("events list, page 500", f"{e}?p=500"),
        ("events, search by task id", lambda: f"{e}?q={task_id()}"),
        ("events, search by task uuid", some(e + "?q={}", uuids)),
        ("events, kind = transition", f"{e}?kind=transition"),
        ("events, kind = step", f"{e}?kind=step"),
    ]
    result += [(f"events, to status = {s}", f"{e}?to_status={s}") for s in TaskStatus.values]
    # instances
    result += [
        ("instance page", lambda: f"{i}{rng.randint(1, max_instance)}/change/"),
        ("instance list, search by name", lambda: f"{i}?q=i{rng.randint(1, max_instance)}"),
        ("instance list, search by username", lambda: f"{i}?q=user{rng.randint(1, 5000):05d}"),
        ("instance list, provider", some(i + "?provider__id__exact={}", providers)),
        ("instance list, needs reconcile", f"{i}?needs_reconcile__exact=1"),
        ("instance list, page 200", f"{i}?p=200"),
    ]
    result += [
        (f"instance list, status = {s}", f"{i}?status__exact={s}")
        for s, _ in Instance._meta.get_field("status").choices
    ]
    result += [(f"instance list, type = {s}", f"{i}?instance_type__exact={s}") for s in ("container", "vm")]
    # port mappings, quotas, workers
    result += [
        ("port mappings", p),
        ("port mappings, search by instance name", lambda: f"{p}?q=i{rng.randint(1, max_instance)}"),
        ("port mappings, search by host port", lambda: f"{p}?q={20000 + rng.randint(0, 9999)}"),
        ("port mappings, provider", some(p + "?provider__id__exact={}", providers)),
        ("port mappings, ssh", f"{p}?is_ssh__exact=1"),
        ("port mappings, protocol = udp", f"{p}?protocol__exact=udp"),
    ]
    result += [(f"port mappings, status = {s}", f"{p}?status__exact={s}") for s, _ in PortMapping.STATUS_CHOICES]
    result += [
        ("user quotas", q),
        ("user quotas, search by username", lambda: f"{q}?q=user{rng.randint(1, 5000):05d}"),
        ("workers", w),
        ("workers, alive", f"{w}?alive=yes"),
        ("workers, stale", f"{w}?alive=no"),
        ("workers, role = worker", f"{w}?role=worker"),
        ("workers, show counts", f"{w}?_facets=True"),
    ]
    return result


def date_filter_url(base: str, field: str, days: int) -> str:
    """The URL of a choice of Django's date filter (0: today, 7: past 7 days, -1: this month, -2: this year)."""
    from datetime import timedelta

    from django.utils import timezone

    today = timezone.localtime().replace(hour=0, minute=0, second=0, microsecond=0)
    if days == 0:
        since, until = today, today + timedelta(days=1)
    elif days > 0:
        since, until = today - timedelta(days=days), today + timedelta(days=1)
    elif days == -1:
        since = today.replace(day=1)
        until = (since + timedelta(days=32)).replace(day=1)
    else:
        since, until = today.replace(month=1, day=1), today.replace(year=today.year + 1, month=1, day=1)
    from urllib.parse import urlencode

    return f"{base}?{urlencode({f'{field}__gte': str(since), f'{field}__lt': str(until)})}"


# ------------------------------------------------------------------ HTTP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gunicorn(port: int) -> subprocess.Popen:
    env = {**os.environ, "DJANGO_DEBUG": "0", "LOG_LEVEL": "warning", "REDIS_URL": "redis://127.0.0.1:6379/1"}
    proc = subprocess.Popen(
        [
            str(ROOT / ".venv/bin/gunicorn"),
            "config.wsgi:application",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "2",
            "--threads",
            "4",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    sys.exit("gunicorn did not start")


def login(base: str):
    import requests

    session = requests.Session()
    url = f"{base}/admin/login/"
    form = session.get(url)
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text).group(1)
    response = session.post(
        url,
        data={"username": ADMIN_USER, "password": ADMIN_PASSWORD, "csrfmiddlewaretoken": token, "next": "/admin/"},
        headers={"Referer": url},
        allow_redirects=False,
    )
    if response.status_code != 302 or "sessionid" not in session.cookies:
        sys.exit(f"login failed: HTTP {response.status_code}")
    return session


# ------------------------------------------------------------------ EXPLAIN


def slowest_query(url: str) -> tuple[float, str, str]:
    """(ms, sql, EXPLAIN) of the slowest SELECT the page runs, in-process."""
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    client = Client()
    client.force_login(get_user_model().objects.get(username=ADMIN_USER))
    client.get(url)
    with CaptureQueriesContext(connection) as ctx:
        client.get(url)
    selects = [q for q in ctx.captured_queries if q["sql"].lstrip().upper().startswith("SELECT")]
    if not selects:
        return 0.0, "", ""
    worst = max(selects, key=lambda q: float(q["time"]))
    return float(worst["time"]) * 1000, worst["sql"], api_scale.explain(worst["sql"])


def explain_page(name: str, url: str) -> None:
    ms, sql, plan = slowest_query(url)
    print(f"\n  {name}: GET {url}\n    slowest query {ms:.1f} ms: {sql[:400]}{' ...' if len(sql) > 400 else ''}")
    print(plan, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", type=int, default=20, help="measured loads per page (0: the EXPLAINs only)")
    parser.add_argument("--only", default="", help="only pages whose name contains this")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--no-explain", action="store_true")
    parser.add_argument("--tasks", type=int, default=1_000_000, help="tasks to load into an empty database")
    args = parser.parse_args()
    api_scale.setup_django()
    from tasks.models import Task

    have = Task.objects.order_by("-id").values_list("id", flat=True).first() or 0
    if have == 0:
        api_scale.load(args.tasks)
    elif have != args.tasks:
        print(f"the database holds {have} tasks, not {args.tasks}: measuring what is there")
    ensure_extras()
    rng = random.Random(21)
    todo = [(name, url) for name, url in pages(rng) if args.only in name]
    if args.loads == 0:  # EXPLAINs only
        for name, make in todo:
            explain_page(name, make() if callable(make) else make)
        return
    port = args.port or free_port()
    server = start_gunicorn(port)
    base = f"http://127.0.0.1:{port}"
    try:
        session = login(base)
        print(f"gunicorn 2 workers x 4 threads on :{port}; logged in as {ADMIN_USER}")
        print(f"load average before measuring: {os.getloadavg()} on {os.cpu_count()} CPUs\n")
        print(f"{'page':48} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}  target {TARGET_MS} ms")
        results = []
        for name, make in todo:
            url_of = make if callable(make) else (lambda u=make: u)
            for _ in range(WARMUP):
                session.get(base + url_of())
            times, codes, last = [], set(), ""
            for _ in range(args.loads):
                last = url_of()
                t0 = time.perf_counter()
                response = session.get(base + last)
                times.append((time.perf_counter() - t0) * 1000)
                codes.add(response.status_code)
                if "/login/" in response.url:
                    codes.add("login page")
            p50, p95 = api_scale.percentile(times, 0.5), api_scale.percentile(times, 0.95)
            met = p95 < TARGET_MS and codes == {200}
            results.append((name, last, p50, p95, met))
            flag = "met" if met else "MISSED"
            print(f"{name:48} {p50:8.1f} {p95:8.1f} {max(times):8.1f}  {flag} {sorted(codes, key=str)}", flush=True)
        print(f"\nload average after measuring: {os.getloadavg()}")
        missed = [r for r in results if not r[4]]
        print(
            f"{len(results) - len(missed)} of {len(results)} pages met p95 < {TARGET_MS} ms; missed: "
            f"{', '.join(r[0] for r in missed) or 'none'}"
        )
        if not args.no_explain:
            print("\nThe slowest query of each page (in-process, the same database) and its EXPLAIN:")
            for name, url, *_ in results:
                explain_page(name, url)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
