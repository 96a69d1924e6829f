"""Soak: mixed operations on two worker machines while one of them restarts every 10 s.

    .venv/bin/python bench/soak/run.py [--ops 300] [--providers 6] [--interval 0.5]
        [--restart-every 10] [--grace 1] [--speed 0.1] [--seed 16]
        [--database mysql://root@127.0.0.1:3306/cloudhost_bench_soak]

Issue 16's soak: ``--ops`` operations (the nine types: create, start, stop,
restart, reset, reset-password, create-port, delete-port, delete) requested
through ``tasks.services`` one every ``--interval`` seconds, over ``--providers``
simulated providers with limits 1 and 2, on two ``run_workers`` tiers
(WORKER_NODE machine-a and machine-b) with Redis as the broker and the
simulated provider at realistic speed (SIMULATED_SPEED 0.1: a create takes
about 3 s). Every ``--restart-every`` seconds one machine is restarted,
alternating the machine and the signal: SIGTERM (the tier drains: what still
runs after TASK_SHUTDOWN_GRACE_SECONDS is handed back) and kill -9 (the whole
tier dies; its tasks are resumed once their leases run out). Lease settings
are short (as tests/engine/harness.py FAST) so recovery is quick.

The benchmark starts its own redis-server on a free port and uses its own
database (created if missing, emptied at start) and a fresh VAR_DIR (the
simulated hosts' state) under /tmp; every process it starts is stopped at the
end. Tier logs stay in that directory (printed at the end) for diagnosis.

Printed: tasks by final status; tasks with more than one attempt and the
resumptions by reason (handback, worker_lost); limit violations (from the
simulated provider's execution record: every mutating call's start and end,
per provider; and from the tasks' timelines: claim to release, per provider);
tasks run twice at once (two overlapping calls on one guest in the record);
orphan guests (a guest with no live instance, a live instance with no guest);
accounting drift (check_accounting's findings); the wall time. Then a
``targets`` block, met or missed. Every task that did not complete, and every
task involved in a violation, is listed with its timeline.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.common import pct, reset_data, setup_django  # noqa: E402

TYPES = (
    "create",
    "start",
    "stop",
    "restart",
    "reset",
    "reset-password",
    "create-port",
    "delete-port",
    "delete",
)

# Short leases (tests/engine/harness.py FAST, the lease a little longer: a database read
# timeout of lease - heartbeat - 1 = 3 s instead of 1 s on a shared 2-core machine).
FAST = {
    "TASK_LEASE_SECONDS": "5",
    "TASK_HEARTBEAT_SECONDS": "1",
    "TASK_CANCEL_POLL_SECONDS": "0.2",
    "TASK_SWEEP_SECONDS": "0.5",
    "TASK_HARD_KILL_GRACE_SECONDS": "1",
    "TASK_DISPATCH_TIMEOUT_SECONDS": "5",
    "Q_POLL_SECONDS": "0.05",
}


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ops", type=int, default=300)
    p.add_argument("--providers", type=int, default=6)
    p.add_argument("--interval", type=float, default=0.5, help="seconds between two requests")
    p.add_argument("--restart-every", type=float, default=10.0)
    # 1 s, not 3: at SIMULATED_SPEED 0.1 a create takes about 3.3 s and a reset 2.3 s, so a 3 s grace
    # lets nearly every running task finish (a 300-op run with 3 s saw no handback at all).
    p.add_argument("--grace", type=float, default=1.0, help="TASK_SHUTDOWN_GRACE_SECONDS of the tiers")
    p.add_argument("--speed", type=float, default=0.1, help="SIMULATED_SPEED")
    p.add_argument("--seed", type=int, default=16)
    p.add_argument("--settle-timeout", type=float, default=600.0, help="wait at most this long for the tasks to end")
    p.add_argument("--database", default="mysql://root@127.0.0.1:3306/cloudhost_bench_soak")
    p.add_argument("--keep", action="store_true", help="keep the run's directory (logs, simulated state)")
    return p.parse_args()


ARGS = parse()
RNG = random.Random(ARGS.seed)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    """A private redis-server on a free port (no persistence), stopped at the end."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
            ],
            stdout=open(workdir / "redis.log", "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        import redis

        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise SystemExit("redis-server did not start (see redis.log)") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Machine:
    """One worker machine: `manage.py run_workers` with its WORKER_NODE."""

    def __init__(self, node: str, workdir: Path):
        self.node = node
        self.var_dir = os.environ["VAR_DIR"]
        self.log_path = workdir / f"tier-{node}.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        status = Path(self.var_dir) / f"workers-{self.node}" / "pool.json"
        status.unlink(missing_ok=True)
        with open(self.log_path, "ab") as out:
            out.write(f"\n===== start {self.starts + 1} at {time.time():.3f}\n".encode())
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "manage.py"), "run_workers", "--no-maintenance"],
                cwd=ROOT,
                env={**os.environ, "WORKER_NODE": self.node, "LOG_LEVEL": "info"},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1

    def wait_ready(self, timeout: float = 90) -> float:
        status = Path(self.var_dir) / f"workers-{self.node}" / "pool.json"
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                if json.loads(status.read_text()).get("clusters"):
                    return time.monotonic() - t0
            except (FileNotFoundError, ValueError):
                pass
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.node} exited with {self.proc.returncode} at start (see {self.log_path})")
            time.sleep(0.1)
        raise SystemExit(f"{self.node} not ready in {timeout} s (see {self.log_path})")

    def pids(self) -> set[int]:
        """Every process of this machine: WORKER_NODE and this run's VAR_DIR in its environment."""
        import psutil

        found = set()
        for proc in psutil.process_iter(["pid", "environ"]):
            try:
                env = proc.info["environ"] or {}
            except (psutil.AccessDenied, psutil.NoSuchProcess):
                continue
            if env.get("WORKER_NODE") == self.node and env.get("VAR_DIR") == self.var_dir:
                found.add(proc.info["pid"])
        found.discard(os.getpid())
        return found

    def _kill_all(self) -> set[int]:
        import psutil

        seen: set[int] = set()
        for _ in range(40):
            pids = self.pids()
            if not pids:
                break
            seen |= pids
            for pid in pids:
                try:
                    psutil.Process(pid).kill()
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.05)
        return seen

    def terminate(self, timeout: float) -> dict:
        """SIGTERM and wait for the drain to end; what does not exit by ``timeout`` is killed."""
        pids = self.pids()
        at = time.time()
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        forced = False
        while self.proc.poll() is None:
            pids |= self.pids()
            if time.monotonic() > deadline:
                forced = True
                os.killpg(self.proc.pid, signal.SIGKILL)
                break
            time.sleep(0.1)
        self.proc.wait()
        leftovers = self.pids()
        pids |= self._kill_all()
        return {
            "node": self.node,
            "signal": "SIGTERM",
            "at": at,
            "dead_at": time.time(),
            "pids": pids,
            "exit": self.proc.returncode,
            "forced": forced,
            "leftovers": len(leftovers),
        }

    def kill(self) -> dict:
        """kill -9 of the whole machine: every process of its tier at once."""
        pids = self.pids()
        at = time.time()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        pids |= self._kill_all()  # clusters run in sessions of their own
        self.proc.wait()
        return {"node": self.node, "signal": "SIGKILL", "at": at, "dead_at": time.time(), "pids": pids}


