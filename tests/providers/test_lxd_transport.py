"""LXD and Incus transport: mutual TLS with a pinned server certificate, the two
``/wait`` shapes, lost operations, the machine's proxy/CA environment, and error
classification."""

from __future__ import annotations

import hashlib
import time

import pytest
import trustme

from providers.base import (
    AmbiguousOutcome,
    AuthError,
    CancelToken,
    ConflictError,
    NotFoundError,
    PermanentError,
    RetryableError,
    no_progress,
)
from providers.lxd.client import parse_progress
from providers.lxd.errors import classify_http
from tests.providers.fake_lxd import RUNNING
from tests.providers.lxd_helpers import NAME, Progress, spec

REF = {"name": NAME}

# ---------------------------------------------------------------- mutual TLS


def test_https_with_a_pinned_server_certificate_runs_every_step(lxd_env):
    driver = lxd_env.driver("https")
    info = driver.server_info()
    assert info.version == ("6.1" if lxd_env.flavour == "incus" else "5.21.2")
    assert info.details["server"] == lxd_env.flavour and info.details["endpoint"] == lxd_env.https_url
    ref = driver.create(spec(), CancelToken(), no_progress)
    driver.start(ref, CancelToken(), no_progress)
    driver.set_password(ref, "over-tls-secret", CancelToken(), no_progress)  # exec websockets over TLS
    assert lxd_env.fake.instances[NAME]["password"] == "over-tls-secret"


def test_https_pinned_by_fingerprint_with_colons(lxd_env):
    fp = lxd_env.tls.server_fingerprint()
    pretty = ":".join(fp[i : i + 2] for i in range(0, 64, 2)).upper()
    driver = lxd_env.driver("https", server_cert=None, server_fingerprint=pretty)
    assert driver.server_info().details["server"] == lxd_env.flavour


def test_https_with_a_ca_signed_server_checks_the_chain(lxd_env):
    ca_pem = lxd_env.tls.ca.cert_pem.bytes().decode()
    driver = lxd_env.driver("https", server_cert=None, server_ca=ca_pem)
    assert driver.server_info().details["server"] == lxd_env.flavour
    driver.create(spec(), CancelToken(), no_progress)
    driver.start(REF, CancelToken(), no_progress)
    driver.set_password(REF, "ca-checked-secret", CancelToken(), no_progress)
    assert lxd_env.fake.instances[NAME]["password"] == "ca-checked-secret"
    other_ca = trustme.CA().cert_pem.bytes().decode()
    with pytest.raises(AuthError):
        lxd_env.driver("https", server_cert=None, server_ca=other_ca).server_info()


def test_https_to_a_server_with_another_certificate_is_refused(lxd_env):
    wrong = hashlib.sha256(b"some other daemon").hexdigest()
    driver = lxd_env.driver("https", server_cert=None, server_fingerprint=wrong)
    with pytest.raises(AuthError, match="TLS"):
        driver.server_info()
    assert lxd_env.fake.requests == []  # nothing was sent to the impostor


def test_https_with_an_untrusted_client_certificate_is_an_auth_error(lxd_env):
    stranger = {"client_cert": lxd_env.tls.stranger_cert_pem, "client_key": lxd_env.tls.stranger_key_pem}
    driver = lxd_env.driver("https", secrets=stranger)
    with pytest.raises(AuthError, match="does not trust"):
        driver.server_info()
    with pytest.raises(AuthError):
        driver.start(REF, CancelToken(), no_progress)


def test_https_needs_the_client_certificate_and_a_server_trust_setting(lxd_env):
    with pytest.raises(AuthError, match="client_cert"):
        lxd_env.driver("https", secrets={}).server_info()
    with pytest.raises(PermanentError, match="server_fingerprint or server_cert"):
        lxd_env.driver("https", server_cert=None).server_info()


def test_the_machine_proxy_and_ca_environment_are_ignored(lxd_env, monkeypatch, tmp_path):
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate")
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.setenv(var, str(bogus))
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # nothing listens there
    assert lxd_env.driver("https").server_info().details["server"] == lxd_env.flavour


def test_unreachable_socket_is_retryable(lxd_env, tmp_path):
    driver = lxd_env.driver(endpoint=f"unix://{tmp_path}/nothing.sock")
    with pytest.raises(RetryableError, match="cannot connect"):
        driver.server_info()


def test_a_bad_endpoint_is_a_clear_configuration_error(lxd_env):
    with pytest.raises(PermanentError, match="unix:///path/to/unix.socket or https://host:port"):
        lxd_env.driver(endpoint="http://10.0.0.1:8443")


def test_requests_name_the_configured_project(lxd_env):
    lxd_env.fake.projects.add("tenant-a")
    driver = lxd_env.driver(project="tenant-a")
    driver.create(spec(), CancelToken(), no_progress)
    instance_calls = [r for r in lxd_env.fake.requests if r["path"].startswith("/1.0/instances")]
    assert instance_calls and all(r["args"].get("project") == "tenant-a" for r in instance_calls)


# ------------------------------------------------------------- wait shapes


@pytest.fixture(params=["operation", "error"])
def wait_style(request, lxd_env):
    """Both /wait shapes on both daemons: Incus >= 6.12 renders the operation;
    LXD >= 5.3 and Incus 6.0 LTS put an error body under HTTP 200."""
    lxd_env.fake.wait_style = request.param
    return request.param


