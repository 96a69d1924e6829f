"""Admin endpoints need the console's permission of what they do, not only is_staff (API.md).

The matrix: every admin endpoint against a staff member holding exactly one of
the relevant permissions (and none), plus a superuser. A call is allowed exactly
when the permission held grants the one the endpoint needs (a change permission
implies the view permission of its model, as in the console); anything else is
403 ``permission_denied`` and changes nothing.
"""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission

from tasks.models import Provider, Task
from tests.api.conftest import client_for
from tests.api.test_authz import world  # noqa: F401 (fixture)

PERMISSIONS = [
    "view_task",
    "change_task",
    "force_stop_task",
    "view_instance",
    "change_instance",
    "view_provider",
    "change_provider",
    "view_worker",
]

# (method, path, body, the permission it needs, status when allowed)
ENDPOINTS = [
    ("get", "/api/v1/admin/tasks/", None, "view_task", 200),
    ("get", "/api/v1/admin/tasks/{task}/", None, "view_task", 200),
    ("get", "/api/v1/admin/tasks/stats/", None, "view_task", 200),
    ("post", "/api/v1/admin/tasks/{task}/cancel/", {"reason": "maintenance"}, "change_task", 200),
    ("post", "/api/v1/admin/tasks/{task}/force-stop/", {"reason": "stuck"}, "force_stop_task", 200),
    ("post", "/api/v1/admin/tasks/{task}/retry/", {}, "change_task", 409),  # still active: not_retryable
    ("get", "/api/v1/admin/providers/", None, "view_provider", 200),
    ("get", "/api/v1/admin/providers/{provider}/", None, "view_provider", 200),
    ("patch", "/api/v1/admin/providers/{provider}/", {"enabled": False}, "change_provider", 200),
    ("get", "/api/v1/admin/workers/", None, "view_worker", 200),
    ("get", "/api/v1/admin/instances/", None, "view_instance", 200),
    ("get", "/api/v1/admin/instances/{idle}/", None, "view_instance", 200),
    ("get", "/api/v1/admin/instances/{idle}/ports/", None, "view_instance", 200),
    ("post", "/api/v1/admin/instances/{idle}/start/", {}, "change_instance", 409),  # running already
    ("post", "/api/v1/admin/instances/{idle}/stop/", {}, "change_instance", 202),
    ("post", "/api/v1/admin/instances/{idle}/restart/", {}, "change_instance", 202),
    ("post", "/api/v1/admin/instances/{idle}/reset/", {}, "change_instance", 202),
    ("post", "/api/v1/admin/instances/{idle}/reset-password/", {}, "change_instance", 202),
    ("delete", "/api/v1/admin/instances/{idle}/", None, "change_instance", 202),
    ("post", "/api/v1/admin/instances/{idle}/ports/", {"protocol": "udp", "guest_port": 53}, "change_instance", 202),
    ("delete", "/api/v1/admin/instances/{idle}/ports/{port}/", None, "change_instance", 202),
]


def grants(held: str | None, needed: str) -> bool:
    if held is None:
        return False
    if held == needed:
        return True
    return needed.startswith("view_") and held == "change_" + needed[len("view_") :]


def staff_with(permission: str | None):
    user = get_user_model().objects.create_user("staff1", "s@example.com", "staff-pass-123", is_staff=True)
    if permission is not None:
        user.user_permissions.set([Permission.objects.get(content_type__app_label="tasks", codename=permission)])
    return user


def snapshot():
    return (
        sorted(Task.objects.values_list("id", "status")),
        list(Provider.objects.order_by("pk").values_list("enabled", "max_concurrent_tasks")),
    )


def _call(client, method, path, body):
    if body is None:
        return getattr(client, method)(path)
    return getattr(client, method)(path, body, format="json")


def _id(case) -> str:
    return f"{case[0].upper()} {case[1]}"


@pytest.mark.parametrize("held", [None, *PERMISSIONS], ids=["no-permission", *PERMISSIONS])
@pytest.mark.parametrize("case", ENDPOINTS, ids=[_id(c) for c in ENDPOINTS])
def test_admin_endpoint_needs_its_permission(case, held, world):  # noqa: F811
    method, template, body, needed, allowed_status = case
    user = staff_with(held)
    before = snapshot()
    response = _call(client_for(user), method, template.format(**world), body)
    if grants(held, needed):
        assert response.status_code == allowed_status, response.content
    else:
        assert response.status_code == 403, response.content
        assert response.json()["code"] == "permission_denied"
        assert f"tasks.{needed}" in response.json()["detail"]
        assert snapshot() == before


@pytest.mark.parametrize("case", ENDPOINTS, ids=[_id(c) for c in ENDPOINTS])
def test_superuser_has_every_admin_endpoint(case, world, root):  # noqa: F811
    method, template, body, _, allowed_status = case
    response = _call(client_for(root), method, template.format(**world), body)
    assert response.status_code == allowed_status, response.content


def test_every_admin_route_is_in_the_matrix(world):  # noqa: F811
    """A new admin endpoint must be added above (and so get a permission) for this to pass."""
    from django.urls import get_resolver, resolve

    from tasks.api import urls

    covered = {(resolve(path.format(**world)).url_name, method) for method, path, *_ in ENDPOINTS}
    routes = set()
    for pattern in get_resolver(urls).url_patterns:
        for sub in getattr(pattern, "url_patterns", [pattern]):
            if not (sub.name or "").startswith("admin-"):
                continue
            for method in getattr(sub.callback, "actions", {}) or {}:
                if method not in ("head", "options"):
                    routes.add((sub.name, method))
    assert routes, "no admin routes found"
    assert routes <= covered, sorted(routes - covered)


def test_a_staff_member_without_permission_cannot_take_over_through_the_api(world):  # noqa: F811
    """The issue's three calls: delete, force-stop and disabling a provider, by is_staff alone."""
    client = client_for(staff_with(None))
    assert client.delete(f"/api/v1/admin/instances/{world['idle']}/").status_code == 403
    assert client.post(f"/api/v1/admin/tasks/{world['task']}/force-stop/", {"reason": "x"}).status_code == 403
    assert client.patch(f"/api/v1/admin/providers/{world['provider']}/", {"enabled": False}).status_code == 403
    assert Provider.objects.get(pk=world["provider"]).enabled
    assert Task.objects.get(pk=world["task"]).status == "pending"
