"""LXD and Incus drivers against the fake daemon: password, port mappings, guest state.

Per operation: success, already in the wanted state, retryable then success,
permanent, cancel and deadline mid-operation. Runs once per flavour.
"""

from __future__ import annotations

import threading
import time

import pytest

from providers.base import (
    AuthError,
    CancelToken,
    ConflictError,
    OperationCancelled,
    PermanentError,
    PortSpec,
    RetryableError,
    UnsupportedError,
    no_progress,
)
from tests.providers.fake_lxd import RUNNING
from tests.providers.lxd_helpers import NAME, assert_cancelled, cancel_soon, prompt

REF = {"name": NAME}
SSH = PortSpec("tcp", 20022, 20022, 22, 22)
SSH_DEVICE = {"type": "proxy", "listen": "tcp:0.0.0.0:20022", "connect": "tcp:127.0.0.1:22"}


def ok() -> CancelToken:
    return CancelToken()


# ----------------------------------------------------------------- password


def test_password_goes_to_chpasswd_on_stdin_never_argv_or_environment(lxd_env):
    lxd_env.fake.add_instance(NAME, status=RUNNING)
    lxd_env.driver().set_password(REF, "Tr0ub4dor:&3", ok(), no_progress)
    assert lxd_env.fake.instances[NAME]["password"] == "Tr0ub4dor:&3"
    (entry,) = lxd_env.fake.exec_log
    assert entry["command"] == ["chpasswd"] and entry["environment"] == {}
    assert entry["stdin"] == b"root:Tr0ub4dor:&3\n"
    body = lxd_env.fake.calls("POST", "/exec$")[0]["json"]
    assert "Tr0ub4dor" not in str(body)


def test_password_set_twice_is_fine(lxd_env):
    lxd_env.fake.add_instance(NAME, status=RUNNING)
    driver = lxd_env.driver()
    driver.set_password(REF, "first-secret", ok(), no_progress)
    driver.set_password(REF, "first-secret", ok(), no_progress)
    assert lxd_env.fake.instances[NAME]["password"] == "first-secret"


def test_password_while_the_vm_agent_boots_is_retryable_then_succeeds(lxd_env):
    lxd_env.fake.add_instance(NAME, status=RUNNING, type="virtual-machine")
    lxd_env.fake.fail_next("POST", "/exec$", status=400, message="VM agent isn't currently running")
    driver = lxd_env.driver()
    with pytest.raises(RetryableError):
        driver.set_password(REF, "agent-secret", ok(), no_progress)
    driver.set_password(REF, "agent-secret", ok(), no_progress)
    assert lxd_env.fake.instances[NAME]["password"] == "agent-secret"


def test_password_rejected_by_chpasswd_is_permanent_and_not_echoed(lxd_env):
    lxd_env.fake.add_instance(NAME, status=RUNNING)
    lxd_env.fake.plan("exec", exit_code=1, stderr="chpasswd: bad password hunter2-secret\n")
    with pytest.raises(PermanentError, match="exited with 1") as info:
        lxd_env.driver().set_password(REF, "hunter2-secret", ok(), no_progress)
    assert "hunter2-secret" not in str(info.value)


def test_password_on_a_stopped_guest_is_permanent(lxd_env):
    lxd_env.fake.add_instance(NAME)
    with pytest.raises(PermanentError, match="not running"):
        lxd_env.driver().set_password(REF, "whatever-secret", ok(), no_progress)


def test_password_cancelled_mid_exec_cancels_the_operation(lxd_env):
    lxd_env.fake.add_instance(NAME, status=RUNNING)
    lxd_env.fake.plan("exec", hang=True)
    assert_cancelled(lambda token: lxd_env.driver().set_password(REF, "slow-secret", token, no_progress))
    assert len(lxd_env.fake.calls("DELETE", r"^/1.0/operations/")) == 1
    assert lxd_env.fake.instances[NAME]["password"] is None


def test_password_past_its_deadline(lxd_env):
    lxd_env.fake.add_instance(NAME, status=RUNNING)
    lxd_env.fake.plan("exec", hang=True)
    assert_cancelled(lambda token: lxd_env.driver().set_password(REF, "slow-secret", token, no_progress), deadline=True)


# ------------------------------------------------------------- add a port


def test_add_port_creates_a_proxy_device_named_by_the_handle(lxd_env):
    lxd_env.fake.add_instance(NAME, status=RUNNING)
    lxd_env.driver().add_port(REF, SSH, ok(), no_progress)
    assert lxd_env.fake.instances[NAME]["devices"]["pm-tcp-20022"] == SSH_DEVICE


def test_add_port_range(lxd_env):
    lxd_env.fake.add_instance(NAME, status=RUNNING)
    lxd_env.driver().add_port(REF, PortSpec("udp", 20000, 20010, 30000, 30010), ok(), no_progress)
    assert lxd_env.fake.instances[NAME]["devices"]["pm-udp-20000-20010"] == {
        "type": "proxy",
        "listen": "udp:0.0.0.0:20000-20010",
        "connect": "udp:127.0.0.1:30000-30010",
    }


