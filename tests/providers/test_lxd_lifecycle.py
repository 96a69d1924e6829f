"""LXD and Incus drivers against the fake daemon: create, start, stop, restart, delete, rebuild.

Every test runs once per flavour (the ``lxd_env`` fixture), over the unix socket.
For each operation: success, already in the wanted state, a retryable error then
success (the retry policy is the task layer's: the driver classifies, a second
call succeeds), a permanent error, cancel and deadline mid-operation.
"""

from __future__ import annotations

import pytest

from providers.base import (
    AmbiguousOutcome,
    AuthError,
    CancelToken,
    NotFoundError,
    PermanentError,
    RetryableError,
    no_progress,
)
from tests.providers.fake_lxd import RUNNING, STOPPED
from tests.providers.lxd_helpers import NAME, Progress, assert_cancelled, spec

REF = {"name": NAME}


def ok() -> CancelToken:
    return CancelToken()


# ------------------------------------------------------------------- create


def test_create_builds_the_guest_with_its_limits_labels_and_root_disk(lxd_env):
    progress = Progress()
    ref = lxd_env.driver().create(spec(), ok(), progress)
    inst = lxd_env.fake.instances[NAME]
    assert ref == {"name": NAME, "project": "default", "type": "container"}
    assert inst["status"] == STOPPED and inst["image"] == "debian/12"
    assert inst["config"]["limits.cpu"] == "2" and inst["config"]["limits.memory"] == "1024MiB"
    assert inst["config"]["user.owner"] == "alice" and inst["config"]["user.instance"] == "42"
    assert inst["devices"]["root"] == {"type": "disk", "path": "/", "pool": "default", "size": "20480MiB"}
    assert progress.events[-1] == (100, f"created {NAME}")


def test_create_a_vm_from_a_remote_image_server(lxd_env):
    lxd_env.fake.images.add("ubuntu/24.04")
    ref = lxd_env.driver().create(spec(instance_type="vm", image="images:ubuntu/24.04"), ok(), no_progress)
    assert ref["type"] == "virtual-machine"
    source = lxd_env.fake.instances[NAME]["source"]
    expected = (
        "https://images.linuxcontainers.org" if lxd_env.flavour == "incus" else "https://images.lxd.canonical.com"
    )
    assert (source["alias"], source["server"], source["protocol"]) == ("ubuntu/24.04", expected, "simplestreams")


def test_create_finds_an_existing_guest_instead_of_making_a_second(lxd_env):
    lxd_env.fake.add_instance(NAME, type="virtual-machine")
    ref = lxd_env.driver().create(spec(), ok(), no_progress)
    assert ref["type"] == "virtual-machine"
    assert lxd_env.fake.calls("POST", r"^/1.0/instances$") == []


def test_create_retryable_error_then_success(lxd_env):
    lxd_env.fake.fail_next("GET", rf"/instances/{NAME}$", status=503, message="Service Unavailable")
    driver = lxd_env.driver()
    with pytest.raises(RetryableError):
        driver.create(spec(), ok(), no_progress)
    assert NAME not in lxd_env.fake.instances
    driver.create(spec(), ok(), no_progress)
    assert NAME in lxd_env.fake.instances


def test_create_connection_lost_after_the_post_is_ambiguous_and_a_retry_converges(lxd_env):
    lxd_env.fake.fail_next("POST", r"^/1.0/instances$", drop=True, after=True)
    driver = lxd_env.driver()
    with pytest.raises(AmbiguousOutcome) as info:
        driver.create(spec(), ok(), no_progress)
    assert info.value.retryable
    for op in list(lxd_env.fake.operations.values()):
        op.done.wait(2)  # the daemon finishes the create it accepted
    ref = driver.create(spec(), ok(), no_progress)  # reconciles: finds it, posts nothing
    assert ref["name"] == NAME and len(lxd_env.fake.calls("POST", r"^/1.0/instances$")) == 1


def test_create_server_error_on_the_post_is_ambiguous(lxd_env):
    lxd_env.fake.fail_next("POST", r"^/1.0/instances$", status=500, message="Failed creating instance record")
    with pytest.raises(AmbiguousOutcome):
        lxd_env.driver().create(spec(), ok(), no_progress)


