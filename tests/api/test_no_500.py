"""Input never gives a 500, and every error under /api/ is JSON (issue 18, items 4 and 10)."""

from __future__ import annotations

import json
import logging

import pytest
from django.test import RequestFactory

from tasks.api import errors
from tasks.api.parsers import JSONRenderer
from tasks.models import Instance, PortMapping, Provider
from tests.api.conftest import client_for

SURROGATE = "\ud800"


def raw_json(client, method, path, text: str, **extra):
    """Send JSON text as written (``\\ud800`` escapes survive: json.dumps of a lone surrogate)."""
    return getattr(client, method)(path, text.encode("ascii"), content_type="application/json", **extra)


def test_a_lone_surrogate_in_create_is_400_naming_the_field(as_alice, provider):
    body = {"provider": provider.pk, "image": "debian/12", "instance_type": SURROGATE, "cpu": 1}
    response = raw_json(as_alice, "post", "/api/v1/instances/", json.dumps(body))
    assert response.status_code == 400, response.content
    assert (response.json()["code"], response.json()["field"]) == ("invalid", "instance_type")
    assert not Instance.objects.exists()


def test_a_lone_surrogate_in_a_port_request_is_400(as_alice, alice, provider, make_instance):
    instance = make_instance(alice, provider)
    body = json.dumps({"protocol": SURROGATE, "guest_port": 80})
    response = raw_json(as_alice, "post", f"/api/v1/instances/{instance.pk}/ports/", body)
    assert (response.status_code, response.json()["field"]) == (400, "protocol")
    assert "surrogate" in response.json()["detail"]
    assert not PortMapping.objects.exists()


def test_a_lone_surrogate_as_a_key_is_400(as_root, provider):
    body = json.dumps({SURROGATE: True, "enabled": False})
    response = raw_json(as_root, "patch", f"/api/v1/admin/providers/{provider.pk}/", body)
    assert response.status_code == 400, response.content
    assert response.json()["field"] == "\\ud800"
    assert Provider.objects.get(pk=provider.pk).enabled is True


def test_nested_surrogates_and_the_token_endpoint(anon, as_alice):
    response = raw_json(as_alice, "post", "/api/v1/tasks/1/cancel/", json.dumps({"reason": ["ok", {"x": SURROGATE}]}))
    assert (response.status_code, response.json()["field"]) == (400, "reason.1.x")
    login = raw_json(anon, "post", "/api/v1/auth/token/", json.dumps({"username": SURROGATE, "password": "x"}))
    assert (login.status_code, login.json()["field"]) == (400, "username")


def test_json_nested_beyond_recursion_is_a_parse_error(as_alice, provider):
    response = raw_json(as_alice, "post", "/api/v1/instances/", "[" * 100_000 + "]" * 100_000)
    assert (response.status_code, response.json()["code"]) == (400, "parse_error")


def test_the_renderer_never_fails_on_a_surrogate():
    rendered = JSONRenderer().render({"detail": f"bad value {SURROGATE}", "zh": "任务"})
    assert json.loads(rendered) == {"detail": f"bad value {SURROGATE}", "zh": "任务"}
    # Ordinary text stays UTF-8 (no needless escapes).
    assert JSONRenderer().render({"zh": "任务"}) == '{"zh":"任务"}'.encode()


@pytest.mark.parametrize(
    "path", ["/api/v1/instances/", "/api/v1/auth/token/", "/api/v1/admin/providers/1/", "/api/v1/no-such/"]
)
def test_an_oversized_body_is_413_json_without_an_error_log(path, as_root, provider, caplog, settings):
    body = b'{"image": "' + b"a" * (10 * 1024 * 1024) + b'"}'
    with caplog.at_level(logging.WARNING):
        response = as_root.generic("POST", path, body, "application/json")
    assert response.status_code == 413
    assert response["Content-Type"] == "application/json"
    payload = response.json()
    assert (payload["code"], payload["limit"]) == ("request_too_large", settings.API_MAX_BODY_BYTES)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_body_under_the_limit_is_processed(as_alice, provider, settings):
    settings.API_MAX_BODY_BYTES = 4096
    small = json.dumps({"provider": provider.pk, "image": "x" * 3000, "cpu": 1})
    assert as_alice.post("/api/v1/instances/", small, content_type="application/json").status_code == 400  # image
    big = json.dumps({"provider": provider.pk, "image": "x" * 5000})
    assert as_alice.post("/api/v1/instances/", big, content_type="application/json").status_code == 413


def test_a_form_encoded_body_over_djangos_limit_is_413_too(as_alice, settings):
    settings.API_MAX_BODY_BYTES = 10 * 1024 * 1024
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1024
    response = as_alice.generic(
        "POST", "/api/v1/tasks/1/cancel/", b"reason=" + b"a" * 5000, "application/x-www-form-urlencoded"
    )
    assert (response.status_code, response.json()["code"]) == (413, "request_too_large")


def test_a_bad_content_length_is_400_json(as_alice):
    response = as_alice.generic("POST", "/api/v1/instances/", b"{}", "application/json", CONTENT_LENGTH="abc")
    assert (response.status_code, response.json()["code"]) == (400, "bad_request")


def test_django_level_errors_under_api_are_json(alice, settings):
    client = client_for(alice)
    bad_host = client.get("/api/v1/tasks/", HTTP_HOST="evil.example")
    assert (bad_host.status_code, bad_host["Content-Type"], bad_host.json()["code"]) == (
        400,
        "application/json",
        "bad_request",
    )
    request = RequestFactory().get("/api/v1/tasks/")
    assert errors.permission_denied(request).status_code == 403
    assert json.loads(errors.permission_denied(request).content)["code"] == "permission_denied"
    assert json.loads(errors.server_error(request).content)["code"] == "internal_error"
    # Elsewhere Django's own pages.
    assert errors.bad_request(RequestFactory().get("/admin/")).status_code == 400
    assert b"<" in errors.bad_request(RequestFactory().get("/admin/")).content
