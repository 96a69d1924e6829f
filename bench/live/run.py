"""Live updates and webhooks benchmark (issue 19).

    .venv/bin/python bench/live/run.py [--database URL] [--part streams|webhooks|all]
                                       [--broker orm|redis|both] [--streams 500] [--time-scale 0.01]

streams: the web tier as deployed (gunicorn + uvicorn workers, config.asgi) on
this machine; the API list p95 with no stream open, then with N streams open
(N users, one each) while tasks change; every change is timed from its commit
(this process runs the transitions, as a worker would) to its arrival on the
owner's stream. Targets: list p95 at most 1.2x the figure with none open;
arrival p95 at most 1 s (ORM broker: the shared TaskEvent poll) and 200 ms
(Redis: pub/sub). With --broker redis a private redis-server is started.

webhooks: 1,000 tasks (started + completed: 2,000 events) for 50 users with
webhooks; the receiver is down (connection refused) for "10 minutes" and then
answers. Time is compressed by --time-scale (default 0.1): the outage lasts
600 x scale seconds (longer if the 1,000 tasks take longer to run: it ends only
after the last one) and the deliverer runs with WEBHOOK_BACKOFF_SCALE=scale
(its waits of 10 s ... 1 h shrink alike). Target: every event arrives at least once (signature checked);
printed: how many arrived more than once.

The deliverer is `manage.py deliver_webhooks` (the loop the worker tier runs).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.common import ensure_database, pct  # noqa: E402

DEFAULT_DB = "mysql://root@127.0.0.1:3306/cloudhost_i19"
PASSWORD_HASH = "md5$bench$6e04e9e6b8d4d0d8e1a1a0a3d7d9b4c1"
SECRET = "bench-webhook-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(database: str, broker: str, redis_url: str) -> None:
    os.environ.update(
        {
            "DATABASE_URL": database,
            "Q_BROKER": broker,
            "REDIS_URL": redis_url,
            "LOG_LEVEL": "warning",
            "DJANGO_SETTINGS_MODULE": "config.settings",
            "LIVE_CHANNEL": f"bench-live-{os.getpid()}",
        }
    )
    ensure_database(database)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def wipe() -> None:
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token

    from bench.common import reset_data
    from tasks.models import Webhook, WebhookCursor, WebhookDelivery

    WebhookDelivery.objects.all().delete()
    Webhook.objects.all().delete()
    WebhookCursor.objects.all().delete()
    reset_data(wait_purge=False)  # the rows deleted here are few
    Token.objects.all().delete()
    get_user_model().objects.filter(username__startswith="bench-").delete()


def seed(users: int, history_per_user: int = 10):
    """users with a token and a running instance each, on one provider of high limit, and some history."""
    from django.contrib.auth import get_user_model
    from django.utils import timezone
    from rest_framework.authtoken.models import Token

    from tasks.engine.states import InstanceStatus
    from tasks.models import Instance, Provider, Task

    User = get_user_model()
    User.objects.bulk_create([User(username=f"bench-{i}", password=PASSWORD_HASH) for i in range(users)])
    people = list(User.objects.filter(username__startswith="bench-").order_by("id"))
    Token.objects.bulk_create(
        [Token(user=u, key=hashlib.sha1(f"{u.pk}-{time.time()}".encode()).hexdigest()) for u in people]
    )
    provider = Provider.objects.create(
        name="bench-live", provider_type="simulated", allow_concurrent_tasks=True, max_concurrent_tasks=256
    )
    Instance.objects.bulk_create(
        [
            Instance(
                owner=u,
                provider=provider,
                name=f"vm-{u.pk}",
                live_name=f"vm-{u.pk}",
                image="debian/12",
                status=InstanceStatus.RUNNING,
            )
            for u in people
        ]
    )
    instances = {i.owner_id: i for i in Instance.objects.filter(provider=provider)}
    now = timezone.now()
    Task.objects.bulk_create(
        [
            Task(
                task_type="restart",
                status="completed",
                owner=u,
                initiator=u,
                provider=provider,
                instance=instances[u.pk],
                created_at=now,
                started_at=now,
                completed_at=now,
                progress=100,
            )
            for u in people
            for _ in range(history_per_user)
        ],
        batch_size=2000,
    )
    tokens = dict(Token.objects.values_list("user_id", "key"))
    return people, tokens, instances


def run_task(user, instance, marks: dict | None = None, gap: float = 0.0):
    """One restart through the real transitions (as the worker makes them); commit times in marks."""
    from tasks import services
    from tasks.engine import dispatch, transitions

    task = services.request_operation(user, instance.pk, "restart")
    dispatch.admit(task.provider_id)
    task.refresh_from_db()
    assert transitions.claim(task.pk, token=task.lease_token, worker="bench:1")
    if marks is not None:
        marks[(task.pk, "running")] = time.monotonic()
    if gap:
        time.sleep(gap)
    assert transitions.finish(task.pk, "completed", token=task.lease_token, actor="worker:bench:1")
    if marks is not None:
        marks[(task.pk, "completed")] = time.monotonic()
    return task


# --- part 1: streams ---------------------------------------------------------------------------


def start_web(port: int, workers: int) -> subprocess.Popen:
    log = open(Path(tempfile.gettempdir()) / "bench-live-web.log", "ab")
    proc = subprocess.Popen(
        [
            str(ROOT / ".venv/bin/gunicorn"),
            "config.asgi:application",
            "-k",
            "uvicorn_worker.UvicornWorker",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            str(workers),
            "--graceful-timeout",
            "2",
        ],
        cwd=ROOT,
        env=os.environ.copy(),
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            time.sleep(0.2)
    raise SystemExit("web server did not start")


def stop_proc(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def list_p95(port: int, tokens: list[str], requests_n: int = 300, threads: int = 4) -> float:
    import requests

    times: list[float] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        session = requests.Session()
        for _ in range(n):
            token = random.choice(tokens)
            started = time.monotonic()
            response = session.get(
                f"http://127.0.0.1:{port}/api/v1/tasks/?page_size=20", headers={"Authorization": f"Token {token}"}
            )
            elapsed = time.monotonic() - started
            assert response.status_code == 200, response.text[:200]
            with lock:
                times.append(elapsed)

    pool = [threading.Thread(target=worker, args=(requests_n // threads,)) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return pct(times, 0.95)


class Streams:
    """N SSE connections on one asyncio loop in a process of their own (no GIL shared with the
    load generator); records when each (task, status) first arrives, in CLOCK_MONOTONIC, which
    every process of the machine shares."""

    def __init__(self, port: int, tokens: list[str]):
        import multiprocessing

        # spawn, not fork: a forked child holds copies of this process's database sockets,
        # and a MySQLdb object it finalizes (a dead thread's, whose descriptor number a live
        # connection here now reuses) would close the server session under a load thread
        # (the Redis run lost its load generators to "Lost connection" that way).
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_stream_client, args=(port, tokens, child), daemon=True)
        self.proc.start()
        self.connected = self.conn.recv()  # once every stream answered (or 60 s)
        self.arrivals: dict[tuple[int, str], float] = {}

    def close(self) -> None:
        self.conn.send("stop")
        self.arrivals = self.conn.recv()
        self.proc.join(30)


def _stream_client(port: int, tokens: list[str], conn) -> None:
    arrivals: dict[tuple[int, str], float] = {}
    connected = 0

    async def one(token: str) -> None:
        nonlocal connected
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"GET /api/v1/tasks/stream/ HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Token {token}\r\n"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
        await writer.drain()
        status = await reader.readline()
        assert b" 200 " in status, status
        connected += 1
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                if line.startswith(b"data: "):
                    now = time.monotonic()
                    data = json.loads(line[6:])
                    arrivals.setdefault((data["id"], data["status"]), now)
        finally:
            writer.close()

    async def main() -> None:
        tasks = []
        for token in tokens:
            tasks.append(asyncio.ensure_future(one(token)))
            await asyncio.sleep(0.002)
        deadline = time.monotonic() + 60
        while connected < len(tokens) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        conn.send(connected)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, conn.recv)  # "stop"
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        conn.send(arrivals)

    asyncio.run(main())


def part_streams(broker: str, n_streams: int, web_workers: int, seconds: float) -> dict:
    """The list p95 is measured twice under the same task load (4 threads running tasks as
    workers would): with no stream open, then with n_streams open; so the ratio is the cost
    of the open streams alone."""
    from django.db import connection

    from tasks.models import Instance

    wipe()
    people, tokens, instances = seed(n_streams)
    port = free_port()
    web = start_web(port, web_workers)
    marks: dict[tuple[int, str], float] = {}
    recording = threading.Event()
    stop = threading.Event()

    def generate(chunk):
        while not stop.is_set():
            user = random.choice(chunk)
            mine: dict = {}
            run_task(user, Instance.objects.get(pk=instances[user.pk].pk), mine, gap=0.4)
            if recording.is_set():
                marks.update(mine)
            time.sleep(random.uniform(0.05, 0.2))
        connection.close()

    gens = [threading.Thread(target=generate, args=(people[i::4],)) for i in range(4)]
    try:
        token_list = [tokens[u.pk] for u in people]
        list_p95(port, token_list, 60)  # warm-up
        idle_base = list_p95(port, token_list)
        for g in gens:
            g.start()
        base = list_p95(port, token_list)
        streams = Streams(port, token_list)
        print(f"  {streams.connected} streams open ({web_workers} web processes)")
        time.sleep(1.0)
        recording.set()
        started = time.monotonic()
        loaded = list_p95(port, token_list)
        time.sleep(max(0.0, seconds - (time.monotonic() - started)))
        recording.clear()
        stop.set()
        for g in gens:
            g.join()
        time.sleep(2.0)
        idle_open = list_p95(port, token_list)
        streams.close()
    finally:
        stop.set()
        stop_proc(web)
    latencies = []
    missed = 0
    later = {"running": ("running", "completed"), "completed": ("completed",)}
    for (task_id, status), committed in marks.items():
        # The change, or a newer state of the same task (a feed tick may carry both at once).
        seen = [streams.arrivals[(task_id, s)] for s in later[status] if (task_id, s) in streams.arrivals]
        if not seen:
            missed += 1
        else:
            latencies.append(max(0.0, min(seen) - committed))
    p50 = pct(latencies, 0.5) if latencies else float("inf")
    latencies += [float("inf")] * missed  # strict: a change that never arrived counts as arriving never
    return {
        "broker": broker,
        "streams": streams.connected,
        "list_p95_idle_none": idle_base,
        "list_p95_idle_open": idle_open,
        "list_p95_none": base,
        "list_p95_open": loaded,
        "events": len(marks),
        "missed": missed,
        "arrival_p50": p50,
        "arrival_p95": pct(latencies, 0.95) if latencies else float("inf"),
    }


# --- part 2: webhooks ---------------------------------------------------------------------------


class Receiver:
    def __init__(self, port: int):
        self.port = port
        self.counts: dict[tuple[int, str], int] = defaultdict(int)
        self.bad_signatures = 0
        self.lock = threading.Lock()
        self.server = None

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
                data = json.loads(body)
                with receiver.lock:
                    if self.headers.get("X-Webhook-Signature") != expected:
                        receiver.bad_signatures += 1
                    receiver.counts[(data["task"]["id"], data["event"])] += 1
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def part_webhooks(n_tasks: int, scale: float) -> dict:
    from django.db import connection

    from tasks.models import Instance, Webhook

    wipe()
    people, _tokens, instances = seed(50, history_per_user=0)
    port = free_port()
    receiver = Receiver(port)  # down: nothing listens on the port yet
    for user in people:
        hook = Webhook(owner=user, url=f"http://127.0.0.1:{port}/hook", events=["task.started", "task.completed"])
        hook.secret = SECRET
        hook.save()
    env = {
        **os.environ,
        "WEBHOOK_BACKOFF_SCALE": str(scale),
        "WEBHOOK_ALLOW_PRIVATE_TARGETS": "true",
        "WEBHOOK_POLL_SECONDS": "0.2",
    }
    log = open(Path(tempfile.gettempdir()) / "bench-live-webhooks.log", "ab")
    deliverer = subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), "deliver_webhooks"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    outage = 600 * scale
    started = time.monotonic()
    try:
        # 1,000 tasks while the receiver is down, spread over the outage.
        per_user = n_tasks // len(people)
        expected = set()

        def produce(chunk):
            for _ in range(per_user):
                for user in chunk:
                    task = run_task(user, Instance.objects.get(pk=instances[user.pk].pk))
                    expected.update({(task.pk, "task.started"), (task.pk, "task.completed")})
                    time.sleep(outage / (per_user * len(chunk)) * 0.8)
            connection.close()

        gens = [threading.Thread(target=produce, args=(people[i::5],)) for i in range(5)]
        for g in gens:
            g.start()
        for g in gens:
            g.join()
        produced = time.monotonic() - started
        time.sleep(max(0.0, outage - (time.monotonic() - started)))
        outage = time.monotonic() - started  # at least 600 x scale, and until every task ran
        receiver.start()
        back = time.monotonic()
        deadline = back + 3600 * scale + 120
        while time.monotonic() < deadline:
            with receiver.lock:
                if expected <= set(receiver.counts):
                    break
            time.sleep(0.5)
        all_in = time.monotonic() - back
        time.sleep(2.0)  # late duplicates, if any
    finally:
        stop_proc(deliverer)
        receiver.stop()
    with receiver.lock:
        got = set(receiver.counts)
        twice = sum(1 for k in expected if receiver.counts.get(k, 0) > 1)
    return {
        "tasks": n_tasks,
        "events": len(expected),
        "received": len(expected & got),
        "missing": len(expected - got),
        "twice": twice,
        "bad_signatures": receiver.bad_signatures,
        "outage_seconds": outage,
        "produced_in": produced,
        "all_in_after_back": all_in,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_DB))
    parser.add_argument("--part", choices=("streams", "webhooks", "all"), default="all")
    parser.add_argument("--broker", choices=("orm", "redis", "both"), default="both")
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--web-workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=30.0, help="how long tasks change while streams are open")
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--time-scale", type=float, default=0.1)
    args = parser.parse_args()

    redis_proc = None
    brokers = ["orm", "redis"] if args.broker == "both" else [args.broker]
    redis_url = "redis://127.0.0.1:6379/4"
    if "redis" in brokers and args.part != "webhooks":
        from tests.scaleout.faults import PrivateRedis

        redis_proc = PrivateRedis(Path(tempfile.mkdtemp())).start()
        redis_url = redis_proc.url
    setup(args.database, "orm", redis_url)
    print(f"database {args.database.split('@')[-1]}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    verdicts = []
    try:
        if args.part in ("streams", "all"):
            from django.conf import settings

            for broker in brokers:
                # The web processes read Q_BROKER from their environment; this process publishes.
                os.environ["Q_BROKER"] = broker
                settings.Q_BROKER = broker
                print(f"streams, {broker} broker:")
                r = part_streams(broker, args.streams, args.web_workers, args.seconds)
                ratio = r["list_p95_open"] / r["list_p95_none"]
                target = 1.0 if broker == "orm" else 0.2
                print(
                    f"  API list p95 while tasks change: {r['list_p95_none'] * 1000:.1f} ms with none open, "
                    f"{r['list_p95_open'] * 1000:.1f} ms with {r['streams']} open ({ratio:.2f}x)"
                )
                print(
                    f"  API list p95 with no task changing: {r['list_p95_idle_none'] * 1000:.1f} ms with none open, "
                    f"{r['list_p95_idle_open'] * 1000:.1f} ms with {r['streams']} open"
                )
                print(
                    f"  {r['events']} changes, {r['missed']} never arrived; arrival p50 {r['arrival_p50'] * 1000:.0f} ms,"
                    f" p95 {r['arrival_p95'] * 1000:.0f} ms"
                )
                verdicts.append((f"{broker}: list p95 with {args.streams} streams <= 1.2x", ratio <= 1.2))
                verdicts.append((f"{broker}: arrival p95 <= {target * 1000:.0f} ms", r["arrival_p95"] <= target))
            os.environ["Q_BROKER"] = "orm"
            settings.Q_BROKER = "orm"
        if args.part in ("webhooks", "all"):
            print(
                f"webhooks: receiver down for 10 min compressed to {600 * args.time_scale:.0f} s "
                f"(WEBHOOK_BACKOFF_SCALE={args.time_scale}):"
            )
            r = part_webhooks(args.tasks, args.time_scale)
            print(
                f"  {r['tasks']} tasks, {r['events']} events; received {r['received']}, missing {r['missing']}, "
                f"arrived twice {r['twice']}, bad signatures {r['bad_signatures']}"
            )
            print(
                f"  receiver down {r['outage_seconds']:.0f} s (= {r['outage_seconds'] / args.time_scale / 60:.0f} min "
                f"uncompressed); tasks produced in {r['produced_in']:.1f} s; all in {r['all_in_after_back']:.1f} s after the receiver "
                f"returned (= {r['all_in_after_back'] / args.time_scale / 60:.1f} min uncompressed)"
            )
            verdicts.append(("webhooks: every event at least once", r["missing"] == 0 and r["bad_signatures"] == 0))
    finally:
        if redis_proc is not None:
            redis_proc.stop()
    for name, ok in verdicts:
        print(f"{'met' if ok else 'MISSED'}: {name}")


if __name__ == "__main__":
    main()
