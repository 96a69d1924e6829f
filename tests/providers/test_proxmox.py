"""ProxmoxDriver against an in-process PVE API over TLS, proxmoxer in the loop.

Each operation: success, already in the wanted state, retryable error then
success, permanent error, cancel mid-operation (the remote task is stopped),
deadline mid-operation.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time

import pytest
import trustme

from providers.base import (
    CANCEL_TIMEOUT,
    CANCEL_USER,
    AmbiguousOutcome,
    AuthError,
    CancelToken,
    ConflictError,
    GuestSpec,
    NotFoundError,
    OperationCancelled,
    PermanentError,
    PortSpec,
    ProviderConfig,
    RetryableError,
    UnsupportedError,
    build_driver,
)
from providers.proxmox import ProxmoxDriver
from tests.providers.fakes_hostshell import FakeHostShell
from tests.providers.fakes_pve import FakePVE, ServerThread, pve_tls_context

IMAGES = {
    "debian/12": {
        "lxc": "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst",
        "qemu": "local:import/debian-12-generic.qcow2",
    },
    "debian/12-tmpl": {"qemu": "template:9000"},
}


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def pve(ca):
    fake = FakePVE()
    ctx, cert = pve_tls_context(ca)
    server = ServerThread(fake, "127.0.0.1", 0, ssl_context=ctx)
    fake.port = server.port
    fake.cert = cert
    yield fake
    fake.release()
    server.stop()


@pytest.fixture
def shell():
    return FakeHostShell()


def config(pve, ca, **connection) -> ProviderConfig:
    conn = {
        "host": "127.0.0.1",
        "port": pve.port,
        "node": "pve1",
        "verify": ca.cert_pem.bytes().decode(),
        "poll_interval": 0.02,
        "timeout": 5,
        "images": IMAGES,
    }
    conn.update(connection)
    return ProviderConfig(1, "pve-test", "proxmox", conn, {"token": pve.token})


@pytest.fixture
def driver(pve, ca, shell):
    return ProxmoxDriver(config(pve, ca), shell=shell)


def spec(kind="container", name="vps-0123456789ab", **kw) -> GuestSpec:
    fields = dict(name=name, instance_type=kind, image="debian/12", cpu=2, memory_mb=1024, disk_mb=8192)
    fields.update(kw)
    return GuestSpec(**fields)


class Progress:
    def __init__(self):
        self.calls: list[tuple[int, str]] = []

    def __call__(self, percent: int, message: str) -> None:
        self.calls.append((percent, message))


def wait_for(condition, seconds: float = 5.0) -> None:
    """Until the fake's background work (a released request) has happened."""
    limit = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < limit, "the fake never got there"
        time.sleep(0.01)


def cancel_after(seconds: float) -> CancelToken:
    token = CancelToken()
    threading.Timer(seconds, token.cancel, args=(CANCEL_USER,)).start()
    return token


def make_guest(driver, kind="container", running=True, name="vps-0123456789ab") -> dict:
    ref = driver.create(spec(kind, name=name), CancelToken(), Progress())
    if running:
        driver.start(ref, CancelToken(), Progress())
    return ref


# ------------------------------------------------------------------ connection


def test_server_info_reports_version_and_node(driver):
    info = driver.server_info()
    assert info.version == "8.2.4"
    assert info.details["node"] == "pve1"
    caps = driver.capabilities()
    assert caps.instance_types == ("container", "vm") and caps.remote_cancel


def test_build_driver_picks_proxmox(pve, ca):
    assert isinstance(build_driver(config(pve, ca)), ProxmoxDriver)


def test_wrong_token_is_an_auth_error(pve, ca):
    cfg = config(pve, ca)
    cfg.secrets = {"token": "root@pam!panel=wrong"}
    with pytest.raises(AuthError):
        ProxmoxDriver(cfg).server_info()


def test_unknown_node_is_a_clear_permanent_error(pve, ca):
    with pytest.raises(PermanentError, match="node 'pve9' not found"):
        ProxmoxDriver(config(pve, ca, node="pve9")).server_info()


