"""GET /api/v1/tasks/stream/: Server-Sent Events read by a real HTTP client from a real ASGI server."""

from __future__ import annotations

import time

import pytest
import requests

from tasks import services
from tasks.engine import dispatch, transitions
from tasks.engine.states import COMPLETED, FAILED
from tests.live.conftest import SSEReader, token_header

pytestmark = pytest.mark.django_db(transaction=True)


def claim(task):
    dispatch.admit(task.provider_id)
    task.refresh_from_db()
    assert transitions.claim(task.pk, token=task.lease_token, worker="test:1")
    task.refresh_from_db()
    return task


def run_to(task, target=COMPLETED):
    task = claim(task)
    assert transitions.finish(task.pk, target, token=task.lease_token, actor="worker:test:1")
    return task


@pytest.fixture
def alice_vm(alice, provider, make_instance):
    return make_instance(alice, provider)


@pytest.fixture
def bob_vm(bob, provider, make_instance):
    return make_instance(bob, provider)


def open_stream(base, user, query="", **headers) -> SSEReader:
    reader = SSEReader(f"{base}/api/v1/tasks/stream/{query}", {**token_header(user), **headers})
    assert reader.response.status_code == 200, reader.response.text
    assert reader.response.headers["Content-Type"].startswith("text/event-stream")
    reader.wait_comment("connected")
    return reader


def test_every_change_of_state_and_progress_reaches_the_owner(asgi_server, alice, alice_vm):
    stream = open_stream(asgi_server, alice)
    try:
        task = services.request_operation(alice, alice_vm.pk, "stop")
        first = stream.wait_for(lambda e: e.data["id"] == task.pk)
        assert first.event == "task" and first.data["status"] in ("pending", "running")
        assert first.data["user"] == {"id": alice.pk, "username": "alice"}
        task = claim(task)
        stream.wait_for(lambda e: e.data["id"] == task.pk and e.data["status"] == "running")
        # Progress alone writes no event row: the feed's progress read finds it.
        assert transitions.report_progress(task.pk, token=task.lease_token, progress=42, message="halfway")
        seen = stream.wait_for(lambda e: e.data["id"] == task.pk and e.data["progress"] == 42)
        assert seen.data["status_message"] == "halfway"
        assert transitions.finish(task.pk, COMPLETED, token=task.lease_token, actor="worker:test:1")
        done = stream.wait_for(lambda e: e.data["id"] == task.pk and e.data["status"] == "completed")
        assert done.data["progress"] == 100
        ids = [int(e.id) for e in stream.events]
        assert ids == sorted(ids), "event ids only grow within a stream"
    finally:
        stream.close()


def test_a_user_sees_only_their_own_tasks_and_operators_see_all(asgi_server, alice, bob, root, alice_vm, bob_vm):
    mine = open_stream(asgi_server, alice)
    everyone = open_stream(asgi_server, root, "?all=1")
    try:
        bobs = services.request_operation(bob, bob_vm.pk, "stop")
        run_to(bobs, FAILED)
        alices = services.request_operation(alice, alice_vm.pk, "stop")
        run_to(alices)
        mine.wait_for(lambda e: e.data["id"] == alices.pk and e.data["status"] == "completed")
        assert all(e.data["id"] != bobs.pk for e in mine.events)
        seen = everyone.wait_for(lambda e: e.data["id"] == bobs.pk and e.data["status"] == "failed")
        assert "worker" in seen.data, "operators get the admin representation"
        everyone.wait_for(lambda e: e.data["id"] == alices.pk and e.data["status"] == "completed")
    finally:
        mine.close()
        everyone.close()


def test_last_event_id_resumes_with_what_changed_meanwhile(asgi_server, alice, alice_vm, make_instance, provider):
    stream = open_stream(asgi_server, alice)
    first = services.request_operation(alice, alice_vm.pk, "stop")
    run_to(first)
    last = stream.wait_for(lambda e: e.data["id"] == first.pk and e.data["status"] == "completed")
    stream.close()
    # Disconnected: another task runs and ends.
    other_vm = make_instance(alice, provider)
    second = services.request_operation(alice, other_vm.pk, "restart")
    run_to(second)
    again = open_stream(asgi_server, alice, **{"Last-Event-ID": last.id})
    try:
        replay = again.wait_for(lambda e: e.data["id"] == second.pk, timeout=5)
        assert replay.data["status"] == "completed"
        assert int(replay.id) > int(last.id)
        assert all(e.data["id"] != first.pk for e in again.events), "nothing before Last-Event-ID again"
    finally:
        again.close()