class Restarter(threading.Thread):
    """Every ``period`` seconds restart one machine: a TERM, b KILL, a KILL, b TERM, ..."""

    PLAN = ((0, "SIGTERM"), (1, "SIGKILL"), (0, "SIGKILL"), (1, "SIGTERM"))

    def __init__(self, machines: list[Machine], period: float, grace: float):
        super().__init__(daemon=True)
        self.machines, self.period, self.grace = machines, period, grace
        self.stopping = threading.Event()
        self.events: list[dict] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            n = 0
            t0 = time.monotonic()
            while not self.stopping.wait(max(0.0, t0 + (n + 1) * self.period - time.monotonic())):
                which, sig = self.PLAN[n % len(self.PLAN)]
                m = self.machines[which]
                ev = m.terminate(self.grace + 60) if sig == "SIGTERM" else m.kill()
                m.start()
                ev["ready_after"] = m.wait_ready()
                ev["stopped_in"] = ev["dead_at"] - ev["at"]
                self.events.append(ev)
                log(
                    f"restart {n + 1}: {m.node} {sig}, down {ev['stopped_in']:.1f} s"
                    f" + ready in {ev['ready_after']:.1f} s"
                )
                n += 1
        except BaseException as exc:  # reported by the main thread
            self.error = exc


# ----------------------------------------------------------------------------- workload
class Workload:
    """Picks each request: the least-requested type that has an idle instance it fits."""

    def __init__(self, providers, users):
        self.providers = providers
        self.users = {u.pk: u for u in users}
        self.requested: Counter = Counter()
        self.refused: Counter = Counter()
        self.task_ids: list[int] = []
        self.types: dict[int, str] = {}

    def candidates(self) -> dict[str, list]:
        from tasks.engine.states import ALLOWED_INSTANCE_STATUS, INSTANCE_GONE
        from tasks.models import Instance, PortMapping

        live = list(
            Instance.objects.exclude(status__in=[*INSTANCE_GONE, "deleted"]).values(
                "pk", "status", "active_task_id", "owner_id"
            )
        )
        idle = [i for i in live if i["active_task_id"] is None]
        out: dict[str, list] = {t: [] for t in TYPES}
        for t in ("start", "stop", "restart", "reset", "reset-password", "create-port", "delete"):
            out[t] = [i for i in idle if i["status"] in ALLOWED_INSTANCE_STATUS[t]]
        ported = set(
            PortMapping.objects.filter(
                status=PortMapping.STATUS_ACTIVE, description="soak", instance_id__in=[i["pk"] for i in idle]
            ).values_list("instance_id", flat=True)
        )
        out["delete-port"] = [
            i for i in idle if i["pk"] in ported and i["status"] in ALLOWED_INSTANCE_STATUS["delete-port"]
        ]
        creating = sum(1 for i in live if i["status"] == "creating")
        # Keep a fleet of 12 to 36 instances: enough idle ones for every type.
        out["create"] = [None] if len(live) < 36 else []
        if len(live) - creating <= 12:
            out["delete"] = []
        return out

    def request_one(self) -> int | None:
        from tasks import services
        from tasks.errors import ServiceError
        from tasks.models import PortMapping

        for _ in range(5):
            cands = self.candidates()
            fit = [t for t in TYPES if cands[t]]
            if not fit:
                return None
            low = min(self.requested[t] for t in fit)
            kind = RNG.choice([t for t in fit if self.requested[t] <= low + 2])
            try:
                if kind == "create":
                    user = RNG.choice(list(self.users.values()))
                    _, task = services.create_instance(
                        user,
                        provider=RNG.choice(self.providers),
                        image="debian/12",
                        instance_type=RNG.choice(["container", "container", "vm"]),
                        cpu=1,
                        memory_mb=512,
                        disk_mb=2048,
                    )
                else:
                    inst = RNG.choice(cands[kind])
                    user = self.users[inst["owner_id"]]
                    if kind == "create-port":
                        task, _ = services.create_port(
                            user, inst["pk"], protocol="tcp", guest_port=RNG.randint(1024, 9000), description="soak"
                        )
                    elif kind == "delete-port":
                        mapping = (
                            PortMapping.objects.filter(
                                instance_id=inst["pk"], status=PortMapping.STATUS_ACTIVE, description="soak"
                            )
                            .order_by("pk")
                            .first()
                        )
                        if mapping is None:
                            continue
                        task = services.delete_port(user, inst["pk"], mapping.pk)
                    else:
                        task = services.request_operation(user, inst["pk"], kind)
            except ServiceError as exc:
                self.refused[f"{kind}: {type(exc).__name__}"] += 1
                continue
            self.requested[kind] += 1
            self.task_ids.append(task.pk)
            self.types[task.pk] = kind
            return task.pk
        return None


