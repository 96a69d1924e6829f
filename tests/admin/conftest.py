"""Console personas: root (superuser, from tests/conftest.py), operator (staff who may view,
cancel and act on instances, but not force-stop), and helpers to drive admin actions."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.contrib.messages import get_messages
from django.urls import reverse

OPERATOR_PERMS = (
    "view_task",
    "change_task",
    "view_instance",
    "change_instance",
    "view_provider",
    "change_provider",
)


@pytest.fixture
def operator(db):
    user = get_user_model().objects.create_user("operator", "op@example.com", "operator-pass-123", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(content_type__app_label="tasks", codename__in=OPERATOR_PERMS))
    return user


@pytest.fixture
def root_client(client, root):
    client.force_login(root)
    return client


@pytest.fixture
def operator_client(client, operator):
    client.force_login(operator)
    return client


def changelist(model: str) -> str:
    return reverse(f"admin:tasks_{model}_changelist")


def change_url(model: str, pk: int) -> str:
    return reverse(f"admin:tasks_{model}_change", args=[pk])


def post_action(client, model: str, action: str, ids, **extra):
    """Post an action the way the changelist form does (follows the redirect)."""
    data = {"action": action, "_selected_action": [str(i) for i in ids], "index": "0", **extra}
    return client.post(changelist(model), data, follow=True)


def confirm_action(client, model: str, action: str, ids, **fields):
    """The second step of an action with a confirmation page."""
    data = {"action": action, "_selected_action": [str(i) for i in ids], "confirm": action, **fields}
    return client.post(changelist(model), data, follow=True)


def messages_of(response) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


def report(response) -> tuple[int, int]:
    """(done, skipped) from the action's report message."""
    for text in messages_of(response):
        found = re.search(r"(\d+) done, (\d+) skipped", text)
        if found:
            return int(found.group(1)), int(found.group(2))
    raise AssertionError(f"no report among {messages_of(response)}")
