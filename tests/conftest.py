"""Shared fixtures: personas alice and bob (users), root (staff), a provider, instances."""

from __future__ import annotations

import pytest
from django.conf import settings as dj_settings
from django.contrib.auth import get_user_model

from tasks.models import Instance, Provider, Task
from tasks.states import InstanceStatus

IS_MYSQL = dj_settings.DATABASES["default"]["ENGINE"].endswith("mysql")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs MariaDB/MySQL: run with DATABASE_URL=mysql://...")
    for item in items:
        if "mariadb" in item.keywords and not IS_MYSQL:
            item.add_marker(skip)


@pytest.fixture
def alice(db):
    return get_user_model().objects.create_user("alice", "alice@example.com", "alice-pass-123")


@pytest.fixture
def bob(db):
    return get_user_model().objects.create_user("bob", "bob@example.com", "bob-pass-123")


@pytest.fixture
def root(db):
    return get_user_model().objects.create_user(
        "root", "root@example.com", "root-pass-123", is_staff=True, is_superuser=True
    )


@pytest.fixture
def provider(db):
    return Provider.objects.create(name="sim-a", provider_type="simulated")


@pytest.fixture
def make_instance(db):
    def make(owner, provider, *, status=InstanceStatus.RUNNING, name=None, **fields):
        n = Instance.objects.count() + 1
        name = name or f"vm-{n}"
        return Instance.objects.create(
            owner=owner, provider=provider, name=name, live_name=name, image="debian/12", status=status, **fields
        )

    return make


@pytest.fixture
def running_instance(alice, provider, make_instance):
    return make_instance(alice, provider)


def make_task(instance, *, task_type="start", status="pending", **fields) -> Task:
    """A task in any state, written directly (test set-up only)."""
    task = Task.objects.create(
        task_type=task_type,
        owner_id=instance.owner_id,
        initiator_id=instance.owner_id,
        provider_id=instance.provider_id,
        instance=instance,
        **fields,
    )
    if status != "pending":
        Task.objects.filter(pk=task.pk).update(status=status)
        task.refresh_from_db()
    return task