# ----------------------------------------------------------------------------- analysis
def ts(dt) -> float:
    return dt.timestamp()


def close_open_calls(calls: list[dict], stops: list[dict], now: float) -> list[dict]:
    """A call with no end: its process died inside it. It ends when its machine was
    found dead (the first stop after the call began whose processes included its pid)."""
    out = []
    for c in calls:
        c = dict(c)
        if c["ended"] is None:
            ends = [s["dead_at"] for s in stops if c["pid"] in s["pids"] and s["dead_at"] >= c["started"]]
            c["ended"] = min(ends) if ends else now
            c["open"] = "killed" if ends else "unknown"
        out.append(c)
    return out


def over_limit(spans: list[tuple[float, float, object]], limit: int) -> list[tuple[float, int, list]]:
    """Episodes where more than ``limit`` spans overlap: (instant, how many, what overlapped)."""
    points = []
    for start, end, what in spans:
        points.append((start, 1, what))
        points.append((end, -1, what))
    points.sort(key=lambda p: (p[0], p[1]))  # an end at the same instant frees first
    running: list = []
    episodes, inside = [], False
    for at, delta, what in points:
        if delta > 0:
            running.append(what)
        else:
            running.remove(what)
        if len(running) > limit and not inside:
            episodes.append((at, len(running), list(running)))
        inside = len(running) > limit
    return episodes