def test_add_port_on_a_vm_uses_nat_mode_on_the_configured_address(lxd_env):
    lxd_env.fake.add_instance(NAME, status=RUNNING, type="virtual-machine")
    with pytest.raises(UnsupportedError, match="nat_listen_address"):
        lxd_env.driver().add_port(REF, SSH, ok(), no_progress)
    lxd_env.driver(nat_listen_address="192.0.2.10").add_port(REF, SSH, ok(), no_progress)
    assert lxd_env.fake.instances[NAME]["devices"]["pm-tcp-20022"] == {
        "type": "proxy",
        "nat": "true",
        "listen": "tcp:192.0.2.10:20022",
        "connect": "tcp:0.0.0.0:22",
    }


def test_add_port_already_present_sends_nothing(lxd_env):
    lxd_env.fake.add_instance(NAME, status=RUNNING, devices={"pm-tcp-20022": dict(SSH_DEVICE)})
    lxd_env.driver().add_port(REF, SSH, ok(), no_progress)
    assert lxd_env.fake.calls("PATCH", "/instances/") == []


def test_add_port_with_the_handle_taken_by_another_definition_conflicts(lxd_env):
    other = dict(SSH_DEVICE, connect="tcp:127.0.0.1:2222")
    lxd_env.fake.add_instance(NAME, status=RUNNING, devices={"pm-tcp-20022": other})
    with pytest.raises(ConflictError):
        lxd_env.driver().add_port(REF, SSH, ok(), no_progress)


def test_add_port_unavailable_is_retryable_then_succeeds(lxd_env):
    lxd_env.fake.add_instance(NAME, status=RUNNING)
    lxd_env.fake.fail_next("PATCH", "/instances/", status=503)
    driver = lxd_env.driver()
    with pytest.raises(RetryableError):
        driver.add_port(REF, SSH, ok(), no_progress)
    driver.add_port(REF, SSH, ok(), no_progress)
    assert "pm-tcp-20022" in lxd_env.fake.instances[NAME]["devices"]


def test_add_port_bound_elsewhere_on_the_host_is_a_conflict(lxd_env):
    lxd_env.fake.add_instance("vps-other", status=RUNNING, devices={"pm-tcp-20022": dict(SSH_DEVICE)})
    lxd_env.fake.add_instance(NAME, status=RUNNING)
    with pytest.raises(ConflictError, match="address already in use") as info:
        lxd_env.driver().add_port(REF, SSH, ok(), no_progress)
    assert not info.value.retryable


def test_add_port_cancelled_before_the_change_sends_nothing(lxd_env):
    lxd_env.fake.add_instance(NAME, status=RUNNING)
    token = CancelToken()
    token.cancel()
    with pytest.raises(OperationCancelled):
        lxd_env.driver().add_port(REF, SSH, token, no_progress)
    assert lxd_env.fake.calls("PATCH", "/instances/") == []


def test_add_port_cancelled_while_the_change_is_in_flight_lets_it_land(lxd_env):
    # PATCH is synchronous on the daemon: it cannot be taken back, so the truth wins.
    lxd_env.fake.add_instance(NAME, status=RUNNING)
    lxd_env.fake.fail_next("PATCH", "/instances/", status=0, delay=0.5)
    token = CancelToken()
    cancel_soon(token, 0.1)
    with prompt():
        lxd_env.driver().add_port(REF, SSH, token, no_progress)
    assert token.cancelled and "pm-tcp-20022" in lxd_env.fake.instances[NAME]["devices"]


def test_add_port_past_its_deadline_while_the_daemon_hangs(lxd_env):
    lxd_env.fake.add_instance(NAME, status=RUNNING)
    lxd_env.fake.fail_next("PATCH", "/instances/", status=0, delay=30)
    token = CancelToken(deadline=time.monotonic() + 0.3)
    with prompt(3.0), pytest.raises(OperationCancelled) as info:
        lxd_env.driver().add_port(REF, SSH, token, no_progress)
    assert info.value.reason == "timeout"


def test_a_call_still_hanging_when_its_test_ends_never_lands_in_the_next_one(lxd_env):
    # The fake daemon outlives tests: a hung call released by reset() must be
    # dropped, or it lands in the next test's state (a flaky failure seen in CI).
    lxd_env.fake.add_instance(NAME, status=RUNNING)
    lxd_env.fake.fail_next("PATCH", "/instances/", status=0, delay=30)
    errors: list[Exception] = []

    def hung_call() -> None:
        try:
            lxd_env.driver().add_port(REF, SSH, ok(), no_progress)
        except Exception as exc:  # noqa: BLE001 - whatever it is, it must not be success
            errors.append(exc)

    caller = threading.Thread(target=hung_call)
    caller.start()
    while not lxd_env.fake.calls("PATCH", "/instances/"):
        time.sleep(0.01)
    with lxd_env.fake.lock:  # the next test sets up before the released call can act
        lxd_env.fake.reset()
        lxd_env.fake.add_instance(NAME, status=RUNNING)
    caller.join(5)
    assert not caller.is_alive() and len(errors) == 1
    assert lxd_env.fake.instances[NAME]["devices"] == {}


