"""What the worker tier of one machine costs: idle by number of providers, busy, and isolation.

    .venv/bin/python bench/tier_cost/run.py                      # both brokers, 1/10/40/100 providers
    .venv/bin/python bench/tier_cost/run.py --brokers redis --providers 1,40 --no-busy --no-isolation

For each broker (a child process per broker: Django reads the broker at start):

- idle: N simulated providers (limit 2), ``run_workers`` started and settled, then
  measured for ``--idle-seconds``: processes of the tier, their PSS (summed from
  /proc/<pid>/smaps_rollup: shared pages counted once), CPU (share of one core),
  and the database statements per second the tier sends (MariaDB's per-user
  statistics: the tier connects as its own user, so nobody else's queries count);
- busy: 40 providers at their limits at once (80 tasks sleeping ``--busy-sleep``
  seconds): each task's admission-to-start delay, and the tier's PSS per running task;
- isolation: provider B's created-to-running p95 with provider A idle, then while
  A holds a backlog of 1,000 short tasks; in ``--isolation-rounds`` rounds (each an
  unloaded then a loaded phase, A drained in between), the samples of each phase pooled.

Targets (issue 15) are printed as met or missed. Figures depend on the machine
and on what else runs on it: the run prints the load average next to them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import ROOT, ensure_database, pct, reset_data, setup_django, spawn, stop  # noqa: E402

TIER_USER = "bench_tier"
TARGETS = {
    "idle_processes": 12,
    "idle_pss_mb": 400,
    "idle_cpu_pct": 2.0,
    "idle_queries_redis": 5.0,
    "idle_queries_orm": 20.0,
    "busy_start_s": 2.0,
    "busy_pss_per_task_mb": 25.0,
    "isolation_ratio": 1.2,
}


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--database", default="mysql://root@127.0.0.1:3306/cloudhost_bench_tier")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/9")
    p.add_argument("--brokers", default="redis,orm")
    p.add_argument("--providers", default="1,10,40,100")
    p.add_argument("--idle-seconds", type=float, default=20.0)
    p.add_argument("--settle-seconds", type=float, default=8.0)
    p.add_argument("--no-busy", action="store_true")
    p.add_argument("--busy-providers", type=int, default=40)
    p.add_argument("--busy-sleep", type=float, default=20.0)
    p.add_argument("--no-isolation", action="store_true")
    p.add_argument("--backlog", type=int, default=1000)
    # (The p95 of 55 samples is their third-highest value: one scheduling hiccup moves it.)
    p.add_argument("--samples", type=int, default=200)
    # The machine's speed drifts between minutes (README, Benchmarks): one unloaded phase then
    # one loaded phase compares two moments. Alternating them in rounds, samples pooled per
    # phase, lets the drift fall on both.
    p.add_argument("--isolation-rounds", type=int, default=3)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.isolation_rounds < 1 or args.samples // max(1, args.isolation_rounds) < 20:
        p.error("--isolation-rounds: at least 1, with at least 20 samples per round (--samples)")
    return args


ARGS = parse()


# ----------------------------------------------------------------------------- parent
def main() -> None:
    results = {}
    for broker in ARGS.brokers.split(","):
        out = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--child", broker],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            print(f"{broker}: the run failed (exit {out.returncode}); see its output above")
            continue
        results[broker] = json.loads(lines[-1][len("RESULT ") :])
    report(results)


def report(results: dict) -> None:
    print(f"\nload average now: {os.getloadavg()[0]:.2f} (2 cores: figures above ~1 are shared with other work)")
    checks = []
    for broker, res in results.items():
        print(f"\n== {broker} broker: idle tier by number of providers (limit 2 each)")
        print(f"{'providers':>9} {'processes':>9} {'PSS MB':>8} {'CPU % core':>10} {'DB queries/s':>12}")
        q_target = TARGETS[f"idle_queries_{broker}"]
        for row in res["idle"]:
            print(
                f"{row['providers']:>9} {row['processes']:>9} {row['pss_mb']:>8.0f} "
                f"{row['cpu_pct']:>10.2f} {row['queries_per_s']:>12.2f}"
            )
            if row["providers"] >= 40:
                n = row["providers"]
                checks += [
                    (f"{broker}, {n} providers idle: processes <= 12", row["processes"] <= TARGETS["idle_processes"]),
                    (f"{broker}, {n} providers idle: PSS <= 400 MB", row["pss_mb"] <= TARGETS["idle_pss_mb"]),
                    (f"{broker}, {n} providers idle: CPU <= 2% of a core", row["cpu_pct"] <= TARGETS["idle_cpu_pct"]),
                    (
                        f"{broker}, {n} providers idle: DB queries/s <= {q_target:g}",
                        row["queries_per_s"] <= q_target,
                    ),
                ]
        busy = res.get("busy")
        if busy:
            print(
                f"\nbusy: {busy['tasks']} tasks on {busy['providers']} providers at once: "
                f"admission->start p50 {busy['start_p50']:.2f} s, p95 {busy['start_p95']:.2f} s, "
                f"max {busy['start_max']:.2f} s; all completed: {busy['completed']}/{busy['tasks']}"
            )
            print(
                f"      tier while they ran: {busy['processes']} processes, PSS {busy['pss_mb']:.0f} MB = "
                f"{busy['pss_per_task_mb']:.1f} MB per running task ({busy['running']} running at the sample)"
            )
            checks += [
                (f"{broker}, busy: every task starts within 2 s of admission", busy["start_max"] <= 2.0),
                (f"{broker}, busy: PSS per running task <= 25 MB", busy["pss_per_task_mb"] <= 25.0),
            ]
        iso = res.get("isolation")
        if iso:
            print(
                f"\nisolation: provider B created->running p95 {iso['unloaded_p95'] * 1000:.1f} ms unloaded, "
                f"{iso['loaded_p95'] * 1000:.1f} ms while A holds a backlog of {iso['backlog']} "
                f"(ratio {iso['ratio']:.2f}; p50 {iso['unloaded_p50'] * 1000:.1f} / {iso['loaded_p50'] * 1000:.1f} ms; "
                f"{iso['samples'][0]} / {iso['samples'][1]} samples, taken while A had tasks waiting"
                f"; per round: {', '.join(f'{u * 1000:.1f}/{lo * 1000:.1f}' for u, lo, *_ in iso.get('rounds', []))})"
            )
            checks.append((f"{broker}, isolation: loaded p95 <= 1.2x unloaded", iso["ratio"] <= 1.2))
    if checks:
        print("\ntargets:")
        for label, ok in checks:
            print(f"  {'met   ' if ok else 'MISSED'} {label}")


# ------------------------------------------------------------------------------ child
def tier_database_url() -> str:
    """The benchmark database, as the tier's own MariaDB user (its statements counted apart)."""
    from config.env import parse_database_url

    d = parse_database_url(ARGS.database, ROOT)
    return f"mysql://{TIER_USER}:{TIER_USER}@{d['HOST'] or '127.0.0.1'}:{d['PORT'] or 3306}/{d['NAME']}"


