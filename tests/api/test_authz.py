"""Who may call what: anonymous, alice (owner), bob (another user), root (staff), every endpoint.

Users never see or touch another user's tasks and instances (404, never 403: no
existence leak); users never reach admin endpoints (403); anonymous callers get
401 everywhere (token authentication answers with a WWW-Authenticate challenge).
A refused call changes nothing.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from tasks import crypto
from tasks.engine.states import InstanceStatus
from tasks.models import PortMapping, Task, TaskSecret
from tests.api.conftest import client_for
from tests.conftest import make_task

ANON, ALICE, BOB, ROOT = "anon", "alice", "bob", "root"


@pytest.fixture
def world(alice, bob, root, provider, make_instance):
    """alice owns: an idle running instance with a port, and a pending task on another one."""
    idle = make_instance(alice, provider, name="idle")
    port = PortMapping.objects.create(
        instance=idle,
        provider=provider,
        protocol="tcp",
        host_port_start=20100,
        host_port_end=20100,
        guest_port_start=80,
        guest_port_end=80,
        status=PortMapping.STATUS_ACTIVE,
    )
    busy = make_instance(alice, provider, name="busy")
    task = make_task(busy, task_type="stop")
    busy.active_task = task
    busy.save()
    secret_task = make_task(busy, task_type="reset-password", status="completed", completed_at=timezone.now())
    TaskSecret.objects.create(
        task=secret_task, ciphertext=crypto.encrypt("pw"), expires_at=timezone.now() + timedelta(hours=1)
    )
    return {
        "idle": idle.pk,
        "busy": busy.pk,
        "port": port.pk,
        "task": task.pk,
        "secret_task": secret_task.pk,
        "provider": provider.pk,
    }


def expect(anon=401, alice=200, bob=404, root=404):
    return {ANON: anon, ALICE: alice, BOB: bob, ROOT: root}


# (method, path template, body, expected status per persona)
USER_ENDPOINTS = [
    ("get", "/api/v1/tasks/", None, expect(bob=200, root=200)),
    ("get", "/api/v1/tasks/{task}/", None, expect()),
    ("post", "/api/v1/tasks/{task}/cancel/", {}, expect()),
    ("get", "/api/v1/tasks/{secret_task}/password/", None, expect()),
    ("get", "/api/v1/instances/", None, expect(bob=200, root=200)),
    ("get", "/api/v1/instances/{idle}/", None, expect()),
    ("post", "/api/v1/instances/{idle}/stop/", {}, expect(alice=202)),
    ("post", "/api/v1/instances/{idle}/restart/", {}, expect(alice=202)),
    ("post", "/api/v1/instances/{idle}/reset/", {}, expect(alice=202)),
    ("post", "/api/v1/instances/{idle}/reset-password/", {}, expect(alice=202)),
    ("post", "/api/v1/instances/{idle}/start/", {}, expect(alice=409)),
    ("delete", "/api/v1/instances/{idle}/", None, expect(alice=202)),
    ("get", "/api/v1/instances/{idle}/ports/", None, expect()),
    ("post", "/api/v1/instances/{idle}/ports/", {"protocol": "tcp", "guest_port": 8080}, expect(alice=202)),
    ("delete", "/api/v1/instances/{idle}/ports/{port}/", None, expect(alice=202)),
    ("get", "/api/v1/providers/", None, expect(bob=200, root=200)),
    ("get", "/api/v1/providers/{provider}/", None, expect(bob=200, root=200)),
]


def admin_expect(root=200):
    return {ANON: 401, ALICE: 403, BOB: 403, ROOT: root}


ADMIN_ENDPOINTS = [
    ("get", "/api/v1/admin/tasks/", None, admin_expect()),
    ("get", "/api/v1/admin/tasks/{task}/", None, admin_expect()),
    ("post", "/api/v1/admin/tasks/{task}/cancel/", {"reason": "maintenance"}, admin_expect()),
    ("post", "/api/v1/admin/tasks/{task}/force-stop/", {"reason": "stuck"}, admin_expect()),
    ("get", "/api/v1/admin/tasks/stats/", None, admin_expect()),
    ("get", "/api/v1/admin/providers/", None, admin_expect()),
    ("get", "/api/v1/admin/providers/{provider}/", None, admin_expect()),
    (
        "patch",
        "/api/v1/admin/providers/{provider}/",
        {"allow_concurrent_tasks": True, "max_concurrent_tasks": 3},
        admin_expect(),
    ),
    ("get", "/api/v1/admin/workers/", None, admin_expect()),
    ("get", "/api/v1/admin/instances/", None, admin_expect()),
    ("get", "/api/v1/admin/instances/{idle}/", None, admin_expect()),
    ("post", "/api/v1/admin/instances/{idle}/stop/", {}, admin_expect(202)),
    ("post", "/api/v1/admin/instances/{idle}/restart/", {}, admin_expect(202)),
    ("post", "/api/v1/admin/instances/{idle}/reset/", {}, admin_expect(202)),
    ("post", "/api/v1/admin/instances/{idle}/reset-password/", {}, admin_expect(202)),
    ("post", "/api/v1/admin/instances/{busy}/start/", {}, admin_expect(409)),
    ("delete", "/api/v1/admin/instances/{idle}/", None, admin_expect(202)),
    ("get", "/api/v1/admin/instances/{idle}/ports/", None, admin_expect()),
    ("post", "/api/v1/admin/instances/{idle}/ports/", {"protocol": "udp", "guest_port": 53}, admin_expect(202)),
    ("delete", "/api/v1/admin/instances/{idle}/ports/{port}/", None, admin_expect(202)),
]


def _call(client, method, path, body):
    if body is None:
        return getattr(client, method)(path)
    return getattr(client, method)(path, body, format="json")


def _id(case):
    method, path, _, _ = case
    return f"{method.upper()} {path}"


@pytest.mark.parametrize("persona", [ANON, ALICE, BOB, ROOT])
@pytest.mark.parametrize(
    "case", USER_ENDPOINTS + ADMIN_ENDPOINTS, ids=[_id(c) for c in USER_ENDPOINTS + ADMIN_ENDPOINTS]
)
def test_authorisation_matrix(case, persona, world, alice, bob, root):
    method, template, body, expected = case
    user = {ANON: None, ALICE: alice, BOB: bob, ROOT: root}[persona]
    before = sorted(Task.objects.values_list("id", "status"))
    response = _call(client_for(user), method, template.format(**world), body)
    assert response.status_code == expected[persona], response.content
    payload = response.json()
    if response.status_code >= 400:
        assert payload["code"], payload
        # A refused call leaves every task as it was.
        assert sorted(Task.objects.values_list("id", "status")) == before
    if persona == ANON:
        assert payload["code"] == "not_authenticated"
        assert response["WWW-Authenticate"] == "Token"
    if response.status_code == 403:
        assert payload["code"] == "permission_denied"
    if response.status_code == 404:
        assert payload["code"] == "not_found"


def test_lists_hold_only_the_callers_rows(world, alice, bob, provider, make_instance):
    bob_instance = make_instance(bob, provider, name="bobs")
    bob_task = make_task(bob_instance)
    as_bob = client_for(bob)
    tasks = as_bob.get("/api/v1/tasks/").json()
    assert [t["id"] for t in tasks["results"]] == [bob_task.pk]
    instances = as_bob.get("/api/v1/instances/").json()
    assert [i["id"] for i in instances["results"]] == [bob_instance.pk]
    # Filtering on another user's instance finds nothing rather than leaking it.
    assert as_bob.get(f"/api/v1/tasks/?instance={world['busy']}").json()["count"] == 0


def test_staff_see_only_their_own_rows_on_user_endpoints(world, root):
    # The user endpoints are "mine"; operators use /admin/ for everyone's.
    as_root = client_for(root)
    assert as_root.get("/api/v1/tasks/").json()["count"] == 0
    assert as_root.get("/api/v1/admin/tasks/").json()["count"] == Task.objects.count()


def test_session_authentication_works_and_needs_csrf_for_writes(world, alice):
    from rest_framework.test import APIClient

    client = APIClient(enforce_csrf_checks=True)
    assert client.login(username="alice", password="alice-pass-123")
    assert client.get("/api/v1/tasks/").status_code == 200
    response = client.post(f"/api/v1/instances/{world['idle']}/stop/", {}, format="json")
    assert response.status_code == 403
    assert response.json()["code"] == "permission_denied"
    assert "CSRF" in response.json()["detail"]


def test_token_endpoint_issues_a_working_token(alice, anon):
    response = anon.post("/api/v1/auth/token/", {"username": "alice", "password": "alice-pass-123"}, format="json")
    assert response.status_code == 200
    token = response.json()["token"]
    anon.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    assert anon.get("/api/v1/tasks/").status_code == 200
    wrong = anon.post("/api/v1/auth/token/", {"username": "alice", "password": "nope"}, format="json")
    assert wrong.status_code == 400
    assert wrong.json()["code"] == "invalid"


def test_a_bad_token_is_401(anon):
    anon.credentials(HTTP_AUTHORIZATION="Token not-a-real-token")
    response = anon.get("/api/v1/tasks/")
    assert response.status_code == 401
    assert response.json()["code"] == "authentication_failed"


def test_inactive_staff_are_refused(root):
    root.is_active = False
    root.save()
    response = client_for(root).get("/api/v1/admin/tasks/")
    assert response.status_code == 401


def test_deleted_instances_still_404_for_others(world, bob, alice):
    from tasks.models import Instance

    Instance.objects.filter(pk=world["idle"]).update(status=InstanceStatus.DELETED)
    assert client_for(bob).get(f"/api/v1/instances/{world['idle']}/").status_code == 404
    assert client_for(alice).get(f"/api/v1/instances/{world['idle']}/").status_code == 200