def test_pinned_fingerprint_accepts_the_server_and_rejects_another(pve, ca):
    der = pve.cert.cert_chain_pems[0].bytes()
    import ssl

    digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(der.decode())).hexdigest()
    pinned = ":".join(digest[i : i + 2] for i in range(0, 64, 2)).upper()
    assert ProxmoxDriver(config(pve, ca, verify=pinned)).server_info().version == "8.2.4"
    with pytest.raises(AuthError, match="TLS"):
        ProxmoxDriver(config(pve, ca, verify="sha256:" + "00" * 32)).server_info()


def test_untrusted_certificate_is_refused(pve, ca):
    with pytest.raises(AuthError, match="TLS"):
        ProxmoxDriver(config(pve, ca, verify=trustme.CA().cert_pem.bytes().decode())).server_info()


def test_machine_proxy_and_ca_variables_are_ignored(pve, ca, monkeypatch, tmp_path):
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bogus))
    monkeypatch.setenv("CURL_CA_BUNDLE", str(bogus))
    assert ProxmoxDriver(config(pve, ca)).server_info().version == "8.2.4"


def test_connection_refused_is_retryable(pve, ca):
    cfg = config(pve, ca, port=9)
    with pytest.raises(RetryableError, match="cannot connect"):
        ProxmoxDriver(cfg).server_info()


def test_missing_token_or_host_fail_at_construction(pve, ca):
    cfg = config(pve, ca)
    cfg.secrets = {}
    with pytest.raises(AuthError):
        ProxmoxDriver(cfg)
    with pytest.raises(PermanentError, match="connection.node"):
        ProxmoxDriver(config(pve, ca, node=""))


# ------------------------------------------------------------------ create


def test_create_container(driver, pve):
    progress = Progress()
    ref = driver.create(spec(labels={"owner": "7"}), CancelToken(), progress)
    assert ref == {"node": "pve1", "type": "lxc", "vmid": 100, "name": "vps-0123456789ab"}
    guest = pve.guests[100]
    assert guest.config["hostname"] == "vps-0123456789ab"
    assert (guest.config["cores"], guest.config["memory"], guest.config["rootfs"]) == ("2", "1024", "local-lvm:8")
    assert guest.config["net0"].startswith("name=eth0,bridge=vmbr0,ip=dhcp")
    assert guest.config["tags"] == "cloudhost" and "owner=7" in guest.config["description"]
    assert "lock" not in guest.config and guest.status == "stopped"
    assert progress.calls[-1][0] == 90
    assert [p for p, _ in progress.calls] == sorted(p for p, _ in progress.calls)


def test_create_vm_imports_the_image_and_grows_the_disk(driver, pve):
    ref = driver.create(spec("vm", bandwidth_mbps=100), CancelToken(), Progress())
    assert ref["type"] == "qemu"
    guest = pve.guests[ref["vmid"]]
    assert guest.config["scsi0"] == "local-lvm:0,import-from=local:import/debian-12-generic.qcow2"
    assert guest.config["ide2"] == "local-lvm:cloudinit"
    assert guest.config["net0"] == "virtio,bridge=vmbr0,rate=12.5"
    assert guest.disk_gib == 8


def test_create_vm_from_a_template_clones_then_configures(driver, pve):
    pve.add_template(9000)
    ref = driver.create(spec("vm", image="debian/12-tmpl", cpu=4), CancelToken(), Progress())
    guest = pve.guests[ref["vmid"]]
    assert guest.config["name"] == "vps-0123456789ab" and guest.config["cores"] == "4"
    assert pve.calls_to("POST", r"qemu/9000/clone")[0]["full"] == "1"
    assert guest.disk_gib == 8


def test_create_is_idempotent(driver, pve):
    first = driver.create(spec(), CancelToken(), Progress())
    second = driver.create(spec(), CancelToken(), Progress())
    assert first == second
    assert len(pve.calls_to("POST", r"^nodes/pve1/lxc$")) == 1


def test_create_uses_the_reserved_vmid_and_a_retry_reuses_it(driver, pve):
    reserved = driver.reserve(spec())
    assert reserved["vmid"] == 100 and not pve.guests
    ref = driver.create(spec(ref={"vmid": 123}), CancelToken(), Progress())
    assert ref["vmid"] == 123
    assert driver.create(spec(ref=ref), CancelToken(), Progress()) == ref
    assert driver.reserve(spec()) == ref


