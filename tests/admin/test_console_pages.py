"""Issue 23, the console's pages: what an operator sees on a task, an instance and a
provider page, and what the console's actions leave in Django's admin log."""

from __future__ import annotations

from django.utils import timezone

from tasks.models import Provider
from tests.admin.conftest import change_url
from tests.conftest import make_task


def test_a_held_providers_pending_task_has_no_wait_estimate(root_client, running_instance, provider):
    make_task(running_instance, status="running")
    task = make_task(running_instance)
    Provider.objects.filter(pk=provider.pk).update(unreachable_since=timezone.now(), unreachable_error="refused")
    html = root_client.get(change_url("task", task.pk)).content.decode()
    assert "wait unknown while the provider is unreachable" in html
    assert "to wait" not in html
