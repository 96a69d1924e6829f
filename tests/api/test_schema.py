"""The OpenAPI schema, and schemathesis fuzzing every operation against it.

The fuzzer runs in-process against the WSGI app (no server), authenticated as
staff with a token, in a world where the ids it guesses exist (an instance,
tasks, a port mapping, a provider). Every response must be a documented status
code whose body matches the schema, and none may be a 5xx.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import schemathesis
from django.utils import timezone
from hypothesis import HealthCheck, settings
from rest_framework.authtoken.models import Token

from tasks import crypto
from tasks.models import PortMapping, TaskSecret
from tests.conftest import make_task

MAX_EXAMPLES = 30


def test_schema_is_openapi_3_and_documents_every_endpoint(anon, db):
    response = anon.get("/api/v1/schema/?format=json")
    assert response.status_code == 200
    schema = response.json()
    assert schema["openapi"].startswith("3.")
    paths = schema["paths"]
    for path in (
        "/api/v1/tasks/",
        "/api/v1/tasks/{id}/",
        "/api/v1/tasks/{id}/cancel/",
        "/api/v1/tasks/{id}/password/",
        "/api/v1/instances/",
        "/api/v1/instances/{id}/",
        "/api/v1/instances/{id}/reset-password/",
        "/api/v1/instances/{id}/ports/",
        "/api/v1/instances/{id}/ports/{port_id}/",
        "/api/v1/admin/tasks/",
        "/api/v1/admin/tasks/{id}/force-stop/",
        "/api/v1/admin/tasks/stats/",
        "/api/v1/admin/providers/{id}/",
        "/api/v1/admin/workers/",
        "/api/v1/admin/instances/{id}/stop/",
    ):
        assert path in paths, path
    conflict = paths["/api/v1/instances/{id}/stop/"]["post"]["responses"]
    assert {"202", "400", "401", "403", "404", "409"} <= set(conflict)
    assert {"200", "401", "403", "404", "409", "410"} <= set(paths["/api/v1/tasks/{id}/password/"]["get"]["responses"])


def test_docs_pages_render_with_local_assets(anon, db):
    for url in ("/api/v1/docs/", "/api/v1/redoc/"):
        response = anon.get(url)
        assert response.status_code == 200
        assert b"/api/v1/schema/" in response.content
        # No CDN: the assets come from drf-spectacular-sidecar through /static/.
        assert b"cdn.jsdelivr" not in response.content
    asset = anon.get("/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js")
    assert asset.status_code == 200


@pytest.fixture
def fuzz_world(root, alice, provider, make_instance):
    """Objects with small ids, so that the fuzzer's guesses hit real rows as well as missing ones."""
    mine = make_instance(root, provider, name="r1")
    theirs = make_instance(alice, provider, name="a1")
    for instance in (mine, theirs):
        PortMapping.objects.create(
            instance=instance,
            provider=provider,
            protocol="tcp",
            host_port_start=20000 + instance.pk,
            host_port_end=20000 + instance.pk,
            guest_port_start=22,
            guest_port_end=22,
            status=PortMapping.STATUS_ACTIVE,
        )
        make_task(instance, status="completed", completed_at=timezone.now())
        task = make_task(instance, task_type="reset-password", status="completed", completed_at=timezone.now())
        TaskSecret.objects.create(
            task=task, ciphertext=crypto.encrypt("pw"), expires_at=timezone.now() + timedelta(hours=1)
        )
        make_task(instance, status="running", started_at=timezone.now())
    return Token.objects.create(user=root).key


@pytest.fixture
def api_schema(fuzz_world):
    from django.core.signals import request_finished, request_started
    from django.db import close_old_connections

    from config.wsgi import application

    # The app is called straight through WSGI, inside the test's transaction: like
    # Django's test client, keep the per-request connection recycling from closing
    # the connection that holds it (MariaDB would answer "server has gone away").
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield schemathesis.openapi.from_wsgi("/api/v1/schema/?format=json", application)
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_fuzz_every_operation(case, fuzz_world):
    # Only the checks this issue asks for: the server never fails, and every answer is
    # documented (status code, content type, body schema).
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    case.call_and_validate(
        headers={"Authorization": f"Token {fuzz_world}"},
        checks=[not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance],
    )


SURROGATE = "\ud800"


def _with_surrogates(value):
    """The generated body with a lone surrogate in every string and as a key of every object."""
    if isinstance(value, bytes):  # a multipart alternative's file part
        value = value.decode("latin-1")
    if isinstance(value, str):
        return value + SURROGATE
    if isinstance(value, dict):
        return {**{key: _with_surrogates(item) for key, item in value.items()}, SURROGATE: SURROGATE}
    if isinstance(value, list):
        return [_with_surrogates(item) for item in value] + [SURROGATE]
    return {SURROGATE: value}


@schema.parametrize()
@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_fuzz_bodies_with_surrogates_and_oversized(case, fuzz_world):
    """Every operation that takes a body, with the generated body changed: a lone surrogate in
    every string and as a key (400, never a 500), and one over API_MAX_BODY_BYTES (413 before
    it is read); both documented, both JSON. The raw bytes replace the generated body, which
    schemathesis itself cannot validate once it holds a surrogate."""
    import json

    from django.test import override_settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.core import NotSet
    from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

    if not list(case.operation.body) or case.method.upper() != case.operation.method.upper():
        return  # no body, or one of schemathesis' own wrong-method probes
    headers = {"Authorization": f"Token {fuzz_world}", "Content-Type": "application/json"}
    checks = [not_a_server_error, status_code_conformance, content_type_conformance]
    body = {} if isinstance(case.body, NotSet) else case.body
    raw = json.dumps(_with_surrogates(body)).encode()
    response = case.call_and_validate(headers=headers, checks=checks, data=raw)
    assert response.status_code in (400, 404), response.text  # 404: an id the fuzzer made up
    if response.status_code == 400:  # refused by the parser, before any view or database sees it
        assert response.json()["code"] == "invalid" and "surrogate" in response.json()["detail"]
    padded = {**(body if isinstance(body, dict) else {}), "padding": "x" * 5000}
    with override_settings(API_MAX_BODY_BYTES=4096):
        response = case.call_and_validate(
            headers=headers, checks=checks, data=json.dumps(padded, default=repr).encode()
        )
    assert response.status_code == 413, response.text
    assert response.json()["code"] == "request_too_large"
