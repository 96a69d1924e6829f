"""Triage on the task list: the error column, why pending rows wait, the error-code,
finished-within and stuck filters (tasks/admin/triage.py)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from tasks.engine.states import ErrorCode
from tasks.models import Provider, TaskEvent
from tests.admin.conftest import change_url, changelist
from tests.conftest import make_task

LONG_ERROR = "the host refused the connection while creating the guest: " + "x" * 200 + " END"


def listed(response) -> list[int]:
    return [t.pk for t in response.context["cl"].result_list]


@pytest.fixture
def web(alice, provider, make_instance):
    return make_instance(alice, provider, name="web-1")


def finished(instance, status, *, ago, error_code="", error_message="", **fields):
    now = timezone.now()
    return make_task(
        instance,
        status=status,
        error_code=error_code,
        error_message=error_message,
        started_at=now - ago - timedelta(seconds=20),
        completed_at=now - ago,
        **fields,
    )


# ------------------------------------------------------------------ error column and bar


def test_error_column_shows_code_and_cut_message_with_full_text_on_hover(root_client, web):
    task = finished(
        web,
        "failed",
        ago=timedelta(minutes=3),
        error_code=ErrorCode.PROVIDER_ERROR,
        error_message=LONG_ERROR,
        status_message="cleanup: removing scratch volume",
    )
    html = root_client.get(changelist("task")).content.decode()
    assert "<code>provider_error</code>" in html
    assert f'title="provider_error: {LONG_ERROR}"' in html  # the full text on hover
    assert "the host refused the connection" in html
    # The red bar says why it failed, not the last cleanup step.
    bar = html.split(f'data-task-id="{task.pk}" data-role="progress"')[1].split("</div></div>")[0]
    assert "the host refused" in bar and "cleanup" not in bar


def test_completed_task_has_no_error(root_client, web):
    finished(web, "completed", ago=timedelta(minutes=3), status_message="done")
    html = root_client.get(changelist("task")).content.decode()
    assert "tc-error" not in html


# ------------------------------------------------------------------ filters


def test_error_code_filter(root_client, web):
    refused = finished(web, "failed", ago=timedelta(minutes=5), error_code=ErrorCode.PROVIDER_UNREACHABLE)
    finished(web, "failed", ago=timedelta(minutes=5), error_code=ErrorCode.PROVIDER_ERROR)
    stopped = finished(web, "cancelled", ago=timedelta(minutes=5), error_code=ErrorCode.FORCE_STOPPED)
    assert listed(root_client.get(changelist("task"), {"error_code": "provider_unreachable"})) == [refused.pk]
    assert listed(root_client.get(changelist("task"), {"error_code": "force_stopped"})) == [stopped.pk]
    assert listed(root_client.get(changelist("task"), {"error_code": "force_stopped", "state": "problem"})) == []


def test_finished_within_filter_orders_by_completion(root_client, web):
    a = finished(web, "failed", ago=timedelta(minutes=50), error_code=ErrorCode.PROVIDER_ERROR)
    b = finished(web, "completed", ago=timedelta(minutes=5))
    c = finished(web, "failed", ago=timedelta(minutes=10), error_code=ErrorCode.TIMEOUT)
    finished(web, "failed", ago=timedelta(hours=3), error_code=ErrorCode.PROVIDER_ERROR)
    make_task(web)  # pending: never finished
    # Newest finished first, whatever the creation order.
    assert listed(root_client.get(changelist("task"), {"finished": "1h"})) == [b.pk, c.pk, a.pk]
    assert listed(root_client.get(changelist("task"), {"finished": "15m"})) == [b.pk, c.pk]
    triage = root_client.get(changelist("task"), {"finished": "1h", "state": "problem"})
    assert listed(triage) == [c.pk, a.pk]
    both = root_client.get(changelist("task"), {"finished": "1h", "error_code": "provider_error"})
    assert listed(both) == [a.pk]
    assert len(listed(root_client.get(changelist("task"), {"finished": "24h"}))) == 4


def test_stuck_filter(root_client, web, settings):
    settings.STUCK_NO_PROGRESS_MINUTES = 10
    now = timezone.now()
    quiet = make_task(web, status="running", started_at=now - timedelta(minutes=30))
    busy = make_task(web, status="running", started_at=now - timedelta(minutes=30))
    TaskEvent.objects.create(task=busy, kind="step", from_status="running", to_status="running", at=now)
    make_task(web, status="running", started_at=now - timedelta(minutes=1))
    assert listed(root_client.get(changelist("task"), {"stuck": "yes"})) == [quiet.pk]


# ------------------------------------------------------------------ why pending rows wait


def test_pending_rows_say_why_they_wait_with_links(root_client, alice, provider, make_instance):
    holder_instance = make_instance(alice, provider, name="holder")
    holder = make_task(holder_instance, status="running", started_at=timezone.now())
    waiting = [make_task(make_instance(alice, provider)) for _ in range(4)]
    down = Provider.objects.create(name="sim-down", provider_type="simulated", unreachable_since=timezone.now())
    held = make_task(make_instance(alice, down))
    html = root_client.get(changelist("task")).content.decode()
    # The provider's one slot is held by the running task: "slot 1/1 (#holder), #4".
    assert f'<a href="{change_url("task", holder.pk)}">#{holder.pk}</a>' in html
    assert "slot 1/1" in html and ", #4</span>" in html and ", #1</span>" in html
    assert f'<a href="{change_url("provider", provider.pk)}">sim-a</a>' in html
    assert f'<a href="{change_url("provider", down.pk)}">sim-down</a> unreachable' in html
    assert {waiting[0].pk, held.pk} <= set(listed(root_client.get(changelist("task"))))


def test_wait_notes_take_a_fixed_number_of_queries(root_client, alice, provider, make_instance):
    def page_queries() -> int:
        with CaptureQueriesContext(connection) as ctx:
            assert root_client.get(changelist("task")).status_code == 200
        return len(ctx.captured_queries)

    inst = make_instance(alice, provider)
    make_task(inst, status="running", started_at=timezone.now())
    for _ in range(3):
        make_task(inst)
    few = page_queries()
    for _ in range(20):
        make_task(inst)
    assert page_queries() == few


def test_progress_json_gives_a_failed_tasks_error(root_client, web):
    task = finished(
        web,
        "failed",
        ago=timedelta(minutes=1),
        error_code=ErrorCode.PROVIDER_ERROR,
        error_message="disk full",
        status_message="cleanup",
    )
    data = root_client.get("/admin/tasks/task/progress/", {"ids": task.pk}).json()
    assert data[str(task.pk)]["status_message"] == "disk full"