def test_reserved_vmid_taken_by_another_guest_gets_a_fresh_one(driver, pve):
    other = driver.create(spec(name="someone-else"), CancelToken(), Progress())
    ref = driver.create(spec(ref={"vmid": other["vmid"]}), CancelToken(), Progress())
    assert ref["vmid"] != other["vmid"]
    assert pve.guests[other["vmid"]].name == "someone-else"


def test_create_lock_timeout_is_retryable_then_succeeds(driver, pve):
    pve.fail_next(1, 500, "can't lock file '/var/lock/pve-manager/pve-storage-local-lvm' - got timeout", "POST")
    with pytest.raises(RetryableError):
        driver.create(spec(), CancelToken(), Progress())
    assert driver.create(spec(), CancelToken(), Progress())["vmid"] == 100


def test_create_task_failing_on_a_lock_is_retryable(driver, pve):
    pve.fail_tasks["vzcreate"] = "can't lock file '/run/lock/lxc/pve-config-100.lock' - got timeout"
    with pytest.raises(RetryableError):
        driver.create(spec(), CancelToken(), Progress())
    del pve.fail_tasks["vzcreate"]
    assert driver.create(spec(), CancelToken(), Progress())["vmid"] == 100


def test_create_refused_by_pve_is_permanent(driver, pve, ca):
    with pytest.raises(PermanentError, match="storage 'nope' does not exist") as err:
        ProxmoxDriver(config(pve, ca, storage="nope")).create(spec(), CancelToken(), Progress())
    assert not isinstance(err.value, (RetryableError, AmbiguousOutcome, NotFoundError))
    pve.fail_tasks["vzcreate"] = "unable to create CT 100 - no space left on device"
    with pytest.raises(PermanentError, match="no space left"):
        driver.create(spec(), CancelToken(), Progress())


def test_unmapped_image_is_refused_before_any_call(driver, pve):
    with pytest.raises(PermanentError, match="no lxc template"):
        driver.create(spec(image="arch/latest"), CancelToken(), Progress())
    assert not pve.calls_to("POST", r".")


def test_create_5xx_from_a_proxy_is_ambiguous(driver, pve):
    pve.fail_next(1, 502, "Bad Gateway", "POST", r"^nodes/pve1/lxc$")
    with pytest.raises(AmbiguousOutcome):
        driver.create(spec(), CancelToken(), Progress())


def test_create_lost_response_is_ambiguous_and_the_retry_converges(pve, ca, shell):
    driver = ProxmoxDriver(config(pve, ca, timeout=0.5), shell=shell)
    pve.hang_paths.append(r"^POST nodes/pve1/lxc$")
    with pytest.raises(AmbiguousOutcome):
        driver.create(spec(), CancelToken(), Progress())
    pve.hang_paths.clear()
    pve.release()  # the POST now goes through on the server: the guest exists
    wait_for(lambda: 100 in pve.guests)
    ref = driver.create(spec(), CancelToken(), Progress())
    assert ref["vmid"] == 100 and list(pve.guests) == [100]


def test_create_finds_a_half_created_guest_and_waits_for_its_task(driver, pve):
    pve.hang_tasks.add("vzcreate")
    with pytest.raises(OperationCancelled):
        driver.create(spec(), CancelToken(deadline=time.monotonic() + 0.2), Progress())
    # The remote task was stopped and PVE removed the half-built guest.
    assert not pve.guests
    assert pve.calls_to("DELETE", r"tasks/UPID:")


def test_retry_waits_for_the_create_task_of_an_earlier_attempt(driver, pve):
    pve.hang_tasks.add("vzcreate")
    pve.fail_next(99, 504, "Gateway Timeout", "GET", r"tasks/UPID:.*/status")
    with pytest.raises(RetryableError):
        driver.create(spec(), CancelToken(), Progress())  # lost track of the task
    pve.faults.clear()
    upid = next(iter(pve.tasks))
    pve.tasks[upid].hang = False  # the node finishes it
    ref = driver.create(spec(), CancelToken(), Progress())
    assert ref["vmid"] == 100 and "lock" not in pve.guests[100].config
    assert len(pve.calls_to("POST", r"^nodes/pve1/lxc$")) == 1


