"""manage.py check_provider on the simulated provider: the answer, and a held queue resumed."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from tasks.engine import health
from tasks.models import Provider


def run(*args) -> str:
    out = StringIO()
    call_command("check_provider", *args, stdout=out)
    return out.getvalue()


def test_a_host_that_answers_resumes_its_held_queue(provider):
    assert "OK" in run(str(provider.pk)) and "resumes" not in run(str(provider.pk))
    health.mark_unreachable(provider.pk, "cannot connect")
    out = run(str(provider.pk))
    assert "it was held as unreachable: its queue resumes" in out
    assert Provider.objects.get(pk=provider.pk).unreachable_since is None


def test_a_host_that_is_down_is_named_and_stays_held(provider):
    provider.connection = {"unreachable": True}
    provider.save(update_fields=["connection"])
    health.mark_unreachable(provider.pk, "cannot connect")
    with pytest.raises(CommandError, match="unreachable: server_info: cannot connect"):
        run(str(provider.pk))
    assert Provider.objects.get(pk=provider.pk).unreachable_since is not None
