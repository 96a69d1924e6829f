"""Worker processes opening a new simulated provider's file at the same moment (a burst
on providers nobody used since start: bench/tier_cost saw a task fail on it) must not
fail: switching the file to WAL does not wait for the other opener."""

from __future__ import annotations

import multiprocessing


def _open(state_dir: str, barrier, results) -> None:
    from providers.simulated.store import SimulatedStore, _initialised

    _initialised.clear()  # (a fresh worker process: it has opened nothing yet)
    barrier.wait()
    try:
        SimulatedStore(state_dir, 7).put_guest("g", status="running", instance_type="container")
        results.put("ok")
    except Exception as exc:  # reported below
        results.put(f"{type(exc).__name__}: {exc}")


def test_two_processes_opening_a_new_store_at_once_both_succeed(tmp_path):
    ctx = multiprocessing.get_context("fork")
    outcomes = []
    for round_ in range(30):  # (the race is narrow: without the fix ~1 round in 7 failed)
        barrier, results = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_open, args=(str(tmp_path / str(round_)), barrier, results)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        outcomes += [results.get(timeout=5) for _ in range(2)]
    assert [o for o in outcomes if o != "ok"] == []