@pytest.mark.parametrize("reason", [CANCEL_USER, CANCEL_TIMEOUT])
def test_create_cancelled_mid_task_stops_it_promptly(driver, pve, reason):
    pve.hang_tasks.add("vzcreate")
    token = cancel_after(0.2) if reason == CANCEL_USER else CancelToken(deadline=time.monotonic() + 0.2)
    started = time.monotonic()
    with pytest.raises(OperationCancelled) as err:
        driver.create(spec(), token, Progress())
    assert err.value.reason == reason
    assert time.monotonic() - started < 2
    upid = next(iter(pve.tasks))
    assert pve.tasks[upid].exitstatus == "received interrupt"


# ------------------------------------------------------------------ start / stop / restart / delete


def test_start_stop_restart(driver, pve):
    ref = make_guest(driver, running=False)
    driver.start(ref, CancelToken(), Progress())
    assert pve.guests[100].status == "running"
    driver.restart(ref, CancelToken(), Progress())
    assert pve.calls_to("POST", r"status/reboot")
    driver.stop(ref, CancelToken(), Progress(), graceful_timeout=7)
    assert pve.guests[100].status == "stopped"
    assert pve.calls_to("POST", r"status/shutdown") == [{"timeout": "7", "forceStop": "1"}]


def test_restart_of_a_stopped_guest_starts_it(driver, pve):
    ref = make_guest(driver, running=False)
    driver.restart(ref, CancelToken(), Progress())
    assert pve.guests[100].status == "running" and not pve.calls_to("POST", r"status/reboot")


@pytest.mark.parametrize(
    "operation,running,path",
    [("start", True, "status/start"), ("stop", False, "status/(shutdown|stop)")],
)
def test_already_in_state_makes_no_task(driver, pve, operation, running, path):
    ref = make_guest(driver, running=running)
    before = len(pve.tasks)
    getattr(driver, operation)(ref, CancelToken(), Progress())
    assert len(pve.tasks) == before
    assert len(pve.calls_to("POST", path)) == (1 if operation == "start" else 0)


@pytest.mark.parametrize(
    "operation,running,path",
    [
        ("start", False, "status/start"),
        ("stop", True, "status/shutdown"),
        ("restart", True, "status/reboot"),
        ("delete", False, r"^nodes/pve1/lxc/100$"),
    ],
)
def test_locked_guest_is_retryable_then_succeeds(driver, pve, operation, running, path):
    ref = make_guest(driver, running=running)
    method = "DELETE" if operation == "delete" else "POST"
    pve.fail_next(1, 500, "CT 100 is locked (backup)", method, path)
    with pytest.raises(RetryableError):
        getattr(driver, operation)(ref, CancelToken(), Progress())
    getattr(driver, operation)(ref, CancelToken(), Progress())
    if operation == "delete":
        assert not pve.guests
    else:
        assert pve.guests[100].status == ("stopped" if operation == "stop" else "running")


@pytest.mark.parametrize("operation", ["start", "stop", "restart"])
def test_operations_on_a_missing_guest_are_not_found(driver, operation):
    ref = {"node": "pve1", "type": "lxc", "vmid": 555, "name": "vps-gone"}
    with pytest.raises(NotFoundError):
        getattr(driver, operation)(ref, CancelToken(), Progress())


def test_permission_denied_is_an_auth_error(driver, pve):
    ref = make_guest(driver, running=False)
    pve.fail_next(1, 403, "Permission check failed (/vms/100, VM.PowerMgmt)", "POST")
    with pytest.raises(AuthError):
        driver.start(ref, CancelToken(), Progress())


def test_failed_start_task_is_permanent(driver, pve):
    ref = make_guest(driver, running=False)
    pve.fail_tasks["vzstart"] = "startup for container '100' failed"
    with pytest.raises(PermanentError, match="startup for container"):
        driver.start(ref, CancelToken(), Progress())


