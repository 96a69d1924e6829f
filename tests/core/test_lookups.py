"""owner_in: long integer id lists written into the SQL, exactly as owner_id__in would select."""

from __future__ import annotations

import pytest

from tasks import lookups
from tasks.lookups import owner_in
from tasks.models import Task
from tests.conftest import make_task


@pytest.fixture
def tasks_of_two(alice, bob, provider, make_instance):
    return [make_task(make_instance(owner, provider)) for owner in (alice, bob, alice)]


def test_selects_what_owner_id_in_selects(tasks_of_two, alice, bob, monkeypatch):
    for ids in ([alice.pk], [bob.pk], [alice.pk, bob.pk], [alice.pk, 10**9]):
        expected = set(Task.objects.filter(owner_id__in=ids).values_list("id", flat=True))
        assert set(Task.objects.filter(owner_in(ids)).values_list("id", flat=True)) == expected
    # In OR'ed lists of at most IN_CHUNK ids.
    monkeypatch.setattr(lookups, "IN_CHUNK", 1)
    query = Task.objects.filter(owner_in([alice.pk, bob.pk]))
    assert str(query.query).count(" IN (") == 2 and query.count() == 3


def test_no_ids_select_nothing(tasks_of_two):
    assert not Task.objects.filter(owner_in([])).exists()
    assert Task.objects.exclude(owner_in([])).count() == 3


def test_only_integers_reach_the_sql():
    assert "IN (7)" in str(Task.objects.filter(owner_in(["7"])).query)
    with pytest.raises(ValueError):
        owner_in(["1) OR (1=1"])
