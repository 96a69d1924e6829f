"""Webhook delivery against a local receiver: signature, events, retries, redirects, SSRF refusals."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from tasks import services, webhooks
from tasks.engine import dispatch, transitions
from tasks.engine.states import COMPLETED, FAILED
from tasks.models import Webhook, WebhookAttempt, WebhookDelivery

SECRET = "receiver-shared-secret"


def hook_for(user, url, events=None) -> Webhook:
    hook = Webhook(owner=user, url=url, events=events or list(Webhook.EVENTS))
    hook.secret = SECRET
    hook.save()
    return hook


def run_task(user, instance, target=COMPLETED, task_type="stop"):
    task = services.request_operation(user, instance.pk, task_type)
    dispatch.admit(task.provider_id)
    task.refresh_from_db()
    assert transitions.claim(task.pk, token=task.lease_token, worker="test:1")
    assert transitions.finish(task.pk, target, token=task.lease_token, actor="worker:test:1")
    return task


def deliver_all(rounds: int = 1) -> None:
    for _ in range(rounds):
        webhooks.scan()
        webhooks.deliver_due()


def test_started_and_completed_arrive_signed_in_order(private_ok, receiver, alice, running_instance):
    hook = hook_for(alice, receiver.url)
    task = run_task(alice, running_instance)
    deliver_all()
    assert [json.loads(r.body)["event"] for r in receiver.received] == ["task.started", "task.completed"]
    for request in receiver.received:
        expected = "sha256=" + hmac.new(SECRET.encode(), request.body, hashlib.sha256).hexdigest()
        assert request.headers["X-Webhook-Signature"] == expected
        assert request.headers["Content-Type"] == "application/json"
        body = json.loads(request.body)
        assert set(body) == {"event", "task"} and body["task"]["id"] == task.pk
        assert request.headers["X-Webhook-Event"] == body["event"]
    assert WebhookDelivery.objects.filter(webhook=hook, status="delivered").count() == 2
    assert WebhookAttempt.objects.filter(ok=True, response_code=200).count() == 2
    deliver_all()
    assert len(receiver.received) == 2, "a delivered event is not sent again"


def test_only_subscribed_events_and_only_the_owners_tasks(private_ok, receiver, alice, bob, provider, make_instance):
    hook_for(alice, receiver.url, events=["task.failed"])
    run_task(alice, make_instance(alice, provider))  # completed: not subscribed
    run_task(bob, make_instance(bob, provider), FAILED)  # someone else's
    failed = run_task(alice, make_instance(alice, provider), FAILED)
    deliver_all()
    assert [(json.loads(r.body)["event"], json.loads(r.body)["task"]["id"]) for r in receiver.received] == [
        ("task.failed", failed.pk)
    ]


def test_failures_are_retried_with_backoff_and_each_attempt_logged(private_ok, receiver, alice, running_instance):
    private_ok.WEBHOOK_BACKOFF_SCALE = 1.0
    hook_for(alice, receiver.url, events=["task.completed"])
    receiver.codes = [500, 503]
    run_task(alice, running_instance)
    deliver_all()
    delivery = WebhookDelivery.objects.get()
    assert delivery.status == "pending" and delivery.attempts == 1 and delivery.last_response_code == 500
    assert timedelta(seconds=9) < delivery.next_attempt_at - delivery.last_attempt_at <= timedelta(seconds=11)
    deliver_all()
    assert len(receiver.received) == 1, "not due yet"
    WebhookDelivery.objects.update(next_attempt_at=timezone.now())
    deliver_all()
    delivery.refresh_from_db()
    assert delivery.attempts == 2 and delivery.last_response_code == 503
    assert timedelta(seconds=29) < delivery.next_attempt_at - delivery.last_attempt_at <= timedelta(seconds=31)
    WebhookDelivery.objects.update(next_attempt_at=timezone.now())
    deliver_all()
    delivery.refresh_from_db()
    assert delivery.status == "delivered" and delivery.attempts == 3
    log = list(WebhookAttempt.objects.order_by("id").values_list("ok", "response_code", "error"))
    assert log == [(False, 500, "HTTP 500"), (False, 503, "HTTP 503"), (True, 200, "")]
    bodies = {r.body for r in receiver.received}
    assert len(bodies) == 1, "every retry sends the same body (and signature)"
    assert len({r.headers["X-Webhook-Delivery"] for r in receiver.received}) == 1


def test_a_redirect_is_not_followed(private_ok, receiver, alice, running_instance):
    hook_for(alice, receiver.url, events=["task.completed"])
    receiver.codes = [302]
    receiver.redirect_to = f"http://127.0.0.1:{receiver.port}/elsewhere"
    run_task(alice, running_instance)
    deliver_all()
    assert [r.path for r in receiver.received] == ["/hook"]
    delivery = WebhookDelivery.objects.get()
    assert delivery.status == "pending" and delivery.last_error == "HTTP 302"


def test_a_name_resolving_to_loopback_is_refused_at_delivery(settings, receiver, alice, running_instance):
    """The webhook was saved while allowed (or its DNS changed since): every attempt checks again."""
    settings.WEBHOOK_ALLOW_PRIVATE_TARGETS = False
    settings.WEBHOOK_CONCURRENCY = 1
    hook_for(alice, f"http://localhost:{receiver.port}/hook", events=["task.completed"])
    run_task(alice, running_instance)
    deliver_all()
    assert receiver.received == []
    attempt = WebhookAttempt.objects.get()
    assert not attempt.ok and attempt.response_code is None
    assert attempt.error.startswith("refused: localhost resolves to 127.0.0.1") or "::1" in attempt.error


def test_the_connection_goes_to_the_address_that_was_checked(private_ok, receiver, monkeypatch):
    """No second DNS lookup between the check and the connect (rebinding): post() dials the checked address."""
    calls = []
    real = webhooks.resolve

    def resolve(host, port):
        calls.append(host)
        return real("127.0.0.1", port) if host == "hooks.test" else real(host, port)

    monkeypatch.setattr(webhooks, "resolve", resolve)
    code = webhooks.post(f"http://hooks.test:{receiver.port}/hook", b"{}", {"Content-Type": "application/json"})
    assert code == 200 and calls == ["hooks.test"]
    assert receiver.received[0].headers["Host"] == f"hooks.test:{receiver.port}"


def test_a_receiver_that_is_down_costs_one_attempt_per_round(private_ok, receiver, alice, provider, make_instance):
    hook_for(alice, receiver.url, events=["task.completed"])
    for _ in range(3):
        run_task(alice, make_instance(alice, provider))
    receiver.stop()
    deliver_all()
    assert WebhookAttempt.objects.count() == 1, "the other deliveries wait for the next try"
    assert WebhookDelivery.objects.filter(status="pending").count() == 3
    receiver.start()
    private_ok.WEBHOOK_BACKOFF_SCALE = 0.0001
    WebhookDelivery.objects.update(next_attempt_at=timezone.now())
    deliver_all()
    assert len(receiver.received) == 3
    assert WebhookDelivery.objects.filter(status="delivered").count() == 3


def test_given_up_after_the_retry_window(private_ok, receiver, alice, running_instance):
    hook_for(alice, receiver.url, events=["task.completed"])
    receiver.codes = [500]
    run_task(alice, running_instance)
    webhooks.scan()
    WebhookDelivery.objects.update(created_at=timezone.now() - timedelta(seconds=private_ok.WEBHOOK_RETRY_SECONDS))
    webhooks.deliver_due()
    assert WebhookDelivery.objects.get().status == "failed"


def test_events_before_the_webhook_existed_are_not_sent(private_ok, receiver, alice, provider, make_instance):
    run_task(alice, make_instance(alice, provider))
    hook = hook_for(alice, receiver.url, events=["task.completed"])
    Webhook.objects.filter(pk=hook.pk).update(created_at=timezone.now() + timedelta(milliseconds=1))
    deliver_all()
    assert receiver.received == []
    later = run_task(alice, make_instance(alice, provider))
    Webhook.objects.filter(pk=hook.pk).update(created_at=timezone.now() - timedelta(seconds=5))
    deliver_all()
    assert [json.loads(r.body)["task"]["id"] for r in receiver.received] == [later.pk]


def test_a_second_scan_never_doubles_a_delivery(private_ok, receiver, alice, running_instance):
    hook_for(alice, receiver.url)
    run_task(alice, running_instance)
    assert webhooks.scan() == 2
    assert webhooks.scan() == 0  # the young events are read again, but their deliveries exist
    assert WebhookDelivery.objects.count() == 2


def test_the_command_runs_one_round(private_ok, receiver, alice, running_instance, capsys):
    hook_for(alice, receiver.url, events=["task.completed"])
    run_task(alice, running_instance)
    call_command("deliver_webhooks", "--once")
    assert "1 delivery(ies) queued, 1 attempt(s) made" in capsys.readouterr().out
    assert len(receiver.received) == 1


def test_a_disabled_webhook_gets_nothing(private_ok, receiver, alice, running_instance):
    hook = hook_for(alice, receiver.url)
    Webhook.objects.filter(pk=hook.pk).update(enabled=False)
    run_task(alice, running_instance)
    deliver_all()
    assert receiver.received == []


@pytest.mark.parametrize("attempts, seconds", [(1, 10), (2, 30), (5, 300), (9, 3600), (30, 3600)])
def test_backoff_schedule(settings, attempts, seconds):
    settings.WEBHOOK_BACKOFF_SCALE = 1.0
    assert webhooks.backoff(attempts) == timedelta(seconds=seconds)