@pytest.mark.parametrize(
    "operation,running,task",
    [
        ("start", False, "vzstart"),
        ("stop", True, "vzshutdown"),
        ("restart", True, "vzreboot"),
        ("delete", True, "vzstop"),
    ],
)
@pytest.mark.parametrize("reason", [CANCEL_USER, CANCEL_TIMEOUT])
def test_cancel_mid_operation_stops_the_remote_task(driver, pve, operation, running, task, reason):
    ref = make_guest(driver, running=running)
    pve.hang_tasks.add(task)
    token = cancel_after(0.2) if reason == CANCEL_USER else CancelToken(deadline=time.monotonic() + 0.2)
    started = time.monotonic()
    with pytest.raises(OperationCancelled) as err:
        getattr(driver, operation)(ref, token, Progress())
    assert err.value.reason == reason
    assert time.monotonic() - started < 2
    hung = [t for t in pve.tasks.values() if t.kind == task]
    assert hung and hung[-1].exitstatus == "received interrupt"


def test_delete_running_guest_stops_then_destroys_and_verifies(driver, pve):
    ref = make_guest(driver, kind="vm")
    driver.delete(ref, CancelToken(), Progress())
    assert not pve.guests
    assert pve.calls_to("DELETE", r"^nodes/pve1/qemu/100$") == [{"purge": "1", "destroy-unreferenced-disks": "1"}]


def test_delete_of_a_missing_or_never_created_guest_is_success(driver, pve):
    driver.delete({"node": "pve1", "type": "lxc", "vmid": 321, "name": "vps-x"}, CancelToken(), Progress())
    driver.delete({"name": "vps-never-created"}, CancelToken(), Progress())
    assert not pve.calls_to("DELETE", r".")


def test_delete_by_name_only_finds_the_guest(driver, pve):
    make_guest(driver, running=False)
    driver.delete({"name": "vps-0123456789ab"}, CancelToken(), Progress())
    assert not pve.guests


def test_delete_never_touches_a_guest_that_is_not_ours(driver, pve):
    other = make_guest(driver, running=False, name="someone-else")
    driver.delete({**other, "name": "vps-0123456789ab"}, CancelToken(), Progress())
    assert other["vmid"] in pve.guests


def test_delete_that_leaves_the_guest_is_a_failure(driver, pve):
    ref = make_guest(driver, running=False)
    pve.fail_tasks["vzdestroy"] = "WARNINGS: 1"  # says fine but ...
    pve.guests[100].config["protection"] = "1"
    original = pve._guest_route

    def keep(method, kind, vmid, rest, p):
        if method == "DELETE" and rest == "":
            return pve._new_task("vzdestroy", int(vmid))  # finishes without removing anything
        return original(method, kind, vmid, rest, p)

    pve._guest_route = keep
    with pytest.raises(PermanentError, match="still exists"):
        driver.delete(ref, CancelToken(), Progress())


# ------------------------------------------------------------------ state


def test_get_state_running_with_addresses(driver, pve):
    ref = make_guest(driver)
    state = driver.get_state(ref)
    assert (state.exists, state.status, state.addresses) == (True, "running", ["10.10.0.102"])
    vm = make_guest(driver, kind="vm", name="vps-vm")
    assert driver.get_state(vm).addresses == ["10.10.0.103"]  # link-local and lo left out


def test_get_state_stopped_missing_and_foreign(driver, pve):
    ref = make_guest(driver, running=False)
    assert driver.get_state(ref).status == "stopped"
    assert driver.get_state({**ref, "name": "vps-other"}).exists is False
    assert driver.get_state({"node": "pve1", "type": "qemu", "vmid": 999, "name": "x"}).exists is False
    assert driver.get_state({"name": "vps-0123456789ab"}).ref["vmid"] == 100


def test_get_state_of_a_guest_being_created(driver, pve):
    pve.hang_tasks.add("vzcreate")
    token = CancelToken()
    seen = []

    def peek(percent, message):  # progress while the create task runs on the node
        if not seen and 100 in pve.guests:
            seen.append(driver.get_state({"name": "vps-0123456789ab"}).status)
            token.cancel()

    with pytest.raises(OperationCancelled):
        driver.create(spec(), token, peek)
    assert seen == ["creating"]


# ------------------------------------------------------------------ password


def test_vm_password_through_cloud_init_and_agent(driver, pve):
    ref = make_guest(driver, kind="vm")
    driver.set_password(ref, "s3cret-Pass", CancelToken(), Progress())
    assert pve.calls_to("PUT", r"qemu/100/config")[-1] == {"cipassword": "s3cret-Pass"}
    assert pve.calls_to("PUT", r"qemu/100/cloudinit")
    assert pve.guests[100].agent_password == "s3cret-Pass"
    assert not pve.calls_to("POST", "status/reboot")