def test_create_with_a_missing_image_is_permanent(lxd_env):
    with pytest.raises(PermanentError, match="Image not found") as info:
        lxd_env.driver().create(spec(image="nosuch/1"), ok(), no_progress)
    assert not info.value.retryable and NAME not in lxd_env.fake.instances


def test_create_rejected_as_invalid_is_permanent(lxd_env):
    lxd_env.fake.fail_next("POST", r"^/1.0/instances$", status=400, message='Invalid value for config key "limits.cpu"')
    with pytest.raises(PermanentError, match="limits.cpu"):
        lxd_env.driver().create(spec(), ok(), no_progress)


def test_create_cancelled_during_the_image_download_cancels_the_operation(lxd_env):
    lxd_env.fake.plan("create", hang=True)
    assert_cancelled(lambda token: lxd_env.driver().create(spec(), token, no_progress))
    deletes = lxd_env.fake.calls("DELETE", r"^/1.0/operations/")
    assert len(deletes) == 1
    op = lxd_env.fake.operations[deletes[0]["path"].rsplit("/", 1)[1]]
    assert op.status_code == 401 and NAME not in lxd_env.fake.instances


def test_create_past_its_deadline_cancels_the_operation(lxd_env):
    lxd_env.fake.plan("create", hang=True)
    assert_cancelled(lambda token: lxd_env.driver().create(spec(), token, no_progress), deadline=True)
    assert len(lxd_env.fake.calls("DELETE", r"^/1.0/operations/")) == 1


def test_create_reports_download_progress(lxd_env):
    # The operation sits at 42% for longer than one wait slice, so the driver sees it.
    lxd_env.fake.plan("create", progress=[{"download_progress": "rootfs: 42% (3.10MB/s)"}], duration=1.3)
    progress = Progress()
    lxd_env.driver().create(spec(), ok(), progress)
    downloading = [(p, m) for p, m in progress.events if m.startswith("downloading image")]
    assert downloading and downloading[0][1] == "downloading image: 42% (3.10MB/s)"
    assert 5 < downloading[0][0] < 95


# -------------------------------------------------------------------- start


def test_start_boots_a_stopped_guest(lxd_env):
    lxd_env.fake.add_instance(NAME)
    lxd_env.driver().start(REF, ok(), no_progress)
    assert lxd_env.fake.instances[NAME]["status"] == RUNNING
    assert lxd_env.fake.calls("PUT", "/state$")[0]["json"] == {"action": "start"}


def test_start_of_a_running_guest_sends_nothing(lxd_env):
    lxd_env.fake.add_instance(NAME, status=RUNNING)
    lxd_env.driver().start(REF, ok(), no_progress)
    assert lxd_env.fake.calls("PUT", "/state$") == []


def test_start_when_another_start_won_the_race_is_success(lxd_env):
    lxd_env.fake.add_instance(NAME)
    # Someone else starts it between our read and our PUT: the daemon says "already running".
    lxd_env.fake.plan("start", fail="The instance is already running")
    driver = lxd_env.driver()
    original = driver._require

    def read_then_race(name, *, op):
        found = original(name, op=op)
        lxd_env.fake.instances[NAME]["status"] = RUNNING
        return found

    driver._require = read_then_race
    driver.start(REF, ok(), no_progress)


def test_start_busy_is_retryable_then_succeeds(lxd_env):
    lxd_env.fake.add_instance(NAME)
    lxd_env.fake.fail_next("PUT", "/state$", status=400, message='Instance is busy running a "stop" operation')
    driver = lxd_env.driver()
    with pytest.raises(RetryableError):
        driver.start(REF, ok(), no_progress)
    driver.start(REF, ok(), no_progress)
    assert lxd_env.fake.instances[NAME]["status"] == RUNNING


def test_start_failing_on_the_host_is_permanent(lxd_env):
    lxd_env.fake.add_instance(NAME)
    lxd_env.fake.plan("start", fail='Failed to start device "eth0": Failed to create the veth interfaces')
    with pytest.raises(PermanentError, match="veth") as info:
        lxd_env.driver().start(REF, ok(), no_progress)
    assert not info.value.retryable and lxd_env.fake.instances[NAME]["status"] == STOPPED


