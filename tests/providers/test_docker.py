"""DockerDriver against an in-process Docker Engine API on a unix socket (and TCP+TLS),
docker-py in the loop.

Each operation: success, already in the wanted state, retryable error then
success, permanent error, cancel mid-operation, deadline mid-operation.
"""

from __future__ import annotations

import os
import shutil
import ssl
import tempfile
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
    HostPortBusy,
    NotFoundError,
    OperationCancelled,
    PermanentError,
    PortSpec,
    ProviderConfig,
    ProviderError,
    RetryableError,
    UnsupportedError,
    build_driver,
)
from providers.docker import DockerDriver, ports_from_bindings
from tests.providers.fakes_docker import FakeDocker
from tests.providers.fakes_pve import ServerThread

NAME = "vps-0123456789ab"
SSH = PortSpec("tcp", 20022, 20022, 22, 22)


@pytest.fixture
def fake():
    fake = FakeDocker()
    folder = tempfile.mkdtemp(prefix="dk", dir="/tmp")  # unix socket paths must stay short
    path = os.path.join(folder, "docker.sock")
    server = ServerThread(fake, f"unix://{path}")
    fake.base_url = f"unix://{path}"
    yield fake
    fake.release()
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


def config(fake, **connection) -> ProviderConfig:
    conn = {"base_url": fake.base_url, "poll_interval": 0.02, "timeout": 10, "images": {"debian/12": "debian:12"}}
    conn.update(connection)
    return ProviderConfig(2, "docker-test", "docker", conn, {})


@pytest.fixture
def driver(fake):
    return DockerDriver(config(fake))


def spec(**kw) -> GuestSpec:
    fields = dict(name=NAME, instance_type="container", image="debian/12", cpu=2, memory_mb=1024, disk_mb=8192)
    fields.update(kw)
    return GuestSpec(**fields)


class Progress:
    def __init__(self):
        self.calls: list[tuple[int, str]] = []

    def __call__(self, percent: int, message: str) -> None:
        self.calls.append((percent, message))


def token(reason: str | None = None, after: float = 0.2) -> CancelToken:
    if reason == CANCEL_TIMEOUT:
        return CancelToken(deadline=time.monotonic() + after)
    t = CancelToken()
    if reason == CANCEL_USER:
        threading.Timer(after, t.cancel, args=(CANCEL_USER,)).start()
    return t


def wait_for(condition, seconds: float = 5.0) -> None:
    """Until the fake's background work (a released call) has happened."""
    limit = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < limit, "the fake never got there"
        time.sleep(0.01)


def make(driver, running=True) -> dict:
    ref = driver.create(spec(), CancelToken(), Progress())
    if running:
        driver.start(ref, CancelToken(), Progress())
    return ref


# ------------------------------------------------------------------ connection


def test_server_info_uses_the_configured_api_version(driver, fake):
    info = driver.server_info()
    assert info.version == "27.3.1" and info.details["client_api_version"] == "1.44"
    assert fake.versions_seen == {"1.44"}
    assert driver.capabilities().instance_types == ("container",)
    assert driver.capabilities().live_port_mapping is False


def test_build_driver_picks_docker_and_makes_no_call(fake):
    assert isinstance(build_driver(config(fake)), DockerDriver)
    assert fake.calls == []  # no "auto" version probe in the constructor


def test_unreachable_daemon_is_retryable(fake):
    driver = DockerDriver(config(fake, base_url="unix:///tmp/no-such-dir/docker.sock"))
    with pytest.raises(RetryableError, match="cannot connect"):
        driver.server_info()


# ------------------------------------------------------------------ create


def test_create_pulls_with_progress_and_sets_limits(driver, fake):
    progress = Progress()
    ref = driver.create(spec(labels={"owner": "7"}), CancelToken(), progress)
    container = fake.by_name(NAME)
    assert ref == {"id": container.id, "name": NAME}
    assert container.status == "created"
    host = container.host_config
    assert (host["NanoCpus"], host["Memory"], host["MemorySwap"]) == (2 * 10**9, 1024 * 2**20, 1024 * 2**20)
    assert host["Mounts"] == [{"Type": "volume", "Source": f"{NAME}-data", "Target": "/data"}]
    assert container.config["Labels"]["cloudhost.name"] == NAME
    assert container.config["Labels"]["cloudhost.label.owner"] == "7"
    assert f"{NAME}-data" in fake.volumes
    percents = [p for p, m in progress.calls if m.startswith("pulling debian:12:")]
    assert percents == sorted(percents) and len(percents) >= 3
    assert "pulling debian:12: 100%" in [m for _, m in progress.calls]