def test_passwords_stay_out_of_logs_even_at_debug(driver, pve, caplog):
    ref = make_guest(driver, kind="vm")
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="proxmoxer.core")
    driver.set_password(ref, "s3cret-Pass", CancelToken(), Progress())
    assert any("cipassword" in r.getMessage() for r in caplog.records)  # it was logged, redacted
    assert not any("s3cret" in r.getMessage() for r in caplog.records)


def test_vm_password_without_agent_reboots(driver, pve):
    ref = make_guest(driver, kind="vm")
    pve.agent_running = False
    driver.set_password(ref, "s3cret-Pass", CancelToken(), Progress())
    assert pve.calls_to("POST", "qemu/100/status/reboot")


@pytest.mark.parametrize("reason", [CANCEL_USER, CANCEL_TIMEOUT])
def test_vm_password_reboot_cancelled_stops_the_task(driver, pve, reason):
    ref = make_guest(driver, kind="vm")
    pve.agent_running = False
    pve.hang_tasks.add("qmreboot")
    token = cancel_after(0.2) if reason == CANCEL_USER else CancelToken(deadline=time.monotonic() + 0.2)
    with pytest.raises(OperationCancelled) as err:
        driver.set_password(ref, "pw", token, Progress())
    assert err.value.reason == reason
    assert [t.exitstatus for t in pve.tasks.values() if t.kind == "qmreboot"] == ["received interrupt"]


def test_stopped_vm_password_applies_at_next_start(driver, pve):
    ref = make_guest(driver, kind="vm", running=False)
    progress = Progress()
    driver.set_password(ref, "s3cret-Pass", CancelToken(), progress)
    assert "next start" in progress.calls[-1][1]
    assert pve.guests[100].config["cipassword"] == "s3cret-Pass"


def test_container_password_over_the_host_shell_on_stdin(driver, pve, shell):
    ref = make_guest(driver)
    driver.set_password(ref, "s3cret-Pass", CancelToken(), Progress())
    assert shell.passwords == {"100": "s3cret-Pass"}
    argv, stdin = shell.calls[-1]
    assert argv == ["pct", "exec", "100", "--", "chpasswd"] and stdin == "root:s3cret-Pass\n"
    assert all("s3cret" not in " ".join(a) for a, _ in shell.calls)
    assert all("s3cret" not in str(p) for _, _, p in pve.calls)


def test_container_password_errors(pve, ca, shell):
    no_shell = ProxmoxDriver(config(pve, ca))
    ref = make_guest(no_shell)
    with pytest.raises(UnsupportedError, match="connection.ssh"):
        no_shell.set_password(ref, "pw", CancelToken(), Progress())
    driver = ProxmoxDriver(config(pve, ca), shell=shell)
    shell.fail_next.append((1, "chpasswd: (user root) pam_chauthtok() failed"))
    with pytest.raises(PermanentError, match="chpasswd failed"):
        driver.set_password(ref, "pw", CancelToken(), Progress())
    shell.raise_next.append(RetryableError("ssh: cannot reach", op="ssh"))
    with pytest.raises(RetryableError):
        driver.set_password(ref, "pw", CancelToken(), Progress())
    driver.set_password(ref, "pw", CancelToken(), Progress())
    assert shell.passwords["100"] == "pw"
    driver.stop(ref, CancelToken(), Progress())
    with pytest.raises(ConflictError):
        driver.set_password(ref, "pw", CancelToken(), Progress())


# ------------------------------------------------------------------ ports


def test_add_port_creates_tagged_dnat_and_forward_rules_once(driver, shell):
    ref = make_guest(driver)
    port = PortSpec("tcp", 20022, 20022, 22, 22)
    driver.add_port(ref, port, CancelToken(), Progress())
    driver.add_port(ref, port, CancelToken(), Progress())
    assert shell.rule_lines("nat", "PREROUTING") == [
        "-p tcp -m tcp --dport 20022 -m comment --comment pm-tcp-20022 -j DNAT --to-destination 10.10.0.102:22"
    ]
    assert shell.rule_lines("filter", "FORWARD") == [
        "-d 10.10.0.102/32 -p tcp -m tcp --dport 22 -m comment --comment pm-tcp-20022 -j ACCEPT"
    ]