def test_idle_stream_gets_keepalive_comments(asgi_server, alice):
    stream = open_stream(asgi_server, alice)
    try:
        stream.wait_comment("keepalive", timeout=5)
    finally:
        stream.close()


def test_refusals(asgi_server, alice, root, bob):
    url = f"{asgi_server}/api/v1/tasks/stream/"
    anonymous = requests.get(url, timeout=5)
    assert anonymous.status_code == 401 and anonymous.json()["code"] == "not_authenticated"
    bad_token = requests.get(url, headers={"Authorization": "Token nope"}, timeout=5)
    assert bad_token.status_code == 401 and bad_token.json()["code"] == "authentication_failed"
    not_staff = requests.get(f"{url}?all=1", headers=token_header(alice), timeout=5)
    assert not_staff.status_code == 403 and not_staff.json()["code"] == "permission_denied"
    # Staff without tasks.view_task may not watch everyone either.
    bob.is_staff = True
    bob.save()
    staff_only = requests.get(f"{url}?all=1", headers=token_header(bob), timeout=5)
    assert staff_only.status_code == 403
    bad_flag = requests.get(f"{url}?all=maybe", headers=token_header(root), timeout=5)
    assert bad_flag.status_code == 400 and bad_flag.json()["field"] == "all"
    bad_id = requests.get(url, headers={**token_header(alice), "Last-Event-ID": "abc"}, timeout=5)
    assert bad_id.status_code == 400 and bad_id.json()["field"] == "Last-Event-ID"
    post = requests.post(url, headers=token_header(alice), timeout=5)
    assert post.status_code == 405


def test_session_login_works_too(asgi_server, alice):
    session = requests.Session()
    login = session.get(f"{asgi_server}/admin/login/", timeout=5)
    assert login.status_code == 200  # the WSGI half answers on the same port
    from django.test import Client

    client = Client()
    client.force_login(alice)
    session.cookies.set("sessionid", client.cookies["sessionid"].value)
    response = session.get(f"{asgi_server}/api/v1/tasks/stream/", stream=True, timeout=(5, 5))
    try:
        assert response.status_code == 200
    finally:
        response.close()


def test_one_feed_and_one_render_per_batch_serve_every_watcher(asgi_server, alice, alice_vm):
    """Twenty watchers of one user: one hub, one poll per tick, and each batch of changes renders once."""
    from tasks import live

    streams = [open_stream(asgi_server, alice) for _ in range(20)]
    try:
        task = services.request_operation(alice, alice_vm.pk, "stop")
        run_to(task)
        for stream in streams:
            stream.wait_for(lambda e: e.data["id"] == task.pk and e.data["status"] == "completed")
        hubs = [h for h in live._hubs.values() if h.streams]
        assert len(hubs) == 1 and len(hubs[0].streams) == 20
        hub = hubs[0]
        assert 1 <= hub.renders <= hub.batches
    finally:
        for stream in streams:
            stream.close()


def test_with_redis_the_change_arrives_through_pub_sub(asgi_server, alice, alice_vm, settings, tmp_path):
    """Q_BROKER=redis: transitions publish after commit, the hub subscribes (no poll of the database)."""
    import uuid

    from tasks import live
    from tests.scaleout.faults import PrivateRedis

    redis_server = PrivateRedis(tmp_path).start()
    try:
        settings.Q_BROKER = "redis"
        settings.REDIS_URL = redis_server.url
        settings.LIVE_CHANNEL = f"test-live-{uuid.uuid4().hex}"
        settings.LIVE_POLL_SECONDS = 60  # an ORM poll would be far too late: only pub/sub can deliver
        stream = open_stream(asgi_server, alice)
        try:
            task = services.request_operation(alice, alice_vm.pk, "stop")
            task = claim(task)
            started = time.monotonic()
            assert transitions.report_progress(task.pk, token=task.lease_token, progress=64, message="pub/sub")
            stream.wait_for(lambda e: e.data["id"] == task.pk and e.data["progress"] == 64, timeout=5)
            assert time.monotonic() - started < 2
            assert all(isinstance(h.feed, type(None)) for h in live._hubs.values() if h.streams)
        finally:
            stream.close()
    finally:
        redis_server.stop()