def test_start_of_a_missing_guest_is_not_found(lxd_env):
    with pytest.raises(NotFoundError):
        lxd_env.driver().start(REF, ok(), no_progress)


def test_start_cancelled_mid_operation_stops_waiting(lxd_env):
    lxd_env.fake.add_instance(NAME)
    lxd_env.fake.plan("start", hang=True)
    assert_cancelled(lambda token: lxd_env.driver().start(REF, token, no_progress))
    # Starts cannot be cancelled on the daemon: the driver does not try.
    assert lxd_env.fake.calls("DELETE", r"^/1.0/operations/") == []


def test_start_past_its_deadline(lxd_env):
    lxd_env.fake.add_instance(NAME)
    lxd_env.fake.plan("start", hang=True)
    assert_cancelled(lambda token: lxd_env.driver().start(REF, token, no_progress), deadline=True)


# --------------------------------------------------------------------- stop


def test_stop_shuts_down_gracefully_with_the_timeout(lxd_env):
    lxd_env.fake.add_instance(NAME, status=RUNNING)
    lxd_env.driver().stop(REF, ok(), no_progress, graceful_timeout=12)
    assert lxd_env.fake.instances[NAME]["status"] == STOPPED
    assert [c["json"] for c in lxd_env.fake.calls("PUT", "/state$")] == [
        {"action": "stop", "timeout": 12, "force": False}
    ]


def test_stop_of_a_stopped_guest_sends_nothing(lxd_env):
    lxd_env.fake.add_instance(NAME)
    lxd_env.driver().stop(REF, ok(), no_progress)
    assert lxd_env.fake.calls("PUT", "/state$") == []


def test_stop_forces_a_guest_that_ignores_the_shutdown(lxd_env):
    lxd_env.fake.add_instance(NAME, status=RUNNING, ignore_shutdown=True)
    progress = Progress()
    lxd_env.driver().stop(REF, ok(), progress, graceful_timeout=1)
    assert lxd_env.fake.instances[NAME]["status"] == STOPPED
    bodies = [c["json"] for c in lxd_env.fake.calls("PUT", "/state$")]
    assert bodies == [{"action": "stop", "timeout": 1, "force": False}, {"action": "stop", "force": True}]
    assert "graceful shutdown failed; forcing" in progress.messages


def test_stop_unavailable_is_retryable_then_succeeds(lxd_env):
    lxd_env.fake.add_instance(NAME, status=RUNNING)
    lxd_env.fake.fail_next("PUT", "/state$", status=503)
    driver = lxd_env.driver()
    with pytest.raises(RetryableError):
        driver.stop(REF, ok(), no_progress)
    driver.stop(REF, ok(), no_progress)
    assert lxd_env.fake.instances[NAME]["status"] == STOPPED


def test_stop_refused_is_an_auth_error_and_is_not_forced(lxd_env):
    lxd_env.fake.add_instance(NAME, status=RUNNING)
    lxd_env.fake.fail_next("PUT", "/state$", status=403, message="not authorized")
    with pytest.raises(AuthError):
        lxd_env.driver().stop(REF, ok(), no_progress)
    assert len(lxd_env.fake.calls("PUT", "/state$")) == 1


def test_stop_cancelled_mid_operation(lxd_env):
    lxd_env.fake.add_instance(NAME, status=RUNNING)
    lxd_env.fake.plan("stop", hang=True)
    assert_cancelled(lambda token: lxd_env.driver().stop(REF, token, no_progress))


def test_stop_past_its_deadline(lxd_env):
    lxd_env.fake.add_instance(NAME, status=RUNNING)
    lxd_env.fake.plan("stop", hang=True)
    assert_cancelled(lambda token: lxd_env.driver().stop(REF, token, no_progress), deadline=True)


# ------------------------------------------------------------------ restart


def test_restart_reboots_a_running_guest(lxd_env):
    lxd_env.fake.add_instance(NAME, status=RUNNING)
    lxd_env.driver().restart(REF, ok(), no_progress)
    assert lxd_env.fake.instances[NAME]["restarts"] == 1
    assert lxd_env.fake.calls("PUT", "/state$")[0]["json"] == {"action": "restart", "timeout": 30, "force": False}