def test_create_is_idempotent_and_skips_a_present_image(driver, fake):
    first = driver.create(spec(), CancelToken(), Progress())
    second = driver.create(spec(), CancelToken(), Progress())
    assert first == second
    assert len(fake.calls_to("POST", r"^/containers/create$")) == 1
    assert len(fake.calls_to("POST", r"^/images/create$")) == 1


def test_create_refuses_vms_and_foreign_containers(driver, fake):
    with pytest.raises(UnsupportedError):
        driver.create(spec(instance_type="vm"), CancelToken(), Progress())
    fake.pulled("debian:12")
    fake._create(NAME, {"Image": "debian:12", "Labels": {}})
    with pytest.raises(ConflictError, match="not ours"):
        driver.create(spec(), CancelToken(), Progress())


def test_unknown_image_is_permanent(driver):
    with pytest.raises(PermanentError, match="not found") as err:
        driver.create(spec(image="nosuch/image:1"), CancelToken(), Progress())
    assert not err.value.retryable


def test_pull_errors_in_the_stream(driver, fake):
    fake.pull_errors["debian:12"] = "toomanyrequests: You have reached your pull rate limit."
    with pytest.raises(RetryableError, match="rate limit"):
        driver.create(spec(), CancelToken(), Progress())
    fake.pull_errors["debian:12"] = "manifest for debian:12 not found: manifest unknown"
    with pytest.raises(PermanentError, match="not found"):
        driver.create(spec(), CancelToken(), Progress())
    del fake.pull_errors["debian:12"]
    assert driver.create(spec(), CancelToken(), Progress())["name"] == NAME


def test_create_5xx_is_ambiguous_and_the_retry_converges(driver, fake):
    fake.pulled("debian:12")
    fake.fail_next(1, 500, "failed to create shim task", "POST", r"^/containers/create$")
    with pytest.raises(AmbiguousOutcome):
        driver.create(spec(), CancelToken(), Progress())
    ref = driver.create(spec(), CancelToken(), Progress())
    assert len([c for c in fake.containers.values() if c.name == NAME]) == 1 and ref["id"]


def test_create_retryable_read_error_then_success(driver, fake):
    fake.fail_next(1, 503, "daemon is busy", "GET", r"^/containers/.*/json$")
    with pytest.raises(RetryableError):
        driver.create(spec(), CancelToken(), Progress())
    assert driver.create(spec(), CancelToken(), Progress())["name"] == NAME


@pytest.mark.parametrize("reason", [CANCEL_USER, CANCEL_TIMEOUT])
def test_create_cancelled_mid_pull_closes_the_stream_promptly(driver, fake, reason):
    fake.pull_hang.add("debian:12")
    started = time.monotonic()
    with pytest.raises(OperationCancelled) as err:
        driver.create(spec(), token(reason), Progress())
    assert err.value.reason == reason
    assert time.monotonic() - started < 2
    assert fake.by_name(NAME) is None


# ------------------------------------------------------------------ start / stop / restart


def test_start_stop_restart(driver, fake):
    ref = make(driver, running=False)
    driver.start(ref, CancelToken(), Progress())
    assert fake.by_name(NAME).status == "running"
    driver.restart(ref, CancelToken(), Progress())
    assert fake.calls_to("POST", r"/restart$")
    driver.stop(ref, CancelToken(), Progress(), graceful_timeout=7)
    assert fake.by_name(NAME).status == "exited"
    assert fake.calls_to("POST", r"/stop$")[0][0] == {"t": "7"}


def test_already_in_state_sends_nothing(driver, fake):
    ref = make(driver)
    before = len(fake.calls_to("POST", r"/start$"))
    driver.start(ref, CancelToken(), Progress())
    assert len(fake.calls_to("POST", r"/start$")) == before
    driver.stop(ref, CancelToken(), Progress())
    driver.stop(ref, CancelToken(), Progress())
    assert len(fake.calls_to("POST", r"/stop$")) == 1


def test_restart_of_a_stopped_container_starts_it(driver, fake):
    ref = make(driver, running=False)
    driver.restart(ref, CancelToken(), Progress())
    assert fake.by_name(NAME).status == "running" and not fake.calls_to("POST", r"/restart$")