def prepare_tier_user() -> None:
    from django.db import connection

    name = connection.settings_dict["NAME"]
    with connection.cursor() as cur:
        cur.execute(f"CREATE USER IF NOT EXISTS '{TIER_USER}'@'%' IDENTIFIED BY '{TIER_USER}'")
        cur.execute(f"CREATE USER IF NOT EXISTS '{TIER_USER}'@'localhost' IDENTIFIED BY '{TIER_USER}'")
        cur.execute(f"GRANT ALL ON `{name}`.* TO '{TIER_USER}'@'%'")
        cur.execute(f"GRANT ALL ON `{name}`.* TO '{TIER_USER}'@'localhost'")
        cur.execute("SET GLOBAL userstat = 1")


def tier_statements() -> int:
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute(
            "SELECT SELECT_COMMANDS + UPDATE_COMMANDS + OTHER_COMMANDS FROM information_schema.USER_STATISTICS"
            " WHERE USER = %s",
            [TIER_USER],
        )
        row = cur.fetchone()
    return int(row[0]) if row else 0


def node_processes(node: str):
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "environ"]):
        try:
            if (proc.info["environ"] or {}).get("WORKER_NODE") == node:
                found.append(proc)
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
    return found


def pss_mb(procs) -> float:
    total = 0
    for proc in procs:
        try:
            with open(f"/proc/{proc.pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total / 1024


def cpu_seconds(procs) -> dict[int, float]:
    import psutil

    out = {}
    for proc in procs:
        try:
            t = proc.cpu_times()
            out[proc.pid] = t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            continue
    return out


def start_tier(node: str, **env) -> subprocess.Popen:
    tier = spawn(["run_workers"], WORKER_NODE=node, DATABASE_URL=tier_database_url(), LOG_LEVEL="info", **env)
    status = Path(os.environ["VAR_DIR"]) / f"workers-{node}" / "pool.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if json.loads(status.read_text()).get("clusters"):
                break
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.2)
    else:
        raise SystemExit(f"the tier of {node} did not start (see {Path('/tmp/bench.log')})")
    return tier