def attempts_from_timeline(task_ids: list[int]) -> list[dict]:
    """Each claim of a task (pending -> running) to the next event that leaves running/cancelling."""
    from tasks.models import TaskEvent

    rows = (
        TaskEvent.objects.filter(task_id__in=task_ids, kind="transition")
        .order_by("task_id", "at", "id")
        .values("task_id", "from_status", "to_status", "actor", "reason", "at")
    )
    attempts, current = [], {}
    for ev in rows:
        tid = ev["task_id"]
        if ev["to_status"] == "running" and ev["from_status"] == "pending":
            pid = ev["actor"].rsplit(":", 1)[-1]
            current[tid] = {
                "task": tid,
                "start": ts(ev["at"]),
                "worker": ev["actor"],
                "pid": int(pid) if pid.isdigit() else None,
                "end": None,
                "why": "",
            }
            attempts.append(current[tid])
        elif ev["from_status"] in ("running", "cancelling") and ev["to_status"] != "cancelling" and tid in current:
            ended = current.pop(tid)
            ended["end"], ended["why"] = ts(ev["at"]), ev["reason"]
    now = time.time()
    for a in attempts:
        if a["end"] is None:
            a["end"] = now
    return attempts


def timeline(task_id: int) -> list[str]:
    from tasks.models import TaskEvent

    lines = []
    for ev in TaskEvent.objects.filter(task_id=task_id).order_by("at", "id"):
        what = f"{ev.from_status or '-'} -> {ev.to_status}" if ev.kind == "transition" else f"[{ev.kind}]"
        extra = " ".join(x for x in (ev.reason and f"reason={ev.reason}", ev.message and repr(ev.message[:160])) if x)
        lines.append(f"      {ev.at:%H:%M:%S.%f}"[:-3] + f" {what} by {ev.actor} {extra}".rstrip())
    return lines


