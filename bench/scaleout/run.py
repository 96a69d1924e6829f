"""Scale-out benchmark: 1, 2 and 3 worker machines on MariaDB + Redis.

    .venv/bin/python bench/scaleout/run.py [--tasks 10000] [--providers 20] [--limit 2]
        [--machines 1,2,3] [--database mysql://root@127.0.0.1:3306/cloudhost_bench]

For each machine count: that many `run_workers` processes (each its own
WORKER_NODE), N no-op tasks over P providers created by 4 producer threads;
throughput from the first create to the last completion; created-to-running
latency p50/p95 on the idle system afterwards (one task at a time). Then the
recovery time after kill -9 of a whole machine: from the kill to the task
ending failed/worker_lost (bound: TASK_LEASE_SECONDS + TASK_SWEEP_SECONDS).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.common import in_threads, pct, reset_data, setup_django, spawn, stop, wait_all_done  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--tasks", type=int, default=10_000)
p.add_argument("--providers", type=int, default=20)
p.add_argument("--limit", type=int, default=2)
p.add_argument("--machines", default="1,2,3")
p.add_argument("--database", default="mysql://root@127.0.0.1:3306/cloudhost_bench")
p.add_argument("--latency-samples", type=int, default=100)
ARGS = p.parse_args()
setup_django(ARGS.database, "redis")

from django.conf import settings  # noqa: E402
from django.contrib.auth import get_user_model  # noqa: E402

from tasks import services  # noqa: E402
from tasks.models import Instance, Provider, Task  # noqa: E402
from tests.engine.harness import kill_node_processes  # noqa: E402


def make_fleet(user):
    providers = [
        Provider.objects.create(name=f"s{i}", allow_concurrent_tasks=ARGS.limit > 1, max_concurrent_tasks=ARGS.limit)
        for i in range(ARGS.providers)
    ]
    per = ARGS.tasks // ARGS.providers + 2
    fleet = {}
    for prov in providers:
        names = [f"s{prov.pk}-{i}" for i in range(per)]
        fleet[prov.pk] = Instance.objects.bulk_create(
            Instance(owner=user, provider=prov, name=n, live_name=n, image="noop", status="running") for n in names
        )
    return providers, fleet


def start_machines(k: int) -> list[tuple[str, object]]:
    machines = []
    for i in range(k):
        node = f"bench-m{i}"
        machines.append((node, spawn(["run_workers", "--no-maintenance"], WORKER_NODE=node)))
    return machines


def run(k: int, user) -> dict:
    reset_data()
    providers, fleet = make_fleet(user)
    machines = start_machines(k)
    try:
        warm = [services.request_operation(user, fleet[p.pk][0].pk, "restart").pk for p in providers]
        wait_all_done(warm, 300)
        targets = []
        for i in range(1, ARGS.tasks // ARGS.providers + 1):
            targets += [fleet[p.pk][i] for p in providers]
        ids, lock = [], threading.Lock()

        def create(inst):
            pk = services.request_operation(user, inst.pk, "restart").pk
            with lock:
                ids.append(pk)

        t0 = time.time()
        in_threads(4, targets, create)
        wait_all_done(ids)
        last = max(t.completed_at.timestamp() for t in Task.objects.filter(pk__in=ids).only("completed_at"))
        tps = len(ids) / (last - t0)
        lat = []
        for i in range(ARGS.latency_samples):
            inst = fleet[providers[i % len(providers)].pk][-1]
            task = services.request_operation(user, inst.pk, "restart")
            wait_all_done([task.pk], 30)
            task.refresh_from_db()
            lat.append((task.started_at - task.created_at).total_seconds() * 1000)
            time.sleep(random.uniform(0.02, 0.1))
    finally:
        for node, proc in machines:
            stop(proc, node)
    return {"tps": tps, "n": len(ids), "p50": pct(lat, 0.5), "p95": pct(lat, 0.95)}


def recovery(user) -> float:
    """kill -9 of a whole machine running a task -> seconds until it ends worker_lost."""
    reset_data()
    prov = Provider.objects.create(name="victim")
    inst = Instance.objects.create(owner=user, provider=prov, name="v", live_name="v", image="noop", status="running")
    os.environ["TASK_EXTRA_OPERATIONS"] = "tests.engine.ops_for_tests"
    machines = start_machines(2)
    try:
        task = services.request_operation(user, inst.pk, "restart", task_data={"sleep": 600})
        deadline = time.monotonic() + 120
        while not Task.objects.filter(pk=task.pk, status="running").exists():
            if time.monotonic() > deadline:
                raise SystemExit("victim task never started")
            time.sleep(0.05)
        task.refresh_from_db()
        node = task.worker.split(":")[0]
        proc = dict(machines)[node]
        os.killpg(proc.pid, signal.SIGKILL)
        kill_node_processes(node)
        killed = time.monotonic()
        while not Task.objects.filter(pk=task.pk, status="failed").exists():
            if time.monotonic() - killed > 120:
                raise SystemExit("not recovered in 120 s")
            time.sleep(0.02)
        return time.monotonic() - killed
    finally:
        for node, proc in machines:
            if proc.poll() is None:
                stop(proc, node)


def main() -> None:
    user = get_user_model().objects.get_or_create(username="bench")[0]
    rows = [(k, run(k, user)) for k in (int(x) for x in ARGS.machines.split(","))]
    rec = recovery(user)
    print(
        f"\nscale-out benchmark: {ARGS.tasks} no-op tasks over {ARGS.providers} providers (limit {ARGS.limit}), "
        "MariaDB + Redis, 4 producer threads"
    )
    print(f"{'machines':>9}{'tasks/s':>10}{'latency p50 ms':>17}{'latency p95 ms':>17}")
    for k, r in rows:
        print(f"{k:>9}{r['tps']:>10.1f}{r['p50']:>17.1f}{r['p95']:>17.1f}")
    print(
        f"recovery after kill -9 of a machine: {rec:.1f} s "
        f"(bound: lease {settings.TASK_LEASE_SECONDS:g} s + sweep {settings.TASK_SWEEP_SECONDS:g} s)"
    )


if __name__ == "__main__":
    main()