def test_restart_of_a_stopped_guest_starts_it(lxd_env):
    lxd_env.fake.add_instance(NAME)
    lxd_env.driver().restart(REF, ok(), no_progress)
    assert lxd_env.fake.instances[NAME]["status"] == RUNNING
    assert [c["json"]["action"] for c in lxd_env.fake.calls("PUT", "/state$")] == ["start"]


def test_restart_forces_a_guest_that_ignores_the_shutdown(lxd_env):
    lxd_env.fake.add_instance(NAME, status=RUNNING, ignore_shutdown=True)
    lxd_env.driver().restart(REF, ok(), no_progress)
    assert lxd_env.fake.instances[NAME]["restarts"] == 1
    assert lxd_env.fake.calls("PUT", "/state$")[-1]["json"] == {"action": "restart", "force": True}


def test_restart_busy_is_retryable_then_succeeds(lxd_env):
    lxd_env.fake.add_instance(NAME, status=RUNNING)
    lxd_env.fake.fail_next("PUT", "/state$", status=500, message="Failed to acquire operation lock")
    driver = lxd_env.driver()
    with pytest.raises(RetryableError):
        driver.restart(REF, ok(), no_progress)
    driver.restart(REF, ok(), no_progress)
    assert lxd_env.fake.instances[NAME]["restarts"] == 1


def test_restart_rejected_is_permanent(lxd_env):
    lxd_env.fake.add_instance(NAME, status=RUNNING)
    lxd_env.fake.fail_next("PUT", "/state$", status=400, message="Invalid action", times=2)
    with pytest.raises(PermanentError, match="Invalid action"):
        lxd_env.driver().restart(REF, ok(), no_progress)
    assert lxd_env.fake.instances[NAME]["restarts"] == 0


def test_restart_cancelled_mid_operation(lxd_env):
    lxd_env.fake.add_instance(NAME, status=RUNNING)
    lxd_env.fake.plan("restart", hang=True)
    assert_cancelled(lambda token: lxd_env.driver().restart(REF, token, no_progress))


def test_restart_past_its_deadline(lxd_env):
    lxd_env.fake.add_instance(NAME, status=RUNNING)
    lxd_env.fake.plan("restart", hang=True)
    assert_cancelled(lambda token: lxd_env.driver().restart(REF, token, no_progress), deadline=True)


# ------------------------------------------------------------------- delete


def test_delete_stops_a_running_guest_then_removes_it(lxd_env):
    lxd_env.fake.add_instance(NAME, status=RUNNING)
    lxd_env.driver().delete(REF, ok(), no_progress)
    assert NAME not in lxd_env.fake.instances
    assert lxd_env.fake.calls("PUT", "/state$")[0]["json"] == {"action": "stop", "force": True}


def test_delete_of_a_missing_guest_is_success(lxd_env):
    lxd_env.driver().delete(REF, ok(), no_progress)
    assert lxd_env.fake.calls("DELETE", "/instances/") == []


def test_delete_busy_is_retryable_then_succeeds(lxd_env):
    lxd_env.fake.add_instance(NAME)
    lxd_env.fake.fail_next("DELETE", "/instances/", status=400, message='Instance is busy running a "start" operation')
    driver = lxd_env.driver()
    with pytest.raises(RetryableError):
        driver.delete(REF, ok(), no_progress)
    driver.delete(REF, ok(), no_progress)
    assert NAME not in lxd_env.fake.instances


def test_delete_refused_is_permanent(lxd_env):
    lxd_env.fake.add_instance(NAME)
    lxd_env.fake.fail_next("DELETE", "/instances/", status=403, message="not authorized")
    with pytest.raises(AuthError):
        lxd_env.driver().delete(REF, ok(), no_progress)
    assert NAME in lxd_env.fake.instances


def test_delete_that_leaves_the_guest_behind_is_not_success(lxd_env):
    lxd_env.fake.add_instance(NAME)
    lxd_env.fake.plan("delete", hang=True)
    driver = lxd_env.driver()
    driver.api.wait = lambda started, **kw: {}  # the operation "ends" but the guest is still listed
    with pytest.raises(RetryableError, match="still present"):
        driver.delete(REF, ok(), no_progress)


