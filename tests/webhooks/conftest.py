from __future__ import annotations

import pytest

from tests.webhooks.receiver import Receiver


@pytest.fixture
def receiver():
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture
def private_ok(settings):
    """The local receiver is on 127.0.0.1: allowed only with WEBHOOK_ALLOW_PRIVATE_TARGETS."""
    settings.WEBHOOK_ALLOW_PRIVATE_TARGETS = True
    settings.WEBHOOK_BACKOFF_SCALE = 0.001
    settings.WEBHOOK_CONCURRENCY = 1
    return settings