def make_providers(n: int, limit: int = 2, prefix: str = "tc"):
    from tasks.models import Provider

    return [
        Provider.objects.create(name=f"{prefix}-{i}", allow_concurrent_tasks=limit > 1, max_concurrent_tasks=limit)
        for i in range(n)
    ]


def make_instances(user, provider, n: int):
    from tasks.models import Instance

    names = [f"{provider.name}-{i}" for i in range(n)]
    return Instance.objects.bulk_create(
        Instance(owner=user, provider=provider, name=x, live_name=x, image="noop", status="running") for x in names
    )


def idle(n: int) -> dict:
    reset_data()
    make_providers(n)
    node = f"tiercost-{n}"
    tier = start_tier(node)
    try:
        time.sleep(ARGS.settle_seconds)
        procs = node_processes(node)
        cpu0, q0, t0 = cpu_seconds(procs), tier_statements(), time.monotonic()
        time.sleep(ARGS.idle_seconds)
        procs = node_processes(node)
        cpu1, q1, wall = cpu_seconds(procs), tier_statements(), time.monotonic() - t0
        used = sum(cpu1[pid] - cpu0.get(pid, 0.0) for pid in cpu1)
        return {
            "providers": n,
            "processes": len(procs),
            "pss_mb": pss_mb(procs),
            "cpu_pct": 100 * used / wall,
            "queries_per_s": (q1 - q0) / wall,
        }
    finally:
        stop(tier, node)


def busy(user) -> dict:
    from tasks import services
    from tasks.models import Task

    reset_data()
    providers = make_providers(ARGS.busy_providers)
    instances = [inst for p in providers for inst in make_instances(user, p, 2)]
    node = "tiercost-busy"
    tier = start_tier(node)
    try:
        time.sleep(ARGS.settle_seconds)
        ids = []
        lock = threading.Lock()

        def queue(inst):
            t = services.request_operation(user, inst.pk, "restart", task_data={"sleep": ARGS.busy_sleep})
            with lock:
                ids.append(t.pk)

        from bench.common import in_threads

        in_threads(4, instances, queue)
        # Sample the tier while all run (they sleep busy_sleep seconds).
        deadline = time.monotonic() + ARGS.busy_sleep
        best = (0, 0.0, 0)
        while time.monotonic() < deadline:
            running = Task.objects.filter(pk__in=ids, status="running").count()
            if running >= best[0]:
                procs = node_processes(node)
                best = (running, pss_mb(procs), len(procs))
            if running == len(ids):
                break
            time.sleep(0.5)
        wait = time.monotonic() + ARGS.busy_sleep + 60
        while Task.objects.filter(pk__in=ids, status__in=["pending", "running"]).exists() and time.monotonic() < wait:
            time.sleep(0.5)
        done = list(Task.objects.filter(pk__in=ids))
        delays = [(t.started_at - t.admitted_at).total_seconds() for t in done if t.started_at and t.admitted_at]
        running, pss, processes = best
        return {
            "providers": len(providers),
            "tasks": len(ids),
            "completed": sum(t.status == "completed" for t in done),
            "start_p50": pct(delays, 0.5),
            "start_p95": pct(delays, 0.95),
            "start_max": max(delays),
            "running": running,
            "processes": processes,
            "pss_mb": pss,
            "pss_per_task_mb": pss / max(1, running),
        }
    finally:
        stop(tier, node)


