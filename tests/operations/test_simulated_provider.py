"""The simulated provider itself: persistent shared state, delays, cancel, failure injection."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from providers.base import (
    AmbiguousOutcome,
    CancelToken,
    GuestSpec,
    OperationCancelled,
    PermanentError,
    PortSpec,
    ProviderConfig,
    RetryableError,
    build_driver,
    no_progress,
)
from providers.simulated import SimulatedStore, validate_connection
from tasks import services
from tasks.reconcile import reconcile_instance
from tests.operations.conftest import fresh, inject, run


def _driver(tmp_path, **connection):
    connection.setdefault("state_dir", str(tmp_path / "host"))
    connection.setdefault("speed", 0.0)
    return build_driver(ProviderConfig(1, "sim", "simulated", connection, {}))


def _spec(name="vps-test"):
    return GuestSpec(name=name, instance_type="container", image="debian/12", cpu=1, memory_mb=512, disk_mb=1024)


def test_guests_survive_a_restart_and_are_shared_between_processes(tmp_path):
    driver = _driver(tmp_path)
    ref = driver.create(_spec(), CancelToken(), no_progress)
    # Another process (a second worker) starts the guest the first one created.
    code = (
        "from providers.base import *; "
        f"d = build_driver(ProviderConfig(1, 'sim', 'simulated', {{'state_dir': {str(tmp_path / 'host')!r}, "
        "'speed': 0.0}, {})); "
        f"d.start({ref!r}, CancelToken(), no_progress)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(Path(__file__).parents[2]), timeout=60)
    again = _driver(tmp_path)  # a fresh driver: nothing cached in memory
    state = again.get_state(ref)
    assert state.exists and state.status == "running" and state.addresses
    calls = SimulatedStore(tmp_path / "host", 1).executions()
    assert [(c["op"], c["applied"]) for c in calls] == [("create", 1), ("start", 1)]
    assert calls[0]["pid"] != calls[1]["pid"]


def test_every_call_is_idempotent(tmp_path):
    driver = _driver(tmp_path)
    ref = driver.create(_spec(), CancelToken(), no_progress)
    driver.create(_spec(), CancelToken(), no_progress)
    driver.start(ref, CancelToken(), no_progress)
    driver.start(ref, CancelToken(), no_progress)
    port = PortSpec("tcp", 20000, 20000, 22, 22)
    driver.add_port(ref, port, CancelToken(), no_progress)
    driver.add_port(ref, port, CancelToken(), no_progress)
    driver.delete(ref, CancelToken(), no_progress)
    driver.delete(ref, CancelToken(), no_progress)
    driver.remove_port(ref, port, CancelToken(), no_progress)
    applied = [(c["op"], c["applied"]) for c in SimulatedStore(tmp_path / "host", 1).executions()]
    assert applied == [
        ("create", 1),
        ("create", 0),
        ("start", 1),
        ("start", 0),
        ("add_port", 1),
        ("add_port", 0),
        ("delete", 1),
        ("delete", 0),
        ("remove_port", 0),
    ]
    assert not driver.get_state(ref).exists


def test_delays_scale_with_speed_and_report_progress(tmp_path):
    seen = []
    driver = _driver(tmp_path, speed=0.004)  # create is ~25 s at speed 1
    started = time.monotonic()
    driver.create(_spec(), CancelToken(), lambda p, m: seen.append((p, m)))
    elapsed = time.monotonic() - started
    assert 0.09 <= elapsed < 2.0
    assert seen[0][0] == 0 and seen[-1][0] == 100
    assert [p for p, _ in seen] == sorted(p for p, _ in seen)
    assert {m for _, m in seen} >= {"downloading image debian/12", "unpacking the root filesystem"}


def test_cancel_stops_a_slow_create_within_a_fraction_of_a_second(tmp_path):
    driver = _driver(tmp_path, speed=1.0)
    token = CancelToken()
    threading.Timer(0.3, token.cancel).start()
    started = time.monotonic()
    with pytest.raises(OperationCancelled):
        driver.create(_spec(), token, no_progress)
    assert time.monotonic() - started < 1.0
    # The deadline works the same way, with its own reason.
    with pytest.raises(OperationCancelled) as err:
        driver.create(_spec("vps-other"), CancelToken(deadline=time.monotonic() + 0.2), no_progress)
    assert err.value.reason == "timeout"


def test_hang_waits_for_cancel_unless_told_to_ignore_it(tmp_path):
    driver = _driver(tmp_path, hang_ops=["start"])
    ref = driver.create(_spec(), CancelToken(), no_progress)
    with pytest.raises(OperationCancelled):
        driver.start(ref, CancelToken(deadline=time.monotonic() + 0.2), no_progress)
    stubborn = _driver(tmp_path, hang_ops=["start"], ignore_cancel_ops=["start"], hang_seconds=0.3)
    started = time.monotonic()
    stubborn.start(ref, CancelToken(deadline=time.monotonic() + 0.05), no_progress)  # finishes anyway
    assert time.monotonic() - started >= 0.3 and stubborn.get_state(ref).status == "running"


def test_failure_kinds(tmp_path):
    ref = _driver(tmp_path).create(_spec(), CancelToken(), no_progress)
    with pytest.raises(RetryableError):
        _driver(tmp_path, fail_ops={"start": "retryable"}).start(ref, CancelToken(), no_progress)
    with pytest.raises(PermanentError):
        _driver(tmp_path, fail_ops={"start": "permanent"}).start(ref, CancelToken(), no_progress)
    assert _driver(tmp_path).get_state(ref).status == "stopped"  # failed before doing anything
    with pytest.raises(AmbiguousOutcome):
        _driver(tmp_path, fail_ops={"start": "ambiguous"}).start(ref, CancelToken(), no_progress)
    assert _driver(tmp_path).get_state(ref).status == "running"  # done, but the answer was lost


def test_fail_times_count_across_driver_instances(tmp_path):
    ref = _driver(tmp_path).create(_spec(), CancelToken(), no_progress)
    outcomes = []
    for _ in range(4):  # one driver per task, as in the worker
        try:
            _driver(tmp_path, fail_times={"stop": 2}).stop(ref, CancelToken(), no_progress)
            outcomes.append("ok")
        except RetryableError:
            outcomes.append("failed")
    assert outcomes == ["failed", "failed", "ok", "ok"]


def test_seeded_fail_rate_is_reproducible(tmp_path):
    def pattern(state_dir):
        result = []
        for i in range(30):
            driver = _driver(tmp_path, state_dir=str(state_dir), fail_rate=0.3, seed=42)
            try:
                driver.create(_spec(f"vps-{i}"), CancelToken(), no_progress)
                result.append(1)
            except RetryableError:
                result.append(0)
        return result

    first, second = pattern(tmp_path / "a"), pattern(tmp_path / "b")
    assert first == second and 0 < sum(first) < 30


def test_graceful_stop_that_hangs_is_forced_after_the_timeout(tmp_path):
    driver = _driver(tmp_path, speed=0.01, graceful_stop_fails=True)
    ref = driver.create(_spec(), CancelToken(), no_progress)
    _driver(tmp_path).start(ref, CancelToken(), no_progress)
    messages = []
    started = time.monotonic()
    driver.stop(ref, CancelToken(), lambda p, m: messages.append(m), graceful_timeout=20)
    assert time.monotonic() - started >= 0.2  # 20 s x 0.01
    assert "forcing the stop" in messages and driver.get_state(ref).status == "stopped"


def test_bad_settings_are_refused_with_a_readable_reason(alice, provider):
    assert validate_connection({"fail_rate": 2, "fial_ops": {}, "hang_ops": ["boot"]}) == [
        "unknown key 'fial_ops' (known: delete_leaves_guest, fail_epoch, fail_kind, fail_ops, fail_rate, "
        "fail_rate_ops, fail_times, graceful_stop_fails, hang_ops, hang_seconds, host_ports_in_use, ignore_cancel_ops, pmacct, "
        "seed, slow, speed, state_dir, traffic, unreachable)",
        "fail_rate must be between 0.0 and 1.0",
        "hang_ops must be a list of operations from create, start, stop, restart, delete, rebuild, "
        "set_password, add_port, remove_port, get_state",
    ]
    # An operator's typo fails the next task with the reason, not with a crash.
    instance, task = services.create_instance(alice, provider=provider, image="debian/12")
    inject(provider, fail_rate="often")
    run(provider)
    task = fresh(task)
    assert (task.status, task.error_code) == ("failed", "provider_error")
    assert "fail_rate must be a number" in task.error_message
    # The driver could not even be built; the instance waits for reconciliation,
    # which settles it once the operator has fixed the setting.
    assert (fresh(instance).status, fresh(instance).needs_reconcile) == ("unknown", True)
    assert reconcile_instance(instance.pk) is False
    inject(provider, fail_rate=0)
    assert reconcile_instance(instance.pk) is True
    assert fresh(instance).status == "failed" and not fresh(instance).holds_resources


def test_host_port_taken_by_another_guest_is_a_conflict(tmp_path):
    from providers.base import ConflictError

    driver = _driver(tmp_path)
    a = driver.create(_spec("vps-a"), CancelToken(), no_progress)
    b = driver.create(_spec("vps-b"), CancelToken(), no_progress)
    driver.add_port(a, PortSpec("tcp", 20000, 20009, 20000, 20009), CancelToken(), no_progress)
    with pytest.raises(ConflictError, match="already bound by vps-a"):
        driver.add_port(b, PortSpec("tcp", 20005, 20005, 22, 22), CancelToken(), no_progress)
    driver.add_port(b, PortSpec("udp", 20005, 20005, 53, 53), CancelToken(), no_progress)  # other protocol


def test_passwords_are_kept_hashed(tmp_path):
    driver = _driver(tmp_path)
    ref = driver.create(_spec(), CancelToken(), no_progress)
    with pytest.raises(PermanentError, match="not running"):
        driver.set_password(ref, "Secret-pass-1", CancelToken(), no_progress)
    driver.start(ref, CancelToken(), no_progress)
    driver.set_password(ref, "Secret-pass-1", CancelToken(), no_progress)
    store = SimulatedStore(tmp_path / "host", 1)
    assert store.password_matches("vps-test", "Secret-pass-1")
    assert not store.password_matches("vps-test", "Secret-pass-2")
    assert "Secret-pass-1" not in str(store.guest("vps-test"))


def test_host_channel_answers_pmacct_only(tmp_path):
    driver = _driver(tmp_path)
    ref = driver.create(_spec(), CancelToken(), no_progress)
    driver.start(ref, CancelToken(), no_progress)
    channel = driver.host_channel()
    rc, out, _ = channel.run(["pmacct", "-p", "/var/run/pmacct/vps-test.pipe", "-s", "-O", "json"])
    assert rc == 0 and len(out.splitlines()) == 2
    assert channel.run(["rm", "-rf", "/"])[0] == 127
    assert channel.run(["pmacct", "-p", "/var/run/pmacct/nobody.pipe", "-s", "-O", "json"])[0] == 1
