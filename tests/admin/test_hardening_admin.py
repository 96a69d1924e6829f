"""The console refuses forged selections without a 500, and never shows a secret back (issue 18, items 7, 8)."""

from __future__ import annotations

import pytest

from tasks.models import Provider, Task
from tests.admin.conftest import change_url, changelist, messages_of
from tests.admin.test_provider_admin import form_data
from tests.conftest import make_task

FORGED = ["abc", "", "1.5", "1" * 30, "-1", "0", "１"]  # the last one: a full-width digit


@pytest.mark.parametrize("forged", FORGED)
@pytest.mark.parametrize(
    ("model", "action", "extra"),
    [
        ("task", "cancel_selected", {}),
        ("task", "cancel_selected", {"confirm": "cancel_selected", "reason": "x"}),  # the confirmation page's POST
        ("task", "force_stop_selected", {"confirm": "force_stop_selected", "reason": "x"}),
        ("instance", "stop_instances", {}),
        ("instance", "delete_instances", {"confirm": "delete_instances"}),
        ("provider", "check_connectivity", {}),
        ("worker", "delete_stale", {}),
    ],
)
def test_a_forged_selection_is_refused_with_a_message(root_client, running_instance, model, action, extra, forged):
    task = make_task(running_instance)
    real = running_instance.pk if model == "instance" else task.pk
    data = {"action": action, "_selected_action": [str(real), forged], "index": "0", **extra}
    response = root_client.post(changelist(model), data, follow=True)
    assert response.status_code == 200
    assert any("invalid id" in m for m in messages_of(response)), messages_of(response)
    assert Task.objects.get(pk=task.pk).status == "pending"
    assert Task.objects.count() == 1


def test_valid_selections_still_work(root_client, running_instance):
    task = make_task(running_instance)
    data = {"action": "cancel_selected", "_selected_action": [str(task.pk)], "confirm": "cancel_selected"}
    root_client.post(changelist("task"), {**data, "reason": "maintenance"}, follow=True)
    assert Task.objects.get(pk=task.pk).status == "cancelled"


def test_the_set_secrets_field_never_shows_the_secret_again(root_client, provider):
    # A valid secret with an error elsewhere in the form: the page comes back without it.
    data = form_data(provider, new_secrets='{"token": "tok-SECRET-2"}', port_range_start=30000, port_range_end=20000)
    response = root_client.post(change_url("provider", provider.pk), data)
    assert response.status_code == 200  # the form again, with the port range error
    assert response.context["adminform"].form.errors
    assert "tok-SECRET-2" not in response.content.decode()
    # An invalid secret is not shown either.
    response = root_client.post(change_url("provider", provider.pk), form_data(provider, new_secrets="pw-LEAK-3{"))
    assert "not valid JSON" in response.content.decode()
    assert "pw-LEAK-3" not in response.content.decode()
    assert Provider.objects.get(pk=provider.pk).get_secrets() == {}
