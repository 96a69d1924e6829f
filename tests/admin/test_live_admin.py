"""Console: the task action "retry", webhooks of every user, deliveries with their attempts."""

from __future__ import annotations

from django.urls import reverse
from django.utils import timezone

from tasks.engine.states import COMPLETED, FAILED
from tasks.models import Task, Webhook, WebhookAttempt, WebhookDelivery
from tests.admin.conftest import changelist, post_action, report
from tests.conftest import make_task


def test_retry_action_asks_failed_tasks_again_and_skips_the_others(
    root_client, running_instance, provider, make_instance, alice
):
    failed = make_task(running_instance, task_type="stop", status=FAILED)
    other = make_instance(alice, provider)
    done = make_task(other, task_type="stop", status=COMPLETED)
    response = post_action(root_client, "task", "retry_selected", [failed.pk, done.pk])
    assert report(response) == (1, 1)
    retry = Task.objects.get(retry_of=failed)
    assert retry.status == "pending" and retry.task_type == "stop"
    assert not Task.objects.filter(retry_of=done).exists()
    page = root_client.get(reverse("admin:tasks_task_change", args=[retry.pk])).content.decode()
    assert "Retry of" in page


def test_operators_see_every_users_webhooks_and_each_attempt(root_client, alice, bob, running_instance):
    hook = Webhook(owner=alice, url="https://hooks.example.com/a", events=["task.completed"])
    hook.secret = "alice-secret"
    hook.save()
    other = Webhook(owner=bob, url="https://hooks.example.com/b", events=["task.failed"])
    other.secret = "bob-secret"
    other.save()
    listing = root_client.get(changelist("webhook")).content.decode()
    assert "hooks.example.com/a" in listing and "hooks.example.com/b" in listing
    assert "alice-secret" not in listing
    task = make_task(running_instance, status=COMPLETED)
    delivery = WebhookDelivery.objects.create(webhook=hook, task=task, event_id=1, event="task.completed", body="{}")
    WebhookAttempt.objects.create(delivery=delivery, ok=False, response_code=503, error="HTTP 503", at=timezone.now())
    page = root_client.get(reverse("admin:tasks_webhookdelivery_change", args=[delivery.pk])).content.decode()
    assert "503" in page and "HTTP 503" in page


def test_a_webhook_added_in_the_console_keeps_its_secret_encrypted(root_client, alice, settings):
    settings.WEBHOOK_ALLOW_PRIVATE_TARGETS = False
    url = reverse("admin:tasks_webhook_add")
    refused = root_client.post(
        url,
        {"owner": alice.pk, "url": "http://localhost:9/", "events": ["task.completed"], "secret": "s3cret-value"},
    )
    assert refused.status_code == 200 and "loopback" in refused.content.decode()
    response = root_client.post(
        url,
        {
            "owner": alice.pk,
            "url": "https://93.184.215.14/hook",
            "events": ["task.completed"],
            "secret": "s3cret-value",
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    hook = Webhook.objects.get(owner=alice)
    assert hook.secret == "s3cret-value" and "s3cret" not in hook.secret_encrypted


def test_send_again_puts_a_delivery_back_in_the_queue(root_client, alice, running_instance):
    hook = Webhook(owner=alice, url="https://hooks.example.com/a", events=["task.completed"])
    hook.secret = "x" * 10
    hook.save()
    task = make_task(running_instance, status=COMPLETED)
    delivery = WebhookDelivery.objects.create(
        webhook=hook, task=task, event_id=1, event="task.completed", body="{}", status=WebhookDelivery.FAILED
    )
    response = post_action(root_client, "webhookdelivery", "send_again", [delivery.pk])
    assert report(response) == (1, 0)
    delivery.refresh_from_db()
    assert delivery.status == WebhookDelivery.PENDING