def analyse(workload: Workload, providers, stops: list[dict], t_first: float) -> dict:
    from django.conf import settings

    from providers.simulated import SimulatedStore
    from tasks import accounting
    from tasks.engine.states import INSTANCE_GONE
    from tasks.models import Instance, PortMapping, Task, TaskEvent

    ids = workload.task_ids
    tasks = {t.pk: t for t in Task.objects.filter(pk__in=ids).select_related("instance")}
    res: dict = {"tasks": len(tasks)}
    res["status"] = Counter(f"{t.status}{'/' + t.error_code if t.error_code else ''}" for t in tasks.values())
    res["by_type"] = Counter(t.task_type for t in tasks.values())
    res["not_completed"] = sorted(pk for pk, t in tasks.items() if t.status != "completed")
    res["failed"] = sum(1 for t in tasks.values() if t.status in ("failed", "timeout"))
    res["worker_lost"] = sum(1 for t in tasks.values() if t.error_code == "worker_lost")
    res["multi_attempt"] = sorted(pk for pk, t in tasks.items() if t.attempt_count > 1)
    resumed = list(
        TaskEvent.objects.filter(task_id__in=ids, reason__startswith="resumed:").values_list("task_id", "reason")
    )
    res["resumptions"] = Counter(reason for _, reason in resumed)
    res["resumed_types"] = {
        reason: Counter(workload.types.get(tid, "?") for tid, r in resumed if r == reason)
        for reason in res["resumptions"]
    }
    waits = sorted(
        (ts(t.started_at) - ts(t.created_at)) for t in tasks.values() if t.started_at and t.attempt_count == 1
    )
    res["wait"] = (pct(waits, 0.5), pct(waits, 0.95), waits[-1]) if waits else (0, 0, 0)
    last_end = max((ts(t.completed_at) for t in tasks.values() if t.completed_at), default=time.time())
    res["wall"] = last_end - t_first

    # The execution record of every simulated host: limits and overlaps on one guest.
    now = time.time()
    guest_of = {}
    for inst in Instance.objects.filter(provider__in=providers):
        guest_of[(inst.provider_id, inst.guest_name)] = inst
    attempts = attempts_from_timeline(ids)
    by_instance: dict[int, list[int]] = defaultdict(list)
    for t in tasks.values():
        by_instance[t.instance_id].append(t.pk)
    res["limit_record"], res["limit_timeline"], res["twice"], res["open_calls"] = [], [], [], Counter()
    res["orphans"], res["mismatch"], res["calls"], res["redone"] = [], [], 0, []
    res["gaps"] = {"handback": [], "lost": []}
    for prov in providers:
        store = SimulatedStore.for_provider(prov.pk, prov.connection)
        calls = close_open_calls(store.calls(), stops, now)
        res["calls"] += len(calls)
        for c in calls:
            if "open" in c:
                res["open_calls"][c["open"]] += 1
        limit = prov.concurrency_limit
        spans = [(c["started"], c["ended"], c["id"]) for c in calls]
        by_id = {c["id"]: c for c in calls}
        for at, n, what in over_limit(spans, limit):
            res["limit_record"].append((prov.name, limit, at, n, [by_id[i] for i in what]))
        # The timeline's view: claims to releases, what admission counted.
        prov_attempts = [a for a in attempts if tasks[a["task"]].provider_id == prov.pk]
        for at, n, what in over_limit([(a["start"], a["end"], i) for i, a in enumerate(prov_attempts)], limit):
            res["limit_timeline"].append((prov.name, limit, at, n, [prov_attempts[i] for i in what]))
        # Two calls on one guest at once.
        per_guest = defaultdict(list)
        for c in calls:
            per_guest[c["guest"]].append(c)
        for guest, cs in per_guest.items():
            for at, _n, what in over_limit([(c["started"], c["ended"], c["id"]) for c in cs], 1):
                inst = guest_of.get((prov.pk, guest))
                res["twice"].append(
                    (
                        prov.name,
                        guest,
                        inst.pk if inst else None,
                        at,
                        [by_id[i] for i in what],
                        by_instance.get(inst.pk, []) if inst else [],
                    )
                )
        # Each resumption in the record: the last call of the attempt that stopped (handed back,
        # or cut by a kill: closed at the kill) against the first call of the next attempt.
        for t in tasks.values():
            if t.provider_id != prov.pk or t.attempt_count < 2:
                continue
            mine = sorted((a for a in attempts if a["task"] == t.pk), key=lambda a: a["start"])
            guest_calls = [c for c in calls if c["guest"] == t.instance.guest_name]
            for before, after in zip(mine, mine[1:], strict=False):
                old = [c for c in guest_calls if c["pid"] == before["pid"] and before["start"] - 0.5 <= c["started"]]
                new = [c for c in guest_calls if c["pid"] == after["pid"] and after["start"] - 0.5 <= c["started"]]
                if old and new:
                    why = "handback" if before["why"] == "resumed:handback" else "lost"
                    res["gaps"][why].append(min(c["started"] for c in new) - max(c["ended"] for c in old))
        # Resumed tasks: provider steps a later attempt applied again (not a target: the
        # operations' convergence, issue 16's other half), and creates whose undo removed the guest.
        execs = store.executions()
        for t in tasks.values():
            if t.provider_id != prov.pk or t.attempt_count < 2 or not t.completed_at:
                continue
            lo, hi = ts(t.created_at) - 0.5, ts(t.completed_at) + 0.5
            mine = [e for e in execs if e["guest"] == t.instance.guest_name and lo <= e["at"] <= hi]
            applied_by: dict[str, set[int]] = defaultdict(set)
            for e in mine:
                # Port calls are per mapping (the record does not say which): a later attempt
                # mapping another port, or one an undo removed, is no repetition.
                if e["applied"] and e["op"] not in ("add_port", "remove_port"):
                    applied_by[e["op"]].add(e["pid"])
            again = sorted(op for op, pids in applied_by.items() if len(pids) > 1)
            undone = t.task_type == "create" and any(e["op"] == "delete" and e["applied"] for e in mine)
            if again or undone:
                why = ", ".join(r.removeprefix("resumed:") for tid, r in resumed if tid == t.pk)
                res["redone"].append((t.pk, f"{t.task_type} ({why})", again, undone))
        # Orphans: guests and instances that do not match.
        guests = {g["name"]: g for g in store.guests()}
        live = {
            i.guest_name: i
            for i in Instance.objects.filter(provider=prov).exclude(status__in=[*INSTANCE_GONE, "deleted"])
        }
        for name, g in guests.items():
            if name not in live:
                inst = guest_of.get((prov.pk, name))
                res["orphans"].append(
                    (
                        prov.name,
                        f"guest {name} ({g['status']}) with no live instance"
                        + (f" (instance {inst.pk} is {inst.status})" if inst else " (no instance at all)"),
                        by_instance.get(inst.pk, []) if inst else [],
                    )
                )
        for name, inst in live.items():
            if name not in guests:
                res["orphans"].append(
                    (prov.name, f"instance {inst.pk} ({inst.status}) has no guest {name}", by_instance.get(inst.pk, []))
                )
            else:
                g = guests[name]
                want = {"running": "running", "stopped": "stopped"}.get(g["status"], g["status"])
                if inst.status != want:
                    res["mismatch"].append(
                        (
                            prov.name,
                            f"instance {inst.pk} is {inst.status}, its guest {want}",
                            by_instance.get(inst.pk, []),
                        )
                    )
                host_ports = {(p["protocol"], p["host_start"]) for p in store.ports(name)}
                db_ports = {
                    (proto, start)
                    for protocol, start in PortMapping.objects.filter(
                        instance=inst, status=PortMapping.STATUS_ACTIVE
                    ).values_list("protocol", "host_port_start")
                    for proto in (("tcp", "udp") if protocol == "both" else (protocol,))
                }
                if host_ports != db_ports:
                    res["mismatch"].append(
                        (
                            prov.name,
                            f"instance {inst.pk}: active mappings {sorted(db_ports)} but host ports {sorted(host_ports)}",
                            by_instance.get(inst.pk, []),
                        )
                    )
    res["accounting"] = [str(d) for d in accounting.find_differences()]
    res["max_attempts"] = settings.TASK_MAX_ATTEMPTS
    return res