def test_add_port_range_shifted_and_udp(driver, shell):
    ref = make_guest(driver)
    driver.add_port(ref, PortSpec("udp", 30000, 30009, 40000, 40009), CancelToken(), Progress())
    assert shell.rule_lines("nat", "PREROUTING") == [
        "-p udp -m udp --dport 30000:30009 -m comment --comment pm-udp-30000-30009 "
        "-j DNAT --to-destination 10.10.0.102:40000-40009/30000"
    ]


def test_add_port_replaces_a_stale_rule_with_the_same_tag(driver, shell):
    ref = make_guest(driver)
    shell.rules["nat"]["PREROUTING"].append(
        "-p tcp -m tcp --dport 20022 -m comment --comment pm-tcp-20022 -j DNAT --to-destination 10.9.9.9:22".split()
    )
    driver.add_port(ref, PortSpec("tcp", 20022, 20022, 22, 22), CancelToken(), Progress())
    assert [line.split()[-1] for line in shell.rule_lines("nat", "PREROUTING")] == ["10.10.0.102:22"]


def test_remove_port_is_idempotent_and_leaves_other_rules(driver, shell):
    ref = make_guest(driver)
    driver.add_port(ref, PortSpec("tcp", 20022, 20022, 22, 22), CancelToken(), Progress())
    driver.add_port(ref, PortSpec("tcp", 20080, 20080, 80, 80), CancelToken(), Progress())
    driver.remove_port(ref, PortSpec("tcp", 20022, 20022, 22, 22), CancelToken(), Progress())
    driver.remove_port(ref, PortSpec("tcp", 20022, 20022, 22, 22), CancelToken(), Progress())
    assert [line.split()[9] for line in shell.rule_lines("nat", "PREROUTING")] == ["pm-tcp-20080"]


def test_port_errors(pve, ca, shell):
    no_shell = ProxmoxDriver(config(pve, ca))
    ref = make_guest(no_shell, running=False)
    with pytest.raises(UnsupportedError):
        no_shell.add_port(ref, PortSpec("tcp", 20022, 20022, 22, 22), CancelToken(), Progress())
    driver = ProxmoxDriver(config(pve, ca), shell=shell)
    with pytest.raises(RetryableError, match="no IPv4 address yet"):  # stopped, DHCP
        driver.add_port(ref, PortSpec("tcp", 20022, 20022, 22, 22), CancelToken(), Progress())
    driver.start(ref, CancelToken(), Progress())
    shell.fail_next.append((4, "iptables: Another app is currently holding the xtables lock."))
    with pytest.raises(RetryableError):
        driver.add_port(ref, PortSpec("tcp", 20022, 20022, 22, 22), CancelToken(), Progress())
    shell.fail_next.append((2, "iptables v1.8.9: unknown option"))
    with pytest.raises(PermanentError):
        driver.add_port(ref, PortSpec("tcp", 20022, 20022, 22, 22), CancelToken(), Progress())
    driver.add_port(ref, PortSpec("tcp", 20022, 20022, 22, 22), CancelToken(), Progress())
    token = CancelToken()
    token.cancel()
    with pytest.raises(OperationCancelled):
        driver.add_port(ref, PortSpec("tcp", 20023, 20023, 23, 23), token, Progress())


@pytest.mark.parametrize("reason", [CANCEL_USER, CANCEL_TIMEOUT])
def test_add_port_stops_between_host_commands_on_cancel(driver, shell, reason):
    ref = make_guest(driver)
    shell.delay = 0.4  # the first listing is still running when the token fires
    token = cancel_after(0.1) if reason == CANCEL_USER else CancelToken(deadline=time.monotonic() + 0.1)
    started = time.monotonic()
    with pytest.raises(OperationCancelled) as err:
        driver.add_port(ref, PortSpec("tcp", 20022, 20022, 22, 22), token, Progress())
    assert err.value.reason == reason and time.monotonic() - started < 2
    assert [argv[-1] for argv, _ in shell.calls] == ["PREROUTING"]  # no further command, no rule added
    assert shell.rules["nat"]["PREROUTING"] == []


