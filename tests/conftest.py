"""Shared fixtures: personas alice and bob (users), root (staff), a provider, instances."""

from __future__ import annotations

import pytest
from django.conf import settings as dj_settings
from django.contrib.auth import get_user_model
from django.utils import translation

from providers.simulated import SimulatedStore
from tasks.engine.states import InstanceStatus
from tasks.models import Instance, Provider, Task

IS_MYSQL = dj_settings.DATABASES["default"]["ENGINE"].endswith("mysql")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs MariaDB/MySQL: run with DATABASE_URL=mysql://...")
    for item in items:
        if "mariadb" in item.keywords and not IS_MYSQL:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    # Every persona is created with a password; the default hasher costs ~0.3 s each.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def _login_throttle_in_memory(settings, monkeypatch):
    # Counters of the login throttle per test, never in the shared file cache of ./var
    # (parallel test processes and earlier runs would add up).
    import time
    import uuid

    from tasks.api import throttle

    settings.CACHES = {
        **settings.CACHES,
        "throttle": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": uuid.uuid4().hex},
    }
    # One fixed window per test: a slow test (shared machine) that crossed a minute
    # would find its counters reset. A test of the window's end moves the clock itself.
    pinned = time.time() // 3600 * 3600 + 30
    monkeypatch.setattr(throttle, "_now", lambda: pinned)


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


@pytest.fixture(autouse=True)
def _language_reset():
    """A request in Chinese leaves Chinese active in the thread (LocaleMiddleware does not
    reset it); the next test starts from LANGUAGE_CODE again."""
    yield
    translation.deactivate()


@pytest.fixture(autouse=True)
def _simulated_sandbox(tmp_path, settings, monkeypatch):
    """Each test gets its own simulated host (state file), short delays and retry waits."""
    monkeypatch.setenv("SIMULATED_STATE_DIR", str(tmp_path / "simulated"))
    settings.SIMULATED_SPEED = min(settings.SIMULATED_SPEED, 0.01)
    settings.TASK_RETRY_BASE_SECONDS = 0.01


# Instance status -> the guest a simulated host holds for it (none for the others).
_GUEST_STATUS = {
    InstanceStatus.RUNNING: "running",
    InstanceStatus.STOPPED: "stopped",
    InstanceStatus.ERROR: "stopped",
    InstanceStatus.UNKNOWN: "stopped",
}


@pytest.fixture
def make_instance(db):
    def make(owner, provider, *, status=InstanceStatus.RUNNING, name=None, **fields):
        n = Instance.objects.count() + 1
        name = name or f"vm-{n}"
        instance = Instance.objects.create(
            owner=owner, provider=provider, name=name, live_name=name, image="debian/12", status=status, **fields
        )
        if provider.provider_type == "simulated" and status in _GUEST_STATUS:
            # The instance's guest exists on the simulated host, as it would on a real one.
            SimulatedStore.for_provider(provider.pk, provider.connection).put_guest(
                instance.guest_name, status=_GUEST_STATUS[status], instance_type=instance.instance_type
            )
        return instance

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