def test_stop_kills_what_outlives_the_grace_period(driver, fake):
    ref = make(driver)
    fake.ignore_stop = True
    driver.stop(ref, CancelToken(), Progress(), graceful_timeout=1)
    assert fake.by_name(NAME).status == "exited" and fake.calls_to("POST", r"/kill$")


@pytest.mark.parametrize("operation", ["start", "stop", "restart"])
def test_missing_container_is_not_found(driver, operation):
    with pytest.raises(NotFoundError):
        getattr(driver, operation)({"name": "vps-gone"}, CancelToken(), Progress())


def test_start_errors(driver, fake):
    ref = make(driver, running=False)
    fake.fail_next(1, 503, "Service Unavailable", "POST", r"/start$")
    with pytest.raises(AmbiguousOutcome) as err:
        driver.start(ref, CancelToken(), Progress())
    assert err.value.retryable
    fake.busy_host_ports.add("tcp/20022")
    driver.add_port(ref, SSH, CancelToken(), Progress())  # never started: no conflict until it starts
    with pytest.raises(HostPortBusy, match="port is already allocated"):
        driver.start(ref, CancelToken(), Progress())
    fake.busy_host_ports.clear()
    driver.start(ref, CancelToken(), Progress())
    other = driver.create(spec(name="vps-other"), CancelToken(), Progress())
    fake.by_name("vps-other").exit_at_once = True
    with pytest.raises(PermanentError, match="exited at once"):
        driver.start(other, CancelToken(), Progress())


@pytest.mark.parametrize(
    "operation,running,action",
    [("start", False, "start"), ("stop", True, "stop"), ("restart", True, "restart"), ("delete", True, "remove")],
)
@pytest.mark.parametrize("reason", [CANCEL_USER, CANCEL_TIMEOUT])
def test_blocking_calls_return_promptly_on_cancel(driver, fake, operation, running, action, reason):
    ref = make(driver, running=running)
    fake.hang_actions.add(action)  # the daemon sits on the call (and cannot abort it)
    started = time.monotonic()
    with pytest.raises(OperationCancelled) as err:
        getattr(driver, operation)(ref, token(reason), Progress())
    assert err.value.reason == reason
    assert time.monotonic() - started < 2


@pytest.mark.parametrize(
    "operation,running,method,path,final",
    [
        ("start", False, "POST", r"/start$", "running"),
        # A failed stop call is followed by a kill, so the read before it is what fails here.
        ("stop", True, "GET", r"/json$", "exited"),
        ("restart", True, "POST", r"/restart$", "running"),
    ],
)
def test_daemon_hiccup_is_retryable_then_succeeds(driver, fake, operation, running, method, path, final):
    ref = make(driver, running=running)
    fake.fail_next(1, 503, "Service Unavailable", method, path)
    with pytest.raises(ProviderError) as err:
        getattr(driver, operation)(ref, CancelToken(), Progress())
    assert err.value.retryable
    getattr(driver, operation)(ref, CancelToken(), Progress())
    assert fake.by_name(NAME).status == final


def test_failed_stop_call_ends_in_a_kill(driver, fake):
    ref = make(driver)
    fake.fail_next(1, 503, "Service Unavailable", "POST", r"/stop$")
    driver.stop(ref, CancelToken(), Progress())
    assert fake.by_name(NAME).status == "exited" and fake.calls_to("POST", r"/kill$")


def test_stop_timeout_is_bounded_by_the_deadline(driver, fake):
    ref = make(driver)
    driver.stop(ref, CancelToken(deadline=time.monotonic() + 5), Progress(), graceful_timeout=600)
    assert int(fake.calls_to("POST", r"/stop$")[0][0]["t"]) <= 4


def test_start_cancelled_before_it_is_sent(driver, fake):
    ref = make(driver, running=False)
    t = CancelToken()
    t.cancel()
    with pytest.raises(OperationCancelled):
        driver.start(ref, t, Progress())
    assert not fake.calls_to("POST", r"/start$")


# ------------------------------------------------------------------ delete


def test_delete_removes_container_volume_and_saved_state(driver, fake):
    ref = make(driver)
    driver.add_port(ref, SSH, CancelToken(), Progress())  # leaves a committed state image
    driver.delete(ref, CancelToken(), Progress())
    assert fake.by_name(NAME) is None and not fake.volumes
    assert not any(t.startswith("cloudhost-state/") for i in fake.images.values() for t in i.tags)
    driver.delete(ref, CancelToken(), Progress())  # already gone