def test_static_address_from_config_when_the_guest_cannot_report_one(pve, ca, shell):
    driver = ProxmoxDriver(config(pve, ca, lxc_ip="192.168.50.7/24,gw=192.168.50.1"), shell=shell)
    ref = make_guest(driver, running=False)
    driver.add_port(ref, PortSpec("tcp", 20022, 20022, 22, 22), CancelToken(), Progress())
    assert shell.rule_lines("nat", "PREROUTING")[0].endswith("192.168.50.7:22")


def test_delete_removes_the_guests_nat_rules(driver, shell):
    ref = make_guest(driver)
    driver.add_port(ref, PortSpec("tcp", 20022, 20022, 22, 22), CancelToken(), Progress())
    driver.delete(ref, CancelToken(), Progress())
    assert shell.rule_lines("nat", "PREROUTING") == [] and shell.rule_lines("filter", "FORWARD") == []


# ------------------------------------------------------------------ rebuild


def test_rebuild_keeps_vmid_and_mac_and_restarts(driver, pve):
    ref = make_guest(driver, kind="vm")
    pve.guests[100].config["net0"] = "virtio=BC:24:11:AA:BB:CC,bridge=vmbr0"
    new_ref = driver.rebuild(ref, spec("vm", image="debian/12"), CancelToken(), Progress())
    assert new_ref == ref
    assert pve.guests[100].config["net0"] == "virtio=BC:24:11:AA:BB:CC,bridge=vmbr0"
    assert pve.guests[100].status == "running"
    assert len(pve.calls_to("POST", r"^nodes/pve1/qemu$")) == 2


def test_rebuild_of_a_stopped_guest_leaves_it_stopped(driver, pve):
    ref = make_guest(driver, running=False)
    assert driver.rebuild(ref, spec(), CancelToken(), Progress()) == ref
    assert pve.guests[100].status == "stopped"


def test_rebuild_resumes_after_the_old_guest_was_destroyed(driver, pve):
    ref = make_guest(driver)
    del pve.guests[100]  # an earlier attempt destroyed it, then the worker died
    assert driver.rebuild(ref, spec(), CancelToken(), Progress())["vmid"] == 100
    assert pve.guests[100].status == "running"


def test_rebuild_cancelled_while_recreating(driver, pve):
    ref = make_guest(driver)
    pve.hang_tasks.add("vzcreate")
    with pytest.raises(OperationCancelled):
        driver.rebuild(ref, spec(), cancel_after(0.3), Progress())
    assert any(t.kind == "vzcreate" and t.exitstatus == "received interrupt" for t in pve.tasks.values())


def test_rebuild_with_an_unmapped_image_destroys_nothing(driver, pve):
    ref = make_guest(driver)
    with pytest.raises(PermanentError, match="no lxc template"):
        driver.rebuild(ref, spec(image="arch/latest"), CancelToken(), Progress())
    assert pve.guests[100].status == "running" and not pve.calls_to("DELETE", r".")


def test_rebuild_deadline_while_destroying(driver, pve):
    ref = make_guest(driver)
    pve.hang_tasks.add("vzstop")
    with pytest.raises(OperationCancelled) as err:
        driver.rebuild(ref, spec(), CancelToken(deadline=time.monotonic() + 0.2), Progress())
    assert err.value.reason == CANCEL_TIMEOUT
    pve.hang_tasks.clear()
    assert driver.rebuild(ref, spec(), CancelToken(), Progress()) == ref


def test_rebuild_lock_is_retryable(driver, pve):
    ref = make_guest(driver, running=False)
    pve.fail_next(1, 500, "CT 100 is locked (snapshot)", "DELETE")
    with pytest.raises(RetryableError):
        driver.rebuild(ref, spec(), CancelToken(), Progress())
    assert driver.rebuild(ref, spec(), CancelToken(), Progress()) == ref


def test_unknown_path_is_unsupported(driver):
    make_guest(driver, running=False)
    with pytest.raises(UnsupportedError):
        driver._request("post", "nodes/pve1/lxc/100/exec", "probe", mutation=True)
