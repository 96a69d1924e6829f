"""API fixtures: token clients for the personas, and a little world of tasks."""

from __future__ import annotations

import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from tasks.models import Provider


def client_for(user) -> APIClient:
    client = APIClient()
    if user is not None:
        token, _ = Token.objects.get_or_create(user=user)
        client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


@pytest.fixture
def anon(db) -> APIClient:
    return APIClient()


@pytest.fixture
def as_alice(alice) -> APIClient:
    return client_for(alice)


@pytest.fixture
def as_bob(bob) -> APIClient:
    return client_for(bob)


@pytest.fixture
def as_root(root) -> APIClient:
    return client_for(root)


@pytest.fixture
def provider_b(db) -> Provider:
    return Provider.objects.create(
        name="sim-b", provider_type="simulated", allow_concurrent_tasks=True, max_concurrent_tasks=3
    )


@pytest.fixture(autouse=True)
def fresh_queue_estimates():
    # Average durations are remembered per provider id for a few seconds; ids repeat
    # across tests, so each test starts without them.
    from tasks.api import queueinfo

    queueinfo.clear_cache()
    yield
    queueinfo.clear_cache()
