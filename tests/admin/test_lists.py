"""Lists at a million rows (tasks.admin.lists): ids first, counts that do not scan,
searches through the small tables, no facet counts on the big lists. These check
what an operator sees (rows, order, counts, pages); tests/admin/test_list_plans.py
checks the query plans on MariaDB."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from tasks import stats
from tasks.admin import lists
from tasks.admin.other_admin import TaskEventAdmin
from tasks.admin.task_admin import TaskAdmin
from tasks.models import PortMapping, Task, TaskEvent, UserQuota
from tests.admin.conftest import changelist
from tests.conftest import make_task

AGE_COLUMN = 1 + TaskAdmin.list_display.index("age_col")  # ?o= counts the action checkbox as 0


def sql_of(query) -> str:
    """A captured query with SQLite's quoting (MariaDB quotes names with backticks)."""
    return query["sql"].replace("`", '"')


def listed(response) -> list[int]:
    assert response.status_code == 200, response
    return [obj.pk for obj in response.context["cl"].result_list]


@pytest.fixture
def many_tasks(alice, bob, provider, make_instance):
    """47 tasks, several sharing a creation time (ties are broken by id)."""
    web, db_vm = make_instance(alice, provider, name="web-1"), make_instance(bob, provider, name="db-vm")
    start = timezone.now() - timedelta(hours=1)
    tasks = []
    for n in range(47):
        instance = web if n % 3 else db_vm
        status = "completed" if n % 5 else "failed"
        tasks.append(make_task(instance, status=status, created_at=start + timedelta(seconds=n // 2)))
    return tasks


def newest_first(tasks) -> list[int]:
    return [t.pk for t in sorted(tasks, key=lambda t: (t.created_at, t.pk), reverse=True)]


@pytest.fixture
def small_pages(monkeypatch):
    monkeypatch.setattr(TaskAdmin, "list_per_page", 10)


# ------------------------------------------------------------------ paging


def test_pages_follow_created_at_then_id_newest_first(root_client, many_tasks, small_pages):
    expected = newest_first(many_tasks)
    pages = [listed(root_client.get(changelist("task"), {"p": p})) for p in range(1, 6)]
    assert [pk for page in pages for pk in page] == expected
    assert [len(page) for page in pages] == [10, 10, 10, 10, 7]


def test_oldest_first_keeps_the_tie_breaker_in_the_same_direction(root_client, many_tasks, small_pages):
    response = root_client.get(changelist("task"), {"o": str(AGE_COLUMN)})
    assert listed(response) == newest_first(many_tasks)[::-1][:10]
    assert listed(root_client.get(changelist("task"), {"o": f"-{AGE_COLUMN}"})) == newest_first(many_tasks)[:10]


def test_only_the_age_column_sorts(root_client, many_tasks):
    html = root_client.get(changelist("task")).content.decode()
    assert html.count('class="sortable') == 1  # sorting by status or owner would sort the whole table


def test_the_page_query_reads_ids_alone_then_the_rows_with_their_joins(root_client, many_tasks, small_pages):
    with CaptureQueriesContext(connection) as ctx:
        response = root_client.get(changelist("task"), {"p": 2})
    assert listed(response) == newest_first(many_tasks)[10:20]
    task_queries = [sql_of(q) for q in ctx.captured_queries if 'FROM "tasks_task"' in sql_of(q)]
    ids = [sql for sql in task_queries if "LIMIT 10 OFFSET 10" in sql]
    assert len(ids) == 1 and "JOIN" not in ids[0] and ids[0].startswith('SELECT "tasks_task"."id" AS "pk" FROM')
    rows = [sql for sql in task_queries if "INNER JOIN" in sql]
    assert len(rows) == 1 and "LIMIT" not in rows[0] and '"tasks_task"."id" IN (' in rows[0]


def test_pages_past_the_middle_are_read_from_the_other_end(root_client, many_tasks, small_pages, monkeypatch):
    # An exact count (the statistics base answers it on big tables): the last pages
    # read the index the other way and give the same rows in the same order.
    monkeypatch.setattr(TaskAdmin, "exact_count", lambda self, request, cl: Task.objects.count())
    expected = newest_first(many_tasks)
    for page, rows in ((4, expected[30:40]), (5, expected[40:47])):
        with CaptureQueriesContext(connection) as ctx:
            assert listed(root_client.get(changelist("task"), {"p": page})) == rows
        ascending = [sql_of(q) for q in ctx.captured_queries if 'ORDER BY "tasks_task"."created_at" ASC' in sql_of(q)]
        assert len(ascending) == 1


def test_a_count_from_the_statistics_base_is_exact(root_client, many_tasks, monkeypatch):
    monkeypatch.setattr(stats, "SMALL_TABLE", 10)  # the base is kept above this many rows
    stats.reset_cache()
    with CaptureQueriesContext(connection) as ctx:
        response = root_client.get(changelist("task"), {"status__exact": "failed"})
    failed = sum(1 for t in many_tasks if t.status == "failed")
    assert response.context["cl"].result_count == failed and response.context["cl"].result_count.exact
    assert f"{failed} tasks" in response.content.decode()
    assert not [q for q in ctx.captured_queries if sql_of(q).startswith("SELECT COUNT(*)")]


def test_other_filters_get_a_bounded_count_shown_as_a_lower_bound(root_client, many_tasks, monkeypatch):
    monkeypatch.setattr(TaskAdmin, "list_per_page", 5)
    monkeypatch.setattr(TaskAdmin, "count_limit", 10)
    provider = many_tasks[0].provider_id
    with CaptureQueriesContext(connection) as ctx:
        response = root_client.get(changelist("task"), {"provider__id__exact": provider})
    cl = response.context["cl"]
    # page 1: up to (1 + 5) pages of 5 are counted, the rest is "30+"
    assert (int(cl.result_count), cl.result_count.exact, str(cl.result_count)) == (30, False, "30+")
    assert "30+ tasks" in response.content.decode()
    count = next(sql_of(q) for q in ctx.captured_queries if sql_of(q).startswith("SELECT COUNT(*)"))
    assert "LIMIT 31" in count
    # deeper pages count further, up to the real total
    response = root_client.get(changelist("task"), {"provider__id__exact": provider, "p": 8})
    assert (int(response.context["cl"].result_count), response.context["cl"].result_count.exact) == (47, True)
    assert listed(response) == newest_first(many_tasks)[35:40]
    # past the last page: the admin's "invalid parameters" redirect, not a 500
    assert root_client.get(changelist("task"), {"provider__id__exact": provider, "p": 11}).status_code == 302


def test_a_bounded_count_stops_at_its_ceiling(root_client, many_tasks, monkeypatch):
    monkeypatch.setattr(TaskAdmin, "list_per_page", 5)
    monkeypatch.setattr(TaskAdmin, "count_limit", 10)
    monkeypatch.setattr(TaskAdmin, "count_ceiling", 20)
    provider = many_tasks[0].provider_id
    response = root_client.get(changelist("task"), {"provider__id__exact": provider, "p": 4})
    assert str(response.context["cl"].result_count) == "20+"
    assert listed(response) == newest_first(many_tasks)[15:20]
    # deeper than the ceiling: narrow the filter (the admin's invalid-parameters page)
    assert root_client.get(changelist("task"), {"provider__id__exact": provider, "p": 5}).status_code == 302


def test_show_counts_is_off_on_the_task_and_event_lists(root_client, many_tasks):
    for model in ("task", "taskevent", "instance", "portmapping"):
        response = root_client.get(changelist(model), {"_facets": "True"})
        assert response.status_code == 200
        assert not response.context["cl"].add_facets
        assert "Show counts" not in response.content.decode()
    workers = root_client.get(changelist("worker"), {"_facets": "True"})
    assert workers.context["cl"].add_facets  # a few rows: cheap


# ------------------------------------------------------------------ search


@pytest.mark.parametrize(
    ("term", "owner_or_instance"),
    [("bob", "db-vm"), ("ALI", "web-1"), ("web-1", "web-1"), ("db-v", "db-vm")],
)
def test_search_by_username_or_instance_name(root_client, many_tasks, term, owner_or_instance):
    expected = [pk for pk in newest_first(many_tasks) if Task.objects.get(pk=pk).instance.name == owner_or_instance]
    assert listed(root_client.get(changelist("task"), {"q": term})) == expected[:50]


def test_search_resolves_users_in_their_table_first(root_client, many_tasks):
    with CaptureQueriesContext(connection) as ctx:
        root_client.get(changelist("task"), {"q": "bob"})
    task_queries = [sql_of(q) for q in ctx.captured_queries if 'FROM "tasks_task"' in sql_of(q)]
    ids = next(sql for sql in task_queries if "LIMIT 50" in sql)
    assert "auth_user" not in ids and "LIKE" not in ids  # owner_id IN (...), no join to test a LIKE


def test_a_term_matching_too_many_users_is_joined_and_still_right(root_client, many_tasks, monkeypatch):
    monkeypatch.setattr(lists, "MATCH_LIMIT", 0)
    get_user_model().objects.create_user("bobby")
    expected = [pk for pk in newest_first(many_tasks) if Task.objects.get(pk=pk).owner.username == "bob"]
    assert listed(root_client.get(changelist("task"), {"q": "bob"})) == expected


def test_search_by_id_and_uuid_is_exact(root_client, many_tasks):
    task = many_tasks[7]
    for term in (str(task.pk), f"#{task.pk}", str(task.uuid), task.uuid.hex.upper()):
        assert listed(root_client.get(changelist("task"), {"q": term})) == [task.pk]
    assert listed(root_client.get(changelist("task"), {"q": "nobody"})) == []


def test_instance_port_and_quota_searches(root_client, many_tasks, alice, bob):
    web = many_tasks[1].instance
    assert web.name == "web-1"
    mapping = PortMapping.objects.create(
        instance=web,
        provider=web.provider,
        host_port_start=20010,
        host_port_end=20012,
        guest_port_start=80,
        guest_port_end=82,
        status="active",
    )
    assert listed(root_client.get(changelist("instance"), {"q": "alice"})) == [web.pk]
    assert listed(root_client.get(changelist("instance"), {"q": "db-"})) == [many_tasks[0].instance_id]
    assert listed(root_client.get(changelist("instance"), {"q": f"#{web.pk}"})) == [web.pk]
    for term in ("web", "20011", f"#{web.pk}"):
        assert listed(root_client.get(changelist("portmapping"), {"q": term})) == [mapping.pk]
    assert listed(root_client.get(changelist("portmapping"), {"q": "20013"})) == []
    quota = UserQuota.objects.create(user=bob)
    UserQuota.objects.create(user=alice)
    assert listed(root_client.get(changelist("userquota"), {"q": "BO"})) == [quota.pk]


# ------------------------------------------------------------------ events


@pytest.fixture
def events(many_tasks):
    first, second = many_tasks[0], many_tasks[1]
    now = timezone.now()
    made = []
    for n in range(3):
        made.append(TaskEvent.objects.create(task=first, to_status="running", actor="worker", at=now + timedelta(n)))
        made.append(
            TaskEvent.objects.create(
                task=second, kind=TaskEvent.KIND_STEP, from_status="running", to_status="running", actor="worker"
            )
        )
    made.append(TaskEvent.objects.create(task=second, from_status="running", to_status="failed", actor="admin:root"))
    return made


def test_event_list_is_newest_first_by_id(root_client, events):
    assert listed(root_client.get(changelist("taskevent"))) == sorted((e.pk for e in events), reverse=True)


def test_events_of_one_task_follow_its_timeline(root_client, events):
    task = events[0].task
    mine = sorted((e for e in events if e.task_id == task.pk), key=lambda e: (e.at, e.pk), reverse=True)
    for params in ({"task__id__exact": task.pk}, {"q": str(task.pk)}, {"q": str(task.uuid)}):
        response = root_client.get(changelist("taskevent"), params)
        assert listed(response) == [e.pk for e in mine]
        assert response.context["cl"].queryset.query.order_by == ("-at", "-pk")


def test_event_filters_list_fixed_choices_without_reading_the_table(root_client, events):
    with CaptureQueriesContext(connection) as ctx:
        response = root_client.get(changelist("taskevent"), {"kind": "step"})
    assert listed(response) == sorted((e.pk for e in events if e.kind == "step"), reverse=True)
    assert not [q for q in ctx.captured_queries if "DISTINCT" in sql_of(q)]
    html = response.content.decode()
    assert "?kind=transition" in html and "?kind=step" in html
    with CaptureQueriesContext(connection) as ctx:
        failed = root_client.get(changelist("taskevent"), {"to_status": "failed"})
    assert listed(failed) == [events[-1].pk]
    # counted per kind, each a prefix of the (kind, to_status, id) index
    assert (int(failed.context["cl"].result_count), failed.context["cl"].result_count.exact) == (1, True)
    counts = [sql_of(q) for q in ctx.captured_queries if sql_of(q).startswith("SELECT COUNT(*)")]
    assert len(counts) == 2 and all('"kind" = ' in sql for sql in counts)
    running = root_client.get(changelist("taskevent"), {"to_status": "running"})
    assert listed(running) == sorted((e.pk for e in events if e.to_status == "running"), reverse=True)
    assert listed(root_client.get(changelist("taskevent"), {"kind": "bogus"})) == listed(
        root_client.get(changelist("taskevent"))
    )


def test_a_task_page_links_its_events(root_client, events):
    task = events[0].task
    html = root_client.get(f"/admin/tasks/task/{task.pk}/change/").content.decode()
    assert f"/admin/tasks/taskevent/?task__id__exact={task.pk}" in html


def test_event_search_is_by_task_only(root_client, events):
    assert listed(root_client.get(changelist("taskevent"), {"q": "admin:root"})) == []
    assert TaskEventAdmin.search_help_text.startswith("Task id")


# ------------------------------------------------------------------ branches


@pytest.mark.parametrize(
    ("params", "keep"),
    [
        ({"state": "finished"}, lambda t: t.status in ("completed", "failed")),
        ({"state": "problem"}, lambda t: t.status == "failed"),
        ({"provider__id__exact": "PROVIDER"}, lambda t: True),
        ({"q": "b"}, lambda t: True),  # bob, and the instances web-1 and db-vm: three branches
        ({"q": "bob", "state": "finished"}, lambda t: t.owner.username == "bob"),
    ],
)
def test_lists_read_in_branches_are_merged_in_list_order(root_client, many_tasks, small_pages, params, keep):
    params = {k: (many_tasks[0].provider_id if v == "PROVIDER" else v) for k, v in params.items()}
    expected = [pk for pk in newest_first(many_tasks) if keep(Task.objects.get(pk=pk))]
    seen = []
    for page in range(1, (len(expected) + 9) // 10 + 1):
        with CaptureQueriesContext(connection) as ctx:
            seen += listed(root_client.get(changelist("task"), {**params, "p": page}))
        pages = [sql_of(q) for q in ctx.captured_queries if "LIMIT" in sql_of(q) and 'FROM "tasks_task"' in sql_of(q)]
        if params.get("q") != "bob":  # one owner: one index read, no branches
            assert len(pages) > 2, pages  # a query per branch (and the bounded count)
    assert seen == expected
    oldest = listed(root_client.get(changelist("task"), {**params, "o": str(AGE_COLUMN)}))
    assert oldest == expected[::-1][:10]