def test_delete_removal_in_progress_is_retryable(driver, fake):
    ref = make(driver)
    fake.fail_next(1, 409, f"removal of container {NAME} is already in progress", "DELETE", r"^/containers/")
    with pytest.raises(RetryableError):
        driver.delete(ref, CancelToken(), Progress())
    driver.delete(ref, CancelToken(), Progress())
    assert fake.by_name(NAME) is None


def test_delete_leaves_a_foreign_container_alone(driver, fake):
    fake.pulled("debian:12")
    fake._create(NAME, {"Image": "debian:12", "Labels": {}})
    driver.delete({"name": NAME}, CancelToken(), Progress())
    assert fake.by_name(NAME) is not None


def test_delete_permission_denied(driver, fake):
    ref = make(driver)
    fake.fail_next(1, 403, "authorization denied by plugin", "DELETE")
    with pytest.raises(AuthError):
        driver.delete(ref, CancelToken(), Progress())


# ------------------------------------------------------------------ password


def test_password_goes_through_exec_stdin_only(driver, fake):
    ref = make(driver)
    driver.set_password(ref, "s3cret-Pass", CancelToken(), Progress())
    assert fake.by_name(NAME).fs["password:root"] == "s3cret-Pass"
    (ex,) = fake.execs.values()
    assert ex.stdin == b"root:s3cret-Pass\n"
    assert "s3cret" not in repr(fake.calls)  # not in Cmd, Env or any query


def test_password_errors(driver, fake):
    ref = make(driver, running=False)
    with pytest.raises(ConflictError):
        driver.set_password(ref, "pw", CancelToken(), Progress())
    driver.start(ref, CancelToken(), Progress())
    fake.by_name(NAME).fs["chpasswd_fails"] = True
    with pytest.raises(PermanentError, match="Authentication token manipulation"):
        driver.set_password(ref, "pw", CancelToken(), Progress())
    fake.by_name(NAME).fs.pop("chpasswd_fails")
    fake.fail_next(1, 503, "busy", "POST", r"/exec$")
    with pytest.raises(AmbiguousOutcome):
        driver.set_password(ref, "pw", CancelToken(), Progress())
    driver.set_password(ref, "pw", CancelToken(), Progress())
    with pytest.raises(PermanentError):
        driver.set_password(ref, "two\nlines", CancelToken(), Progress())
    t = CancelToken()
    t.cancel()
    with pytest.raises(OperationCancelled):
        driver.set_password(ref, "pw", t, Progress())


@pytest.mark.parametrize("reason", [CANCEL_USER, CANCEL_TIMEOUT])
def test_password_exec_that_hangs_is_abandoned_on_cancel(driver, fake, reason):
    ref = make(driver)
    fake.exec_hang = True
    started = time.monotonic()
    with pytest.raises(OperationCancelled) as err:
        driver.set_password(ref, "pw", token(reason), Progress())
    assert err.value.reason == reason and time.monotonic() - started < 2


# ------------------------------------------------------------------ ports


def test_add_port_recreates_keeping_data_password_and_state(driver, fake):
    ref = make(driver)
    driver.set_password(ref, "s3cret-Pass", CancelToken(), Progress())
    fake.volumes[f"{NAME}-data"]["data"]["notes.txt"] = "kept"
    old_id = fake.by_name(NAME).id
    driver.add_port(ref, SSH, CancelToken(), Progress())
    new = fake.by_name(NAME)
    assert new.id != old_id and old_id not in fake.containers
    assert new.status == "running"
    assert new.host_config["PortBindings"] == {"22/tcp": [{"HostIp": "", "HostPort": "20022"}]}
    assert new.fs["password:root"] == "s3cret-Pass"  # the writable layer was committed
    assert fake.volumes[f"{NAME}-data"]["data"] == {"notes.txt": "kept"}
    assert new.host_config["NanoCpus"] == 2 * 10**9 and new.config["Labels"]["cloudhost.name"] == NAME
    driver.add_port(ref, SSH, CancelToken(), Progress())
    assert fake.by_name(NAME).id == new.id  # already so: nothing recreated


