"""GET /api/v1/tasks/{id}/wait/?timeout=S against a real ASGI server."""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from tasks import services
from tasks.engine.states import COMPLETED
from tests.live.conftest import token_header
from tests.live.test_stream import claim, run_to

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def vm(alice, provider, make_instance):
    return make_instance(alice, provider)


def wait_url(base, task_id, timeout=None) -> str:
    query = "" if timeout is None else f"?timeout={timeout}"
    return f"{base}/api/v1/tasks/{task_id}/wait/{query}"


def test_a_finished_task_answers_at_once(asgi_server, alice, vm):
    task = services.request_operation(alice, vm.pk, "stop")
    run_to(task)
    started = time.monotonic()
    response = requests.get(wait_url(asgi_server, task.pk, 30), headers=token_header(alice), timeout=10)
    assert time.monotonic() - started < 2
    assert response.status_code == 200
    body = response.json()
    assert body["id"] == task.pk and body["status"] == "completed"
    assert [e["to_status"] for e in body["events"]] == ["pending", "running", "completed"]


def test_wakes_on_the_transition_not_at_the_timeout(asgi_server, alice, vm):
    task = claim(services.request_operation(alice, vm.pk, "stop"))
    result = {}

    def call():
        started = time.monotonic()
        result["response"] = requests.get(wait_url(asgi_server, task.pk, 30), headers=token_header(alice), timeout=40)
        result["seconds"] = time.monotonic() - started

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.5)
    assert "response" not in result, "answered before the task ended"
    from tasks.engine import transitions

    assert transitions.finish(task.pk, COMPLETED, token=task.lease_token, actor="worker:test:1")
    caller.join(10)
    assert result["response"].status_code == 200
    assert result["response"].json()["status"] == "completed"
    assert result["seconds"] < 5, result["seconds"]


def test_answers_with_the_state_then_after_the_timeout(asgi_server, alice, vm):
    task = services.request_operation(alice, vm.pk, "stop")
    started = time.monotonic()
    response = requests.get(wait_url(asgi_server, task.pk, 1), headers=token_header(alice), timeout=10)
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert response.json()["status"] == "pending"
    assert 0.9 <= elapsed < 5


def test_a_progress_change_does_not_end_the_wait(asgi_server, alice, vm):
    from tasks.engine import transitions

    task = claim(services.request_operation(alice, vm.pk, "stop"))
    result = {}

    def call():
        result["response"] = requests.get(wait_url(asgi_server, task.pk, 2), headers=token_header(alice), timeout=10)

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.4)
    transitions.report_progress(task.pk, token=task.lease_token, progress=30, message="working", step=True)
    caller.join(10)
    body = result["response"].json()
    assert body["status"] == "running" and body["progress"] == 30


def test_refusals(asgi_server, alice, bob, vm):
    task = services.request_operation(alice, vm.pk, "stop")
    anonymous = requests.get(wait_url(asgi_server, task.pk, 1), timeout=5)
    assert anonymous.status_code == 401
    others = requests.get(wait_url(asgi_server, task.pk, 1), headers=token_header(bob), timeout=5)
    assert others.status_code == 404 and others.json()["code"] == "not_found"
    missing = requests.get(wait_url(asgi_server, 999999, 1), headers=token_header(alice), timeout=5)
    assert missing.status_code == 404
    for bad in ("abc", "-1", "nan"):
        response = requests.get(wait_url(asgi_server, task.pk, bad), headers=token_header(alice), timeout=5)
        assert response.status_code == 400 and response.json()["field"] == "timeout", bad


def test_a_timeout_above_60_is_accepted_and_capped(asgi_server, alice, vm):
    task = services.request_operation(alice, vm.pk, "stop")
    run_to(task)
    response = requests.get(wait_url(asgi_server, task.pk, 3600), headers=token_header(alice), timeout=10)
    assert response.status_code == 200 and response.json()["status"] == "completed"


def test_under_wsgi_the_django_views_answer_the_same(client, alice, vm):
    """config.wsgi (no ASGI server) still serves the live paths, through Django's async views."""
    task = services.request_operation(alice, vm.pk, "stop")
    run_to(task)
    headers = {"HTTP_AUTHORIZATION": token_header(alice)["Authorization"]}
    response = client.get(f"/api/v1/tasks/{task.pk}/wait/?timeout=5", **headers)
    assert response.status_code == 200 and response.json()["status"] == "completed"
    assert client.get(f"/api/v1/tasks/{task.pk}/wait/?timeout=x", **headers).json()["field"] == "timeout"
    assert client.get("/api/v1/tasks/stream/?all=1", **headers).status_code == 403
    assert client.get(f"/api/v1/tasks/{task.pk}/wait/").status_code == 401


def test_the_live_endpoints_refuse_in_the_requests_language():
    """They run outside Django's LocaleMiddleware: the refusal picks its language itself."""
    import asyncio

    from tasks.api.live_asgi import application

    def call(language: str) -> dict:
        sent = []

        async def receive():
            return {"type": "http.request"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/api/v1/tasks/stream/", "query_string": b""}
        scope["headers"] = [(b"accept-language", language.encode())]
        asyncio.run(application(scope, receive, send))
        assert sent[0]["status"] == 405
        return json.loads(sent[1]["body"])

    assert call("en") == {"code": "method_not_allowed", "detail": 'method "POST" not allowed'}
    assert call("zh-CN,zh;q=0.9") == {"code": "method_not_allowed", "detail": '不允许方法 "POST"'}