def report(res: dict, workload: Workload, stops: list[dict], tasks_by_pk) -> None:
    print(
        f"\nsoak: {res['tasks']} operations over {ARGS.providers} simulated providers (limits 1-2), 2 worker machines"
        f" on MariaDB + Redis, SIMULATED_SPEED {ARGS.speed:g}, a restart every {ARGS.restart_every:g} s"
        f" (grace {ARGS.grace:g} s)"
    )
    kinds = Counter(e["signal"] for e in stops)
    drains = ", ".join(f"{e['stopped_in']:.1f}" for e in stops if e["signal"] == "SIGTERM")
    print(
        f"restarts: {len(stops)} ({kinds['SIGTERM']} SIGTERM, {kinds['SIGKILL']} kill -9); SIGTERM drains took {drains} s"
    )
    forced = [e for e in stops if e.get("forced") or e.get("leftovers")]
    if forced:
        print(f"  drains that needed a kill: {len(forced)}")
    print(f"requested by type: {dict(sorted(res['by_type'].items()))}")
    if workload.refused:
        print(f"requests refused (and re-picked): {dict(workload.refused)}")
    print(f"tasks by final status: {dict(sorted(res['status'].items()))}")
    print(f"tasks with attempts > 1: {len(res['multi_attempt'])}")
    print(f"resumptions: {dict(res['resumptions'])}")
    for reason, types in res["resumed_types"].items():
        print(f"  {reason} by type: {dict(sorted(types.items()))}")
    print(
        f"execution record: {res['calls']} provider calls; {sum(res['open_calls'].values())} never ended"
        f" (their process was killed: {res['open_calls'].get('killed', 0)}, unknown: {res['open_calls'].get('unknown', 0)})"
    )
    print(f"limit violations (execution record): {len(res['limit_record'])}")
    print(f"limit violations (task timelines, claim to release): {len(res['limit_timeline'])}")
    print(f"run twice at once (overlapping calls on one guest): {len(res['twice'])}")
    for why, gaps in res["gaps"].items():
        if gaps:
            print(
                f"  {why}: {len(gaps)} resumptions with calls on both sides; the next attempt's first call began"
                f" {min(gaps):.2f} s (least) / {pct(gaps, 0.5):.2f} s (median) after the stopped attempt's last call"
                " ended (or its process was killed)"
            )
    resumed = len(res["multi_attempt"])
    undone = [r for r in res["redone"] if r[3]]
    print(
        f"resumed tasks whose later attempt applied a provider step again: {len(res['redone'])} of {resumed}"
        f" (steps: {dict(Counter(op for r in res['redone'] for op in r[2]))};"
        f" creates whose undo removed the guest before the resumption: {len(undone)})"
    )
    print(f"orphan guests / instances without a guest: {len(res['orphans'])}")
    print(f"instances whose status or ports differ from their guest: {len(res['mismatch'])}")
    print(f"accounting drift (check_accounting findings): {len(res['accounting'])}")
    print("created -> running (tasks run once): p50 {:.2f} s, p95 {:.2f} s, max {:.2f} s".format(*res["wait"]))
    print(f"wall time (first request to last task finished): {res['wall']:.1f} s")

    shown: set[int] = set()

    def show(tid: int) -> None:
        if tid in shown:
            return
        shown.add(tid)
        t = tasks_by_pk.get(tid)
        if t is None:
            return
        print(
            f"    task {t.pk} {t.task_type} instance {t.instance_id} provider {t.provider_id}: {t.status}"
            f" {t.error_code} attempts {t.attempt_count} {t.error_message[:300]!r}"
        )
        for line in timeline(t.pk):
            print(line)

    if res["not_completed"]:
        print("\ntasks that did not complete:")
        for tid in res["not_completed"]:
            show(tid)
    for title, rows in (
        ("limit violations (execution record)", res["limit_record"]),
        ("limit violations (task timelines)", res["limit_timeline"]),
    ):
        if rows:
            print(f"\n{title}:")
            for name, limit, at, n, what in rows[:20]:
                print(f"  {name} (limit {limit}) at {at:.3f}: {n} at once")
                for w in what:
                    print(f"    {w}")
    if res["twice"]:
        print("\nrun twice at once:")
        for name, guest, inst, at, calls, tids in res["twice"][:20]:
            print(f"  {name} guest {guest} (instance {inst}) at {at:.3f}:")
            for c in calls:
                print(f"    {c}")
            for tid in tids:
                show(tid)
    for title, rows in (("orphans", res["orphans"]), ("instances that differ from their guest", res["mismatch"])):
        if rows:
            print(f"\n{title}:")
            for name, text, tids in rows:
                print(f"  {name}: {text}")
                for tid in tids[-2:]:
                    show(tid)
    if res["redone"]:
        print("\nresumed tasks that redid work (task, type (resumptions): steps applied again by a later attempt):")
        for tid, kind, again, undone in res["redone"]:
            print(f"  task {tid} {kind}: {', '.join(again) or '-'}{'; the undo deleted the guest' if undone else ''}")
    if res["accounting"]:
        print("\naccounting differences:")
        for line in res["accounting"]:
            print(f"  {line}")

    checks = [
        ("0 failed, timeout or worker_lost tasks", res["failed"] == 0),
        ("every task completed", not res["not_completed"]),
        ("0 limit violations (execution record)", not res["limit_record"]),
        ("0 limit violations (task timelines)", not res["limit_timeline"]),
        ("0 run twice at once", not res["twice"]),
        ("0 orphan guests", not res["orphans"]),
        ("0 accounting drift", not res["accounting"]),
        (
            "restarts hit running tasks (handbacks and lost leases both seen)",
            bool(res["resumptions"].get("resumed:handback")) and bool(res["resumptions"].get("resumed:worker_lost")),
        ),
    ]
    print("\ntargets:")
    for label, ok in checks:
        print(f"  {'met   ' if ok else 'MISSED'} {label}")