def test_ports_ranges_udp_and_removal(driver, fake):
    ref = make(driver)
    driver.add_port(ref, SSH, CancelToken(), Progress())
    driver.add_port(ref, PortSpec("udp", 30000, 30002, 40000, 40002), CancelToken(), Progress())
    state = driver.get_state(ref)
    assert state.ports == [SSH, PortSpec("udp", 30000, 30002, 40000, 40002)]
    driver.remove_port(ref, SSH, CancelToken(), Progress())
    driver.remove_port(ref, SSH, CancelToken(), Progress())
    assert [p.handle for p in driver.get_state(ref).ports] == ["pm-udp-30000-30002"]


def test_never_started_container_is_recreated_without_commit(driver, fake):
    ref = make(driver, running=False)
    driver.add_port(ref, SSH, CancelToken(), Progress())
    assert not fake.calls_to("POST", r"^/commit$") and fake.by_name(NAME).status == "created"


def test_volume_mode_keeps_only_the_volume(fake):
    driver = DockerDriver(config(fake, port_change="volume"))
    ref = make(driver)
    driver.set_password(ref, "pw", CancelToken(), Progress())
    driver.add_port(ref, SSH, CancelToken(), Progress())
    assert not fake.calls_to("POST", r"^/commit$") and "password:root" not in fake.by_name(NAME).fs


def test_port_conflict_restores_the_old_container(driver, fake):
    ref = make(driver)
    old_id = fake.by_name(NAME).id
    fake.busy_host_ports.add("tcp/20022")
    with pytest.raises(HostPortBusy, match="already allocated") as err:
        driver.add_port(ref, SSH, CancelToken(), Progress())
    assert SSH.host_port_start in err.value.ports  # the port, for the task layer to record
    restored = fake.by_name(NAME)
    assert restored.id == old_id and restored.status == "running"
    assert not restored.host_config.get("PortBindings")
    assert [c.name for c in fake.containers.values()] == [NAME]


@pytest.mark.parametrize("reason", [CANCEL_USER, CANCEL_TIMEOUT])
def test_cancel_while_a_port_change_stops_the_container_brings_it_back_running(driver, fake, reason):
    """Bug 3: the stop ran before the try that restores the old container, so a cancel
    there left a running guest stopped (the row said running)."""
    ref = make(driver)
    old_id = fake.by_name(NAME).id
    fake.hang_actions.add("stop")
    threading.Timer(0.6, fake.release).start()  # the daemon ends the stop a moment later
    started = time.monotonic()
    with pytest.raises(OperationCancelled):
        driver.add_port(ref, SSH, token(reason), Progress())
    # The restore waits for the abandoned stop (bounded by swap_stop_timeout), then starts it.
    assert time.monotonic() - started < 5
    restored = fake.by_name(NAME)
    assert (restored.id, restored.status) == (old_id, "running")
    assert not restored.host_config.get("PortBindings")
    assert [c.name for c in fake.containers.values()] == [NAME]
    fake.hang_actions.clear()
    driver.add_port(ref, SSH, CancelToken(), Progress())
    assert fake.by_name(NAME).host_config["PortBindings"] and fake.by_name(NAME).status == "running"
    assert [c.name for c in fake.containers.values()] == [NAME]


def test_a_crash_mid_swap_is_repaired_by_the_next_operation(driver, fake):
    ref = make(driver)
    c = fake.by_name(NAME)
    c.name, c.status = f"{NAME}-swap-running", "exited"  # renamed aside, then the worker died
    assert driver.get_state(ref).exists  # still ours while aside
    driver.start(ref, CancelToken(), Progress())
    assert fake.by_name(NAME).id == c.id and c.status == "running"


def test_port_change_hiccup_is_retryable_and_restores_the_old_container(driver, fake):
    ref = make(driver)
    old_id = fake.by_name(NAME).id
    fake.fail_next(1, 503, "Service Unavailable", "POST", r"^/containers/create$")
    with pytest.raises(ProviderError) as err:
        driver.add_port(ref, SSH, CancelToken(), Progress())
    assert err.value.retryable
    assert fake.by_name(NAME).id == old_id and fake.by_name(NAME).status == "running"
    driver.add_port(ref, SSH, CancelToken(), Progress())
    assert fake.by_name(NAME).host_config["PortBindings"] and len(fake.containers) == 1


