"""/api/v1/webhooks/: the caller's webhooks, their validation and SSRF refusals."""

from __future__ import annotations

import pytest

from tasks.models import Webhook, WebhookDelivery
from tests.conftest import make_task

SECRET = "a-long-enough-secret"


def create(client, **body):
    return client.post("/api/v1/webhooks/", {"secret": SECRET, **body}, format="json")


def test_create_list_and_delete(as_alice, as_bob, alice, settings):
    settings.WEBHOOK_ALLOW_PRIVATE_TARGETS = False
    response = create(as_alice, url="https://93.184.215.14/hooks", events=["task.completed", "task.failed"])
    assert response.status_code == 201, response.json()
    body = response.json()
    assert set(body) == {"id", "url", "events", "enabled", "created_at"}
    assert body["events"] == ["task.completed", "task.failed"] and body["enabled"] is True
    hook = Webhook.objects.get(pk=body["id"])
    assert hook.owner == alice and hook.secret == SECRET and SECRET not in hook.secret_encrypted
    listing = as_alice.get("/api/v1/webhooks/").json()
    assert listing["count"] == 1 and listing["results"][0]["url"] == "https://93.184.215.14/hooks"
    assert "secret" not in listing["results"][0]
    assert as_bob.get("/api/v1/webhooks/").json()["count"] == 0
    assert as_bob.get(f"/api/v1/webhooks/{hook.pk}/").status_code == 404
    assert as_bob.delete(f"/api/v1/webhooks/{hook.pk}/").status_code == 404
    assert as_alice.delete(f"/api/v1/webhooks/{hook.pk}/").status_code == 204
    assert not Webhook.objects.exists()


def test_events_default_to_all(as_alice, settings):
    settings.WEBHOOK_ALLOW_PRIVATE_TARGETS = True
    body = create(as_alice, url="http://127.0.0.1:9/x").json()
    assert body["events"] == ["task.started", "task.completed", "task.failed", "task.timeout", "task.cancelled"]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"url": "ftp://example.com/x"}, "url"),
        ({"url": "not a url"}, "url"),
        ({"url": "https://user:pw@example.com/"}, "url"),
        ({"url": "https://example.com:99999/"}, "url"),
        ({}, "url"),
        ({"url": "https://93.184.215.14/", "events": ["task.exploded"]}, "events"),
        ({"url": "https://93.184.215.14/", "events": []}, "events"),
        ({"url": "https://93.184.215.14/", "secret": "short"}, "secret"),
    ],
)
def test_bad_input_is_400_naming_the_field(as_alice, body, field, settings):
    settings.WEBHOOK_ALLOW_PRIVATE_TARGETS = False
    response = create(as_alice, **body)
    assert response.status_code == 400, response.json()
    assert response.json()["field"].split(".")[0] == field


@pytest.mark.parametrize(
    "url, address",
    [
        ("http://localhost:8080/hook", "127.0.0.1"),  # a name that resolves to loopback
        ("http://127.0.0.1/hook", "127.0.0.1"),
        ("http://[::1]/hook", "::1"),
        ("http://10.1.2.3/hook", "10.1.2.3"),
        ("http://192.168.0.10/hook", "192.168.0.10"),
        ("http://169.254.169.254/latest/meta-data", "169.254.169.254"),  # link-local (cloud metadata)
        ("http://100.64.0.1/", "100.64.0.1"),  # shared address space
    ],
)
def test_private_targets_are_refused(as_alice, url, address, settings):
    settings.WEBHOOK_ALLOW_PRIVATE_TARGETS = False
    response = create(as_alice, url=url)
    assert response.status_code == 400 and response.json()["field"] == "url"
    assert address in response.json()["detail"]
    assert not Webhook.objects.exists()


def test_private_targets_allowed_when_configured(as_alice, settings):
    settings.WEBHOOK_ALLOW_PRIVATE_TARGETS = True
    assert create(as_alice, url="http://localhost:8080/hook").status_code == 201


def test_a_name_that_does_not_resolve_is_refused(as_alice, settings):
    settings.WEBHOOK_ALLOW_PRIVATE_TARGETS = False
    response = create(as_alice, url="https://no-such-host.invalid/hook")
    assert response.status_code == 400 and response.json()["field"] == "url"


def test_per_user_limit(as_alice, settings):
    settings.WEBHOOK_ALLOW_PRIVATE_TARGETS = True
    settings.WEBHOOKS_PER_USER = 2
    assert create(as_alice, url="http://127.0.0.1:9/a").status_code == 201
    assert create(as_alice, url="http://127.0.0.1:9/b").status_code == 201
    response = create(as_alice, url="http://127.0.0.1:9/c")
    assert response.status_code == 409 and response.json()["code"] == "quota_exceeded"


def test_anonymous_is_401(anon):
    assert anon.get("/api/v1/webhooks/").status_code == 401
    assert anon.post("/api/v1/webhooks/", {}, format="json").status_code == 401


def test_deliveries_of_a_webhook(as_alice, as_bob, alice, running_instance):
    hook = Webhook(owner=alice, url="https://93.184.215.14/", events=["task.completed"])
    hook.secret = SECRET
    hook.save()
    task = make_task(running_instance, status="completed")
    WebhookDelivery.objects.create(webhook=hook, task=task, event_id=7, event="task.completed", body="{}")
    rows = as_alice.get(f"/api/v1/webhooks/{hook.pk}/deliveries/").json()["results"]
    assert [(r["event"], r["task"], r["status"]) for r in rows] == [("task.completed", task.pk, "pending")]
    assert as_bob.get(f"/api/v1/webhooks/{hook.pk}/deliveries/").status_code == 404