def test_an_operation_failure_surfaces_with_its_message(lxd_env, wait_style):
    lxd_env.fake.add_instance(NAME)
    lxd_env.fake.plan("start", fail='Failed to start device "eth0": no such network', duration=0.2)
    with pytest.raises(PermanentError, match="no such network"):
        lxd_env.driver().start(REF, CancelToken(), no_progress)
    assert lxd_env.fake.calls("GET", "/wait$")  # the failure came through /wait, in this shape


def test_a_long_operation_is_followed_across_wait_slices_with_progress(lxd_env, wait_style):
    lxd_env.fake.plan("create", progress=[{"download_progress": "rootfs: 42% (3.10MB/s)"}], duration=1.3)
    progress = Progress()
    ref = lxd_env.driver().create(spec(), CancelToken(), progress)
    assert ref["name"] == NAME and NAME in lxd_env.fake.instances
    assert "downloading image: 42% (3.10MB/s)" in progress.messages
    waits = lxd_env.fake.calls("GET", "/wait$")
    assert len(waits) >= 2 and all(w["args"]["timeout"] == "1" for w in waits)


def test_a_retryable_operation_failure_stays_retryable(lxd_env, wait_style):
    lxd_env.fake.add_instance(NAME)
    lxd_env.fake.plan("start", fail='Instance is busy running a "restart" operation', duration=0.2)
    with pytest.raises(RetryableError):
        lxd_env.driver().start(REF, CancelToken(), no_progress)
    assert lxd_env.fake.calls("GET", "/wait$")


def test_transient_wait_failures_are_ridden_out(lxd_env):
    lxd_env.fake.add_instance(NAME)
    lxd_env.fake.plan("start", duration=0.3)
    lxd_env.fake.fail_next("GET", "/wait$", status=0, drop=True, times=2)
    lxd_env.driver().start(REF, CancelToken(), no_progress)
    assert lxd_env.fake.instances[NAME]["status"] == RUNNING
    assert len(lxd_env.fake.calls("GET", "/wait$")) == 3


def test_an_operation_that_vanished_is_ambiguous(lxd_env):
    lxd_env.fake.plan("create", duration=0.3)
    lxd_env.fake.fail_next("GET", "/wait$", status=404, message="Operation not found")
    with pytest.raises(AmbiguousOutcome, match="vanished"):
        lxd_env.driver().create(spec(), CancelToken(), no_progress)


def test_wait_slices_are_whole_seconds_and_never_outlast_the_deadline(lxd_env):
    lxd_env.fake.plan("create", duration=0.5)
    lxd_env.driver(wait_slice=5).create(spec(), CancelToken(deadline=time.monotonic() + 60), no_progress)
    assert lxd_env.fake.calls("GET", "/wait$")[0]["args"]["timeout"] == "5"
    lxd_env.fake.reset()
    lxd_env.fake.plan("create", duration=0.5)
    lxd_env.driver(wait_slice=5).create(spec(), CancelToken(deadline=time.monotonic() + 2.5), no_progress)
    assert lxd_env.fake.calls("GET", "/wait$")[0]["args"]["timeout"] == "3"


# ---------------------------------------------------------- classification


@pytest.mark.parametrize(
    ("status", "message", "create", "expected"),
    [
        (400, 'Instance is busy running a "stop" operation', False, RetryableError),
        (500, "Failed to acquire operation lock", False, RetryableError),
        (503, "Service Unavailable", False, RetryableError),
        (412, "ETag doesn't match", False, RetryableError),
        (400, 'Invalid value for config key "limits.memory"', False, PermanentError),
        (401, "not authorized", False, AuthError),
        (403, "not authorized", False, AuthError),
        (404, "Instance not found", False, NotFoundError),
        (409, 'Instance "vps-1" already exists', False, ConflictError),
        (500, "Failed creating instance record", True, AmbiguousOutcome),
        (503, "Service Unavailable", True, AmbiguousOutcome),
        (500, "Failed to mount rootfs", False, PermanentError),
    ],
)
def test_error_classification(status, message, create, expected):
    err = classify_http(status, message, op="x", create=create)
    assert type(err) is expected and err.remote_status == status and err.remote_message == message


def test_progress_parsing_of_both_metadata_forms():
    assert parse_progress({"download_progress": "rootfs: 42% (3.10MB/s)"}) == (42, "downloading image: 42% (3.10MB/s)")
    structured = {"progress": {"stage": "create_instance_from_image_unpack", "percent": "80", "speed": "2MB/s"}}
    assert parse_progress(structured) == (80, "unpacking image: 80% (2MB/s)")
    assert parse_progress({"fds": {}}) == (None, "")


def test_unpack_speed_in_raw_bytes_per_second_is_shown_in_units():
    """LXD 5.0 and Incus 6.0 give the unpack speed as a bare byte rate ("1170000000")."""
    raw = {"progress": {"stage": "create_instance_from_image_unpack", "percent": "100", "speed": "1170000000"}}
    assert parse_progress(raw) == (100, "unpacking image: 100% (1.2GB/s)")
    slow = {"progress": {"stage": "create_instance_from_image_unpack", "percent": "5", "speed": "2500"}}
    assert parse_progress(slow) == (5, "unpacking image: 5% (2.5kB/s)")