def test_port_change_on_a_missing_container(driver):
    with pytest.raises(NotFoundError):
        driver.add_port({"name": "vps-gone"}, SSH, CancelToken(), Progress())


def test_ports_from_bindings_merges_ranges():
    bindings = {
        "22/tcp": [{"HostIp": "0.0.0.0", "HostPort": "20022"}],
        "5000/udp": [{"HostIp": "", "HostPort": "30000"}],
        "5001/udp": [{"HostIp": "", "HostPort": "30001"}],
        "5003/udp": [{"HostIp": "", "HostPort": "30003"}],
    }
    assert [p.handle for p in ports_from_bindings(bindings)] == ["pm-tcp-20022", "pm-udp-30000-30001", "pm-udp-30003"]


# ------------------------------------------------------------------ rebuild, state


def test_rebuild_with_a_new_image_keeps_ports_and_gets_a_fresh_volume(driver, fake):
    ref = make(driver)
    driver.add_port(ref, SSH, CancelToken(), Progress())
    driver.set_password(ref, "old", CancelToken(), Progress())
    new_ref = driver.rebuild(ref, spec(image="ubuntu:24.04"), CancelToken(), Progress())
    c = fake.by_name(NAME)
    assert new_ref == {"id": c.id, "name": NAME}
    assert c.image == "ubuntu:24.04" and c.status == "running" and "password:root" not in c.fs
    assert c.host_config["PortBindings"] == {"22/tcp": [{"HostIp": "", "HostPort": "20022"}]}
    assert list(fake.volumes) == [f"{NAME}-data-1"]
    assert not any(t.startswith("cloudhost-state/") for i in fake.images.values() for t in i.tags)


def test_rebuild_cancelled_during_the_pull_keeps_the_old_container(driver, fake):
    ref = make(driver)
    fake.pull_hang.add("ubuntu:24.04")
    with pytest.raises(OperationCancelled):
        driver.rebuild(ref, spec(image="ubuntu:24.04"), token(CANCEL_USER), Progress())
    assert fake.by_name(NAME).image == "debian:12" and fake.by_name(NAME).status == "running"


def test_rebuild_with_an_unknown_image_changes_nothing(driver, fake):
    ref = make(driver)
    old_id = fake.by_name(NAME).id
    with pytest.raises(PermanentError, match="not found"):
        driver.rebuild(ref, spec(image="nosuch/image:1"), CancelToken(), Progress())
    assert fake.by_name(NAME).id == old_id and fake.by_name(NAME).status == "running"


def test_rebuild_deadline_while_stopping_keeps_the_old_container_running(driver, fake):
    ref = make(driver)
    old_id = fake.by_name(NAME).id
    fake.hang_actions.add("stop")
    threading.Timer(0.6, fake.release).start()
    with pytest.raises(OperationCancelled) as err:
        driver.rebuild(ref, spec(), token(CANCEL_TIMEOUT, 0.3), Progress())
    assert err.value.reason == CANCEL_TIMEOUT
    assert (fake.by_name(NAME).id, fake.by_name(NAME).status) == (old_id, "running")
    fake.hang_actions.clear()
    driver.rebuild(ref, spec(), CancelToken(), Progress())
    assert [c.name for c in fake.containers.values()] == [NAME]


def test_rebuild_retryable_then_success(driver, fake):
    ref = make(driver)
    fake.fail_next(1, 502, "Bad Gateway", "POST", r"/rename$")
    with pytest.raises(AmbiguousOutcome):
        driver.rebuild(ref, spec(), CancelToken(), Progress())
    assert fake.by_name(NAME).status == "running"  # not left down by the failed attempt
    driver.rebuild(ref, spec(), CancelToken(), Progress())
    assert [c.name for c in fake.containers.values()] == [NAME]


def test_get_state(driver, fake):
    ref = make(driver)
    state = driver.get_state(ref)
    assert (state.exists, state.status, state.addresses) == (True, "running", [fake.by_name(NAME).ip])
    driver.stop(ref, CancelToken(), Progress())
    assert (driver.get_state(ref).status, driver.get_state(ref).addresses) == ("stopped", [])
    assert driver.get_state({"name": "vps-none"}).exists is False