# ----------------------------------------------------------------------------- main
def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    redis_server = Redis(workdir)
    os.environ.update(FAST)
    os.environ["TASK_SHUTDOWN_GRACE_SECONDS"] = f"{ARGS.grace:g}"
    machines: list[Machine] = []
    restarter = None
    try:
        setup_django(
            ARGS.database,
            "redis",
            REDIS_URL=redis_server.url,
            VAR_DIR=str(workdir / "var"),
            SIMULATED_SPEED=f"{ARGS.speed:g}",
            TASK_EXTRA_OPERATIONS="",  # the real operations (bench.common's default swaps restart for a no-op)
            TASK_RETRY_BASE_SECONDS="0.5",
            LOG_LEVEL="warning",
            **FAST,
        )
        from django.contrib.auth import get_user_model

        from tasks import resources
        from tasks.engine.states import FINAL
        from tasks.models import Provider, Task, UserQuota

        reset_data(wait_purge=False)
        providers = [
            Provider.objects.create(
                name=f"soak-{i}", allow_concurrent_tasks=(i % 2 == 1), max_concurrent_tasks=1 + i % 2
            )
            for i in range(ARGS.providers)
        ]
        users = [get_user_model().objects.get_or_create(username=f"soak-{i}")[0] for i in range(3)]
        for u in users:
            resources.ensure_quota(u)
        UserQuota.objects.filter(user__in=users).update(
            max_instances=1000, max_cpu=10_000, max_memory_mb=10**8, max_disk_mb=10**9, max_ports=10_000
        )
        machines = [Machine("machine-a", workdir), Machine("machine-b", workdir)]
        for m in machines:
            m.start()
        for m in machines:
            log(f"{m.node} ready in {m.wait_ready():.1f} s")

        workload = Workload(providers, users)
        restarter = Restarter(machines, ARGS.restart_every, ARGS.grace)
        t_first = time.time()
        restarter.start()
        t0 = time.monotonic()
        for i in range(ARGS.ops):
            time.sleep(max(0.0, t0 + i * ARGS.interval - time.monotonic()))
            while workload.request_one() is None:
                time.sleep(0.2)  # nothing idle fits: wait for a task to end
            if (i + 1) % 50 == 0:
                log(f"{i + 1} requested; {dict(workload.requested)}")
            if restarter.error:
                raise restarter.error
        log("all requested; waiting for the tasks to end (restarts go on meanwhile)")
        deadline = time.monotonic() + ARGS.settle_timeout
        while Task.objects.filter(pk__in=workload.task_ids).exclude(status__in=FINAL).exists() or (
            Task.objects.filter(pk__in=workload.task_ids, held_until__isnull=False).exclude(status__in=FINAL).exists()
        ):
            if time.monotonic() > deadline:
                log("settle timeout: some tasks never ended")
                break
            if restarter.error:
                raise restarter.error
            time.sleep(0.5)
        log("tasks ended; stopping the restarts and the machines")
        restarter.stopping.set()
        restarter.join()
        stops = list(restarter.events)
        final_stops = [m.terminate(ARGS.grace + 60) for m in machines if m.proc and m.proc.poll() is None]
        tasks_by_pk = {t.pk: t for t in Task.objects.filter(pk__in=workload.task_ids)}
        res = analyse(workload, providers, stops + final_stops, t_first)
        report(res, workload, stops, tasks_by_pk)
        print(f"\nlogs: {workdir} (tier-machine-a.log, tier-machine-b.log)")
    finally:
        if restarter is not None:
            restarter.stopping.set()
            restarter.join(timeout=120)
        for m in machines:
            if m.proc and m.proc.poll() is None:
                m.kill()
            m._kill_all()
        redis_server.stop()
        if not ARGS.keep:
            # Keep the logs, drop the simulated hosts' state.
            shutil.rmtree(workdir / "var", ignore_errors=True)


if __name__ == "__main__":
    main()