def isolation(user) -> dict:
    from tasks import services
    from tasks.models import Task

    reset_data()
    a, b = make_providers(2, prefix="iso")
    a_instances = make_instances(user, a, ARGS.backlog)
    b_instances = make_instances(user, b, ARGS.samples * 2 + 5)
    node = "tiercost-iso"
    tier = start_tier(node)

    def sample(instances, backlog_of=None) -> list[float]:
        """Created-to-running of one B task at a time; with ``backlog_of``, only while that
        provider still has tasks waiting (a loaded sample must be taken under load)."""
        out = []
        for inst in instances:
            if backlog_of is not None and not Task.objects.filter(provider=backlog_of, status="pending").exists():
                break
            t = services.request_operation(user, inst.pk, "restart")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                t.refresh_from_db(fields=["status", "started_at", "created_at"])
                if t.started_at:
                    break
                time.sleep(0.002)
            out.append((t.started_at - t.created_at).total_seconds())
            while Task.objects.filter(pk=t.pk, status__in=["pending", "running"]).exists():
                time.sleep(0.005)
            time.sleep(0.05)
        return out

    def drained() -> None:
        deadline = time.monotonic() + 600
        while Task.objects.filter(provider=a, status__in=["pending", "running"]).exists():
            if time.monotonic() > deadline:
                raise SystemExit("provider A's backlog did not drain in 10 minutes")
            time.sleep(0.2)

    from bench.common import in_threads

    b_left = iter(b_instances)
    unloaded: list[float] = []
    loaded: list[float] = []
    rounds = []
    left = 0
    try:
        time.sleep(ARGS.settle_seconds)
        sample([next(b_left) for _ in range(5)])  # warm
        backlog: list[int] = []
        lock = threading.Lock()

        def queue(inst):
            t = services.request_operation(user, inst.pk, "restart", task_data={"sleep": 0.05})
            with lock:
                backlog.append(t.pk)

        per = ARGS.samples // ARGS.isolation_rounds
        for r in range(ARGS.isolation_rounds):
            quiet = sample([next(b_left) for _ in range(per)])
            backlog.clear()
            in_threads(4, a_instances, queue)
            time.sleep(2)  # the pool has grown for A if it needed to
            busy_ = sample([next(b_left) for _ in range(per)], backlog_of=a)
            left = Task.objects.filter(pk__in=backlog, status="pending").count()
            if not busy_:
                raise SystemExit(f"round {r + 1}: A's backlog of {ARGS.backlog} drained before any loaded sample")
            rounds.append((pct(quiet, 0.95), pct(busy_, 0.95), len(quiet), len(busy_)))
            print(
                f"  isolation round {r + 1}: p95 {rounds[-1][0] * 1000:.1f} ms unloaded, "
                f"{rounds[-1][1] * 1000:.1f} ms loaded ({len(quiet)} / {len(busy_)} samples; A left {left})",
                flush=True,
            )
            unloaded += quiet
            loaded += busy_
            drained()  # A idle again before the next round's unloaded samples
        return {
            "backlog": ARGS.backlog,
            "a_still_pending": left,
            "samples": (len(unloaded), len(loaded)),
            "rounds": rounds,
            "unloaded_p50": pct(unloaded, 0.5),
            "unloaded_p95": pct(unloaded, 0.95),
            "loaded_p50": pct(loaded, 0.5),
            "loaded_p95": pct(loaded, 0.95),
            "ratio": pct(loaded, 0.95) / max(1e-6, pct(unloaded, 0.95)),
        }
    finally:
        stop(tier, node)


def child(broker: str) -> None:
    import tempfile

    var = tempfile.mkdtemp(prefix="bench-tier-")
    ensure_database(ARGS.database)
    setup_django(
        ARGS.database,
        broker,
        REDIS_URL=ARGS.redis_url,
        VAR_DIR=var,
        SIMULATED_SPEED="0.01",
        Q_POLL_SECONDS="0.05",  # the shipped default (bench.common sets 0.02 for the pipeline)
        TASK_EXTRA_OPERATIONS="bench.pipeline.noop_ops",
    )
    prepare_tier_user()
    from django.contrib.auth import get_user_model

    from tasks.models import UserQuota

    result: dict = {"idle": []}
    for n in [int(x) for x in ARGS.providers.split(",") if x]:
        row = idle(n)
        print(f"[{broker}] idle, {n} providers: {row}", flush=True)
        result["idle"].append(row)
    user, _ = get_user_model().objects.get_or_create(username="bench-tier")
    UserQuota.objects.filter(user=user).delete()
    if not ARGS.no_busy:
        result["busy"] = busy(user)
        print(f"[{broker}] busy: {result['busy']}", flush=True)
    if not ARGS.no_isolation:
        result["isolation"] = isolation(user)
        print(f"[{broker}] isolation: {result['isolation']}", flush=True)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    if ARGS.child:
        child(ARGS.child)
    else:
        main()