# ------------------------------------------------------------------ TCP + TLS


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def tls_fake(ca):
    fake = FakeDocker()
    server_cert = ca.issue_cert("127.0.0.1")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_cert.configure_cert(ctx)
    ca.configure_trust(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS, as dockerd --tlsverify
    server = ServerThread(fake, "127.0.0.1", 0, ssl_context=ctx)
    fake.base_url = f"tcp://127.0.0.1:{server.port}"
    yield fake
    fake.release()
    server.stop()


def tls_config(fake, ca, client=True, ca_pem=None) -> ProviderConfig:
    secrets = {}
    if client:
        cert = ca.issue_cert("panel-client")
        secrets = {
            "tls_client_cert": cert.cert_chain_pems[0].bytes().decode(),
            "tls_client_key": cert.private_key_pem.bytes().decode(),
        }
    conn = {
        "base_url": fake.base_url,
        "tls": {"ca_cert": ca_pem or ca.cert_pem.bytes().decode(), "verify": True},
        "images": {"debian/12": "debian:12"},
        "poll_interval": 0.02,
    }
    return ProviderConfig(3, "docker-tls", "docker", conn, secrets)


def test_tcp_tls_with_client_certificate(tls_fake, ca, monkeypatch, tmp_path):
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bogus))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    driver = DockerDriver(tls_config(tls_fake, ca))
    assert driver.server_info().version == "27.3.1"
    ref = make(driver)
    driver.set_password(ref, "over-tls", CancelToken(), Progress())  # the hijacked exec over TLS
    assert tls_fake.by_name(NAME).fs["password:root"] == "over-tls"


def test_tls_without_client_certificate_or_with_another_ca_fails(tls_fake, ca):
    with pytest.raises(AuthError, match="TLS"):  # a TLS 1.3 alert, or EOF from the refusing server
        DockerDriver(tls_config(tls_fake, ca, client=False)).server_info()
    with pytest.raises(AuthError, match="TLS"):
        DockerDriver(tls_config(tls_fake, ca, ca_pem=trustme.CA().cert_pem.bytes().decode())).server_info()


# ------------------------------------------------------------------ bugs found on real daemons


def test_create_publishes_its_ports_at_creation_without_a_swap(driver, fake):
    """Bug 6: ports published at creation; the add_port calls of the create task find them in place."""
    ports = [SSH, PortSpec("tcp", 20023, 20024, 20023, 20024), PortSpec("udp", 20023, 20024, 20023, 20024)]
    ref = driver.create(spec(ports=ports), CancelToken(), Progress())
    driver.start(ref, CancelToken(), Progress())
    c = fake.by_name(NAME)
    assert c.host_config["PortBindings"] == {
        "22/tcp": [{"HostIp": "", "HostPort": "20022"}],
        "20023/tcp": [{"HostIp": "", "HostPort": "20023"}],
        "20024/tcp": [{"HostIp": "", "HostPort": "20024"}],
        "20023/udp": [{"HostIp": "", "HostPort": "20023"}],
        "20024/udp": [{"HostIp": "", "HostPort": "20024"}],
    }
    assert set(c.config["ExposedPorts"]) == set(c.host_config["PortBindings"])
    assert c.host_config["Init"] is True  # a stop takes a second, not the timeout
    for port in ports:
        driver.add_port(ref, port, CancelToken(), Progress())
    assert fake.by_name(NAME).id == c.id  # nothing recreated
    assert not fake.calls_to("POST", r"/commit$") and not fake.calls_to("POST", r"/rename$")
    assert not fake.calls_to("POST", r"/stop$")
    assert driver.get_state(ref).ports == [
        PortSpec("tcp", 20022, 20022, 22, 22),
        PortSpec("tcp", 20023, 20024, 20023, 20024),
        PortSpec("udp", 20023, 20024, 20023, 20024),
    ]


