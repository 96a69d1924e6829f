"""tasks.engine.pool: the pusher's gate, and the ties of the pool to its supervisor."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time

import pytest

from tasks.engine.pool import Gate, GatedQueue


def test_the_gate_lets_a_job_through_only_for_a_free_worker():
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    flags = [ctx.Value("b", 1, lock=False) for _ in range(2)]
    gate = Gate(flags, queue)
    assert gate.free() == 0 and not gate.wait(0.01), "no worker waits yet"
    first, second = GatedQueue(queue, flags[0]), GatedQueue(queue, flags[1])
    # A worker waiting on the queue lowers its flag; taking a job raises it again.
    flags[0].value = 0
    assert gate.free() == 1 and gate.wait(0.01)
    queue.put("job-1")
    deadline = time.monotonic() + 2
    while gate.free() != 0 and time.monotonic() < deadline:  # (the feeder thread delivers it)
        time.sleep(0.005)
    assert gate.free() == 0, "one waiting worker, one job queued for it: nothing more"
    assert first.get(timeout=2) == "job-1"
    assert flags[0].value == 1 and gate.free() == 0, "busy with it"
    flags[1].value = 0
    assert gate.free() == 1
    queue.put("job-2")
    assert second.get(timeout=2) == "job-2" and gate.free() == 0


def test_a_pool_process_dies_with_its_parent():
    """The tie every pool process gets (PR_SET_PDEATHSIG): kill -9 of the parent kills the child."""
    code = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', "
        "'import os, time; from tasks.engine.pool import tie_to_parent; tie_to_parent(os.getppid()); "
        "print(os.getpid(), flush=True); time.sleep(60)'], stdout=subprocess.PIPE, text=True)\n"
        "print(child.stdout.readline().strip(), flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    child = int(parent.stdout.readline())
    os.kill(child, 0)  # alive
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(child, 9)
    raise AssertionError("the child outlived its parent")


def test_every_command_of_one_write_is_read_at_once():
    """A grow of several clusters is one write of several lines: all of them are taken
    in the same round, a partial line waits for its end, and a closed pipe says so."""
    from tasks.engine.pool import CommandReader

    read_fd, write_fd = os.pipe()
    try:
        reader = CommandReader(read_fd)
        assert reader.read(0.01) == []
        os.write(write_fd, b"grow 16\ngrow 16\ngrow 15\nretire po")
        assert reader.read(0.5) == ["grow 16", "grow 16", "grow 15"]
        os.write(write_fd, b"ol-2\n")
        assert reader.read(0.5) == ["retire pool-2"]
        os.close(write_fd)
        write_fd = None
        assert reader.read(0.5) is None
    finally:
        os.close(read_fd)
        if write_fd is not None:
            os.close(write_fd)


@pytest.mark.django_db
def test_the_pool_warms_what_its_forked_workers_would_each_build(monkeypatch):
    """A worker forked from the pool finds the hot paths' tables and the models' query
    machinery built: it does not spend its first task rebuilding them (issue 15, busy start)."""
    from django.apps import apps

    from tasks.engine import pool, sql

    monkeypatch.setattr(sql, "_tables", {})
    pool.warm()
    models = set(apps.get_app_config("tasks").get_models())
    assert models and models <= set(sql._tables)


@pytest.mark.django_db
def test_a_database_out_of_reach_leaves_the_pool_cold_but_starting(monkeypatch, caplog):
    from django.db import OperationalError, connection

    from tasks.engine import pool

    def down():
        raise OperationalError("(2003) Can't connect to MySQL server")

    monkeypatch.setattr(connection, "ensure_connection", down)
    pool.warm()  # does not raise: the workers connect for themselves later
    assert "could not warm" in caplog.text


def test_the_pool_reports_its_idle_workers_the_most_seen_over_a_short_window(tmp_path):
    """The supervisor grows the pool when none of its workers waited for a job over the
    window (tasks.engine.supervisor): a worker between two jobs must not look like that."""
    import json
    from types import SimpleNamespace

    from tasks.engine.pool import IDLE_WINDOW_SECONDS, Member, Pool

    ctx = multiprocessing.get_context("fork")
    status = tmp_path / "pool.json"
    pool = Pool(str(status))

    def member(name, workers, **kw):
        flags = [ctx.Value("b", 1, lock=False) for _ in range(workers)]
        m = Member(name, workers, True, SimpleNamespace(pid=1), None, None, flags=flags, **kw)
        pool.members.append(m)
        return m

    def reported():
        return json.loads(status.read_text())["idle_workers"]

    starting = member("pool-1", 2)
    pool.check_idle(0.0)
    assert not status.exists() and pool.idle_workers is None, "no cluster serves yet: nothing to say"
    starting.running = True
    pool.check_idle(0.1)
    assert reported() == 0, "both workers busy"
    starting.flags[0].value = 0
    pool.check_idle(0.2)
    assert reported() == 1
    starting.flags[0].value = 1  # it took a job
    pool.check_idle(0.3)
    assert reported() == 1, "one was idle within the window"
    pool.check_idle(0.2 + IDLE_WINDOW_SECONDS + 0.01)
    assert reported() == 0, "busy for a whole window"
    retiring = member("pool-2", 3, running=True, retiring=True)
    for flag in retiring.flags:
        flag.value = 0
    pool.check_idle(1.0)
    assert reported() == 0, "a retiring cluster takes no job: not room"