# ---------------------------------------------------------- remove a port


def test_remove_port_drops_only_that_device(lxd_env):
    keep = {"type": "proxy", "listen": "tcp:0.0.0.0:20080", "connect": "tcp:127.0.0.1:80"}
    devices = {"pm-tcp-20022": dict(SSH_DEVICE), "pm-tcp-20080": keep}
    lxd_env.fake.add_instance(NAME, status=RUNNING, devices=devices)
    lxd_env.driver().remove_port(REF, SSH, ok(), no_progress)
    assert lxd_env.fake.instances[NAME]["devices"] == {"pm-tcp-20080": keep}
    assert lxd_env.fake.calls("PUT", rf"/instances/{NAME}$")[0]["headers"].get("If-Match")


def test_remove_port_already_absent_sends_nothing(lxd_env):
    lxd_env.fake.add_instance(NAME, status=RUNNING)
    lxd_env.driver().remove_port(REF, SSH, ok(), no_progress)
    assert lxd_env.fake.calls("PUT", rf"/instances/{NAME}$") == []


def test_remove_port_on_a_deleted_guest_is_success(lxd_env):
    lxd_env.driver().remove_port(REF, SSH, ok(), no_progress)


def test_remove_port_rereads_when_the_instance_changed_underneath(lxd_env):
    lxd_env.fake.add_instance(NAME, status=RUNNING, devices={"pm-tcp-20022": dict(SSH_DEVICE)})
    lxd_env.fake.fail_next("PUT", rf"/instances/{NAME}$", status=412, message="ETag doesn't match")
    lxd_env.driver().remove_port(REF, SSH, ok(), no_progress)
    assert "pm-tcp-20022" not in lxd_env.fake.instances[NAME]["devices"]
    assert len(lxd_env.fake.calls("PUT", rf"/instances/{NAME}$")) == 2


def test_remove_port_unavailable_is_retryable_then_succeeds(lxd_env):
    lxd_env.fake.add_instance(NAME, status=RUNNING, devices={"pm-tcp-20022": dict(SSH_DEVICE)})
    lxd_env.fake.fail_next("PUT", rf"/instances/{NAME}$", status=502)
    driver = lxd_env.driver()
    with pytest.raises(RetryableError):
        driver.remove_port(REF, SSH, ok(), no_progress)
    driver.remove_port(REF, SSH, ok(), no_progress)
    assert "pm-tcp-20022" not in lxd_env.fake.instances[NAME]["devices"]


def test_remove_port_refused_is_permanent(lxd_env):
    lxd_env.fake.add_instance(NAME, status=RUNNING, devices={"pm-tcp-20022": dict(SSH_DEVICE)})
    lxd_env.fake.fail_next("PUT", rf"/instances/{NAME}$", status=403, message="not authorized")
    with pytest.raises(AuthError):
        lxd_env.driver().remove_port(REF, SSH, ok(), no_progress)


def test_remove_port_cancelled_mid_operation(lxd_env):
    lxd_env.fake.add_instance(NAME, status=RUNNING, devices={"pm-tcp-20022": dict(SSH_DEVICE)})
    lxd_env.fake.plan("update", hang=True)
    assert_cancelled(lambda token: lxd_env.driver().remove_port(REF, SSH, token, no_progress))


def test_remove_port_past_its_deadline(lxd_env):
    lxd_env.fake.add_instance(NAME, status=RUNNING, devices={"pm-tcp-20022": dict(SSH_DEVICE)})
    lxd_env.fake.plan("update", hang=True)
    assert_cancelled(lambda token: lxd_env.driver().remove_port(REF, SSH, token, no_progress), deadline=True)


# -------------------------------------------------------------------- state


def test_state_of_a_running_guest_lists_global_addresses_and_ports(lxd_env):
    lxd_env.fake.add_instance(NAME, status=RUNNING, devices={"pm-tcp-20022": dict(SSH_DEVICE)})
    ip = lxd_env.fake.instances[NAME]["ip"]
    state = lxd_env.driver().get_state(REF)
    assert (state.exists, state.status) == (True, "running")
    assert state.addresses == [f"10.0.3.{ip}", f"fd42::{ip}"]  # no loopback, no link-local
    assert state.ports == [SSH]
    assert state.ref["name"] == NAME


def test_state_of_a_stopped_guest_has_no_addresses(lxd_env):
    lxd_env.fake.add_instance(NAME)
    state = lxd_env.driver().get_state(REF)
    assert (state.exists, state.status, state.addresses) == (True, "stopped", [])


def test_state_of_a_missing_guest(lxd_env):
    assert lxd_env.driver().get_state(REF).exists is False


def test_state_read_failing_is_retryable(lxd_env):
    lxd_env.fake.add_instance(NAME)
    lxd_env.fake.fail_next("GET", rf"/instances/{NAME}$", status=504)
    with pytest.raises(RetryableError):
        lxd_env.driver().get_state(REF)