def test_an_old_binding_on_0000_counts_as_every_address(driver, fake):
    """Bug 2: "" is every address on both daemons ("0.0.0.0" is a dead /32 DNAT on Podman);
    a container published earlier with "0.0.0.0" is not recreated for the same port."""
    ref = driver.create(spec(), CancelToken(), Progress())
    c = fake.by_name(NAME)
    c.host_config["PortBindings"] = {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": "20022"}]}
    driver.add_port(ref, SSH, CancelToken(), Progress())
    assert fake.by_name(NAME).id == c.id and not fake.calls_to("POST", r"/rename$")


def test_podman_volume_survives_a_port_change_and_nothing_leaks(driver, fake):
    """Bug 1: Podman reports volumes only in the top-level Mounts and HostConfig.Binds."""
    fake.podman = True
    ref = make(driver)
    fake.volumes[f"{NAME}-data"]["data"]["notes.txt"] = "kept"
    inspected = driver.api.inspect_container(NAME)
    assert not inspected["HostConfig"].get("Mounts") and inspected["HostConfig"]["Binds"]
    driver.add_port(ref, SSH, CancelToken(), Progress())
    new = fake.by_name(NAME)
    assert new.host_config["Mounts"] == [
        {"Type": "volume", "Source": f"{NAME}-data", "Target": "/data", "ReadOnly": False}
    ]
    assert fake.volumes[f"{NAME}-data"]["data"] == {"notes.txt": "kept"}
    driver.rebuild(ref, spec(), CancelToken(), Progress())
    assert set(fake.volumes) == {f"{NAME}-data-1"}  # the old volume removed, the fresh one mounted
    driver.delete(ref, CancelToken(), Progress())
    assert fake.volumes == {} and fake.containers == {}


def test_a_stop_under_way_settles_and_paused_reads_running(driver, fake):
    """Bug 4: Podman's "stopping" and "paused" read as error before."""
    ref = make(driver)
    c = fake.by_name(NAME)
    c.status = "stopping"
    threading.Timer(0.3, lambda: setattr(c, "status", "exited")).start()
    assert driver.get_state(ref).status == "stopped"  # waited for the stop to end
    c.status = "paused"
    assert driver.get_state(ref).status == "running"


def test_a_stop_that_does_not_settle_reads_running(fake):
    driver = DockerDriver(config(fake, settle_seconds=0.2))
    ref = make(driver)
    fake.by_name(NAME).status = "stopping"
    assert driver.get_state(ref).status == "running"


def test_api_version_is_negotiated_down_to_what_the_daemon_speaks(fake):
    """Bug 5: Debian's Docker 20.10 and Podman 4.3 refuse anything newer than 1.41."""
    fake.api_version = "1.41"
    driver = DockerDriver(config(fake, api_version=None))
    assert driver.server_info().details["client_api_version"] == "1.41"
    make(driver)
    assert fake.versions_seen == {"1.41"}
    pinned = DockerDriver(config(fake, api_version="1.44"))  # an explicit version is used as is
    with pytest.raises(PermanentError, match="too new"):
        pinned.server_info()


def test_port_changes_keep_one_state_image_and_a_failed_one_none_extra(driver, fake):
    ref = make(driver)
    base = set(fake.images)
    driver.add_port(ref, SSH, CancelToken(), Progress())
    driver.add_port(ref, PortSpec("tcp", 20023, 20023, 80, 80), CancelToken(), Progress())
    state = [i for i in fake.images.values() if i.id not in base]
    assert [i.tags for i in state] == [[f"cloudhost-state/{NAME}:current"]]  # the previous commit removed
    fake.busy_host_ports.add("tcp/20024")
    with pytest.raises(ConflictError):
        driver.add_port(ref, PortSpec("tcp", 20024, 20024, 81, 81), CancelToken(), Progress())
    assert [i.id for i in fake.images.values() if i.id not in base] == [state[0].id]  # this attempt's commit gone
    assert state[0].tags == [f"cloudhost-state/{NAME}:current"]
    driver.delete(ref, CancelToken(), Progress())
    assert set(fake.images) == base


def test_a_shell_command_stops_on_a_hang_up(fake):
    """An interactive shell ignores SIGTERM, init or not: a stop would wait the timeout."""
    driver = DockerDriver(config(fake))
    driver.create(spec(), CancelToken(), Progress())  # debian:12's command is bash
    assert fake.by_name(NAME).config["StopSignal"] == "SIGHUP"
    other = DockerDriver(config(fake, command=["/sbin/init"]))
    other.create(spec(name="vps-other"), CancelToken(), Progress())
    assert "StopSignal" not in fake.by_name("vps-other").config  # the image's own
    explicit = DockerDriver(config(fake, stop_signal="SIGRTMIN+3"))
    explicit.create(spec(name="vps-explicit"), CancelToken(), Progress())
    assert fake.by_name("vps-explicit").config["StopSignal"] == "SIGRTMIN+3"
    driver.add_port(driver.get_state({"name": NAME}).ref, SSH, CancelToken(), Progress())
    assert fake.by_name(NAME).config["StopSignal"] == "SIGHUP"  # kept by a swap
