"""Login flood: the API's list latency while wrong passwords pour in (issue 18, item 3).

Starts gunicorn as run.sh does (2 workers x 4 threads, SQLite in a temporary
VAR_DIR, Django's default PBKDF2 hasher), then times an authenticated
``GET /api/v1/tasks/`` (p50/p95):

1. alone (baseline);
2. while ``--threads`` threads (40, as in the issue) send ``--rate`` wrong
   passwords per second in all (20, five times the issue's 4/s; open loop) to
   ``POST /api/v1/auth/token/`` with the throttle on (the default);
3. the same flood with the throttle off (LOGIN_THROTTLE_ATTEMPTS raised out of
   reach), for comparison: every attempt computes a hash.

    .venv/bin/python bench/login_flood/run.py [--seconds 15] [--threads 40] [--rate 20]

A closed-loop flood (every thread sending again the moment it is answered) measures
how many cheap requests the server answers per second, not the throttle: it slows
any endpoint, 429s included, and belongs to a rate limit in the proxy in front.

Target: with the throttle on, the list p50 during the flood stays within 2x the
baseline p50 + 20 ms (the margin absorbs a shared machine's noise).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = str(ROOT / ".venv" / "bin" / "python")
GUNICORN = str(ROOT / ".venv" / "bin" / "gunicorn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, *, method: str = "GET", body: dict | None = None, token: str | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Token {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Server:
    def __init__(self, var_dir: str, env_extra: dict[str, str]):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "VAR_DIR": var_dir, "LOG_LEVEL": "error", **env_extra}
        self.env.pop("DATABASE_URL", None)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [GUNICORN, "config.wsgi:application", "--bind", f"127.0.0.1:{self.port}", "--workers", "2"]
            + ["--threads", "4", "--graceful-timeout", "2", "--log-level", "warning"],
            cwd=ROOT,
            env=self.env,
            start_new_session=True,
            stderr=subprocess.DEVNULL,  # django.request logs every 4xx of the flood
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if request(f"{self.base}/healthz")[0] in (200, 503):
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("gunicorn did not start")

    def stop(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)


def measure_list(base: str, token: str, seconds: float) -> list[float]:
    times = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.perf_counter()
        status, _ = request(f"{base}/api/v1/tasks/", token=token)
        assert status == 200, status
        times.append((time.perf_counter() - started) * 1000)
        time.sleep(0.05)
    return times


def flood(base: str, threads: int, rate: float, stop: threading.Event, counts: dict) -> list[threading.Thread]:
    """``threads`` attackers sending ``rate`` wrong passwords per second in all (open loop: each
    thread keeps its own schedule, so a slow answer does not slow the attack down)."""
    lock = threading.Lock()
    period = threads / rate

    def attack(offset: float) -> None:
        next_at = time.monotonic() + offset
        while not stop.is_set():
            time.sleep(max(0.0, next_at - time.monotonic()))
            next_at += period
            try:
                status, _ = request(
                    f"{base}/api/v1/auth/token/", method="POST", body={"username": "alice", "password": "x"}
                )
            except OSError:
                status = "timeout"
            with lock:
                counts[status] = counts.get(status, 0) + 1

    workers = [threading.Thread(target=attack, args=(i * period / threads,), daemon=True) for i in range(threads)]
    for worker in workers:
        worker.start()
    return workers


def scenario(var_dir: str, env_extra: dict, seconds: float, threads: int, rate: float, label: str, token):
    server = Server(var_dir, env_extra)
    server.start()
    try:
        if token is None:
            status, body = request(
                f"{server.base}/api/v1/auth/token/",
                method="POST",
                body={"username": "bench", "password": "bench-pass-123"},
            )
            assert status == 200, body
            token = json.loads(body)["token"]
        results = {}
        results["baseline"] = measure_list(server.base, token, seconds / 2)
        stop = threading.Event()
        counts: dict = {}
        workers = flood(server.base, threads, rate, stop, counts)
        time.sleep(1.0)  # let the flood fill the workers
        results["flood"] = measure_list(server.base, token, seconds)
        stop.set()
        for worker in workers:
            worker.join(timeout=70)
        base, hot = results["baseline"], results["flood"]
        print(
            f"{label:<14} list alone p50 {statistics.median(base):7.1f} ms p95 {percentile(base, 0.95):7.1f} ms | "
            f"during flood p50 {statistics.median(hot):7.1f} ms p95 {percentile(hot, 0.95):7.1f} ms "
            f"({len(hot)} requests) | login answers {dict(sorted(counts.items(), key=str))}",
            flush=True,
        )
        return statistics.median(base), statistics.median(hot), token
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--threads", type=int, default=40)
    parser.add_argument("--rate", type=float, default=20.0, help="wrong passwords per second, all threads")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="login-flood-") as var_dir:
        env = {**os.environ, "VAR_DIR": var_dir}
        env.pop("DATABASE_URL", None)
        subprocess.run([PY, "manage.py", "migrate", "-v", "0"], cwd=ROOT, env=env, check=True)
        setup = (
            "from django.contrib.auth import get_user_model; U = get_user_model(); "
            "U.objects.create_user('bench', password='bench-pass-123'); "
            "U.objects.create_user('alice', password='alice-pass-123')"
        )
        subprocess.run([PY, "manage.py", "shell", "-c", setup], cwd=ROOT, env=env, check=True)
        print(
            f"gunicorn 2 workers x 4 threads, SQLite, PBKDF2; flood: {args.threads} threads, "
            f"{args.rate:g} wrong passwords/s in all (the issue measured about 4/s)"
        )
        base, hot, token = scenario(var_dir, {}, args.seconds, args.threads, args.rate, "throttle on", None)
        off = {"LOGIN_THROTTLE_ATTEMPTS": "100000000"}
        base_off, hot_off, _ = scenario(var_dir, off, args.seconds, args.threads, args.rate, "throttle off", token)
    target = 2 * base + 20
    verdict = "met" if hot <= target else "missed"
    print(f"throttle on: flood p50 {hot:.1f} ms vs target <= {target:.1f} ms (2 x baseline + 20): {verdict}")
    print(
        f"throttle off (for comparison): flood p50 {hot_off:.1f} ms, {hot_off / max(base_off, 0.1):.0f}x its baseline"
    )


if __name__ == "__main__":
    main()
