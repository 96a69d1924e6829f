"""The task timeline an operator reads: each step once."""

from __future__ import annotations

from collections import Counter

import pytest

from tasks import services
from tasks.engine.worker import run_admitted_inline
from tasks.models import TaskEvent


@pytest.mark.django_db
def test_a_create_maps_each_port_in_one_timeline_row(alice, provider):
    instance, task = services.create_instance(alice, provider=provider, image="debian-12")
    run_admitted_inline(provider.pk)
    steps = list(TaskEvent.objects.filter(task_id=task.pk, kind="step").values_list("message", flat=True))
    mapping = [m.split()[-1] for m in steps if m.startswith("mapping")]
    assert mapping, steps
    # One row per host port handle (pm-tcp-20000, ...), not the step and the driver's echo of it.
    assert all(n == 1 for n in Counter(mapping).values()), steps