def test_delete_cancelled_mid_operation(lxd_env):
    lxd_env.fake.add_instance(NAME)
    lxd_env.fake.plan("delete", hang=True)
    assert_cancelled(lambda token: lxd_env.driver().delete(REF, token, no_progress))
    assert NAME in lxd_env.fake.instances


def test_delete_past_its_deadline(lxd_env):
    lxd_env.fake.add_instance(NAME)
    lxd_env.fake.plan("delete", hang=True)
    assert_cancelled(lambda token: lxd_env.driver().delete(REF, token, no_progress), deadline=True)


# ------------------------------------------------------------------ rebuild

PORT_DEVICE = {"type": "proxy", "listen": "tcp:0.0.0.0:20022", "connect": "tcp:127.0.0.1:22"}


def test_rebuild_reinstalls_in_place_keeping_ports(lxd_env):
    lxd_env.fake.add_instance(NAME, status=RUNNING, devices={"pm-tcp-20022": dict(PORT_DEVICE)})
    ref = lxd_env.driver().rebuild(REF, spec(image="alpine/3.20"), ok(), no_progress)
    inst = lxd_env.fake.instances[NAME]
    assert ref["name"] == NAME and inst["image"] == "alpine/3.20" and inst["rebuilds"] == 1
    assert inst["status"] == STOPPED and inst["devices"]["pm-tcp-20022"] == PORT_DEVICE
    assert lxd_env.fake.calls("DELETE", "/instances/") == []


def test_rebuild_without_the_api_extension_recreates_under_the_same_name(lxd_env):
    lxd_env.fake.extensions.remove("instances_rebuild")
    lxd_env.fake.add_instance(NAME, status=RUNNING, devices={"pm-tcp-20022": dict(PORT_DEVICE)})
    ref = lxd_env.driver().rebuild(REF, spec(image="alpine/3.20"), ok(), no_progress)
    inst = lxd_env.fake.instances[NAME]
    assert ref["name"] == NAME and inst["image"] == "alpine/3.20"
    assert inst["devices"]["pm-tcp-20022"] == PORT_DEVICE and inst["config"]["limits.cpu"] == "2"
    assert len(lxd_env.fake.calls("DELETE", "/instances/")) == 1


def test_rebuild_twice_converges(lxd_env):
    lxd_env.fake.add_instance(NAME)
    driver = lxd_env.driver()
    driver.rebuild(REF, spec(image="alpine/3.20"), ok(), no_progress)
    driver.rebuild(REF, spec(image="alpine/3.20"), ok(), no_progress)
    assert lxd_env.fake.instances[NAME]["rebuilds"] == 2


def test_rebuild_unavailable_is_retryable_then_succeeds(lxd_env):
    lxd_env.fake.add_instance(NAME)
    lxd_env.fake.fail_next("POST", "/rebuild$", status=503)
    driver = lxd_env.driver()
    with pytest.raises(RetryableError):
        driver.rebuild(REF, spec(), ok(), no_progress)
    driver.rebuild(REF, spec(), ok(), no_progress)
    assert lxd_env.fake.instances[NAME]["rebuilds"] == 1


def test_rebuild_from_a_missing_image_is_permanent_and_keeps_the_guest(lxd_env):
    lxd_env.fake.add_instance(NAME)
    with pytest.raises(PermanentError, match="Image not found"):
        lxd_env.driver().rebuild(REF, spec(image="nosuch/1"), ok(), no_progress)
    assert NAME in lxd_env.fake.instances


def test_rebuild_cancelled_mid_operation_cancels_it_on_the_daemon(lxd_env):
    lxd_env.fake.add_instance(NAME)
    lxd_env.fake.plan("rebuild", hang=True)
    assert_cancelled(lambda token: lxd_env.driver().rebuild(REF, spec(), token, no_progress))
    assert len(lxd_env.fake.calls("DELETE", r"^/1.0/operations/")) == 1


def test_rebuild_past_its_deadline(lxd_env):
    lxd_env.fake.add_instance(NAME)
    lxd_env.fake.plan("rebuild", hang=True)
    assert_cancelled(lambda token: lxd_env.driver().rebuild(REF, spec(), token, no_progress), deadline=True)
