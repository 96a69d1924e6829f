"""Cost of each stage of the task pipeline, in one process: client CPU, wall time, statements.

    .venv/bin/python bench/pipeline/stages.py [--tasks 500] [--profile create|execute]
        [--database mysql://root@127.0.0.1:3306/cloudhost_bench] [--broker redis|orm]

Create (services.request_operation, admission included) then execute (the
worker's claim, no-op, finish and admission of the next) N tasks one after the
other, with no worker tier running: the jobs sent to the broker are left there.
Then hand-over: N tasks queued on a serial provider, run by one job
(worker.run_job), each admitted and claimed in its predecessor's finish.
Prints per task: client CPU (ms), wall (ms) and SQL statements of each stage.
``--profile STAGE`` also prints that stage's cProfile top 25 (cumulative).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.common import reset_data, setup_django  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", type=int, default=500)
    p.add_argument("--database", default="mysql://root@127.0.0.1:3306/cloudhost_bench")
    p.add_argument("--broker", choices=("redis", "orm"), default="redis")
    p.add_argument("--profile", choices=("create", "execute", "hand-over"))
    p.add_argument("--sort", default="cumulative", help="cProfile sort key (cumulative, tottime)")
    p.add_argument("--top", type=int, default=25, help="how many profile rows")
    return p.parse_args()


ARGS = parse()
setup_django(ARGS.database, ARGS.broker, WORKER_NODE="stages")

from django.contrib.auth import get_user_model  # noqa: E402
from django.db import connection  # noqa: E402

from tasks import services  # noqa: E402
from tasks.engine import worker  # noqa: E402
from tasks.models import Instance, Provider, Task  # noqa: E402


def statements() -> int:
    """Statements this connection sent so far (MySQL/MariaDB session counter; 0 elsewhere)."""
    if connection.vendor != "mysql":
        return 0
    with connection.cursor() as cur:
        cur.execute("SHOW SESSION STATUS LIKE 'Questions'")
        return int(cur.fetchone()[1]) + 1  # (the SHOW itself counts)


def stage(label: str, items, func, profile: bool, n: int | None = None) -> None:
    prof = cProfile.Profile(time.process_time) if profile else None  # CPU only, not waits
    sent = statements()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    if prof:
        prof.enable()
    for item in items:
        func(item)
    if prof:
        prof.disable()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    n = n or len(items)
    print(
        f"{label:10} client CPU {cpu / n * 1000:6.2f} ms   wall {wall / n * 1000:6.2f} ms   "
        f"statements {(statements() - sent) / n:5.1f} (commits included)"
    )
    if prof:
        pstats.Stats(prof).sort_stats(ARGS.sort).print_stats(ARGS.top)


def main() -> None:
    reset_data()
    user = get_user_model().objects.get_or_create(username="bench")[0]
    provider = Provider.objects.create(name="stages", allow_concurrent_tasks=True, max_concurrent_tasks=1000)
    names = [f"s-{i}" for i in range(ARGS.tasks + 1)]
    instances = Instance.objects.bulk_create(
        Instance(owner=user, provider=provider, name=n, live_name=n, image="noop", status="running") for n in names
    )
    # Warm up both stages (statement caches, imports).
    warm = services.request_operation(user, instances[0].pk, "restart")
    warm.refresh_from_db()
    worker.execute(warm.pk, warm.lease_token, heartbeat=False)
    tasks: list[Task] = []
    stage(
        "create",
        instances[1:],
        lambda inst: tasks.append(services.request_operation(user, inst.pk, "restart")),
        ARGS.profile == "create",
    )
    jobs = list(Task.objects.filter(pk__in=[t.pk for t in tasks]).order_by("pk").values_list("pk", "lease_token"))
    assert all(token for _, token in jobs), "every task is admitted (limit 1000)"
    stage("execute", jobs, lambda job: worker.execute(*job), ARGS.profile == "execute")
    done = Task.objects.filter(pk__in=[pk for pk, _ in jobs], status="completed").count()
    serial = Provider.objects.create(name="stages-serial")
    names = [f"h-{i}" for i in range(ARGS.tasks)]
    backlog = Instance.objects.bulk_create(
        Instance(owner=user, provider=serial, name=n, live_name=n, image="noop", status="running") for n in names
    )
    queued = [services.request_operation(user, inst.pk, "restart").pk for inst in backlog]
    first = Task.objects.get(pk=queued[0])
    stage(
        "hand-over",
        [first],
        lambda t: worker.run_job(t.pk, t.lease_token, 3600),
        ARGS.profile == "hand-over",
        n=len(queued),
    )
    done += Task.objects.filter(pk__in=queued, status="completed").count()
    total = len(jobs) + len(queued)
    print(f"{done}/{total} completed, database={connection.vendor}, broker={ARGS.broker}")


if __name__ == "__main__":
    main()
