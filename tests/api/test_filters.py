"""Every filter and ordering of the task lists, and pagination."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from tasks.api import filters as api_filters
from tasks.models import InstanceType, Task
from tests.conftest import make_task

T0 = timezone.now().replace(microsecond=0) - timedelta(days=1)


@pytest.fixture
def tasks(alice, bob, provider, provider_b, make_instance):
    """Tasks of alice and bob on two providers, created a minute apart (oldest first)."""
    a1 = make_instance(alice, provider, name="a1")
    a2 = make_instance(alice, provider_b, name="a2", instance_type=InstanceType.VM)
    b1 = make_instance(bob, provider_b, name="b1")
    specs = [
        (a1, "start", "completed", 100),
        (a1, "stop", "failed", 30),
        (a2, "restart", "pending", 0),
        (a2, "reset", "running", 40),
        (b1, "delete", "timeout", 70),
        (b1, "start", "cancelled", 0),
        (a1, "create-port", "completed", 100),
    ]
    made = []
    for i, (instance, task_type, status, progress) in enumerate(specs):
        created = T0 + timedelta(minutes=i)
        done = created + timedelta(seconds=30) if status in ("completed", "failed", "timeout", "cancelled") else None
        started = created + timedelta(seconds=5) if status != "pending" else None
        made.append(
            make_task(
                instance,
                task_type=task_type,
                status=status,
                created_at=created,
                started_at=started,
                completed_at=done,
                progress=progress,
            )
        )
    return made


def ids(response) -> list[int]:
    assert response.status_code == 200, response.content
    return [row["id"] for row in response.json()["results"]]


def alice_ids(tasks, pred=lambda t: True) -> list[int]:
    return [t.pk for t in reversed(tasks) if t.owner.username == "alice" and pred(t)]


def test_default_order_is_newest_first(as_alice, tasks):
    assert ids(as_alice.get("/api/v1/tasks/")) == alice_ids(tasks)


@pytest.mark.parametrize(
    "query, pred",
    [
        ("status=completed", lambda t: t.status == "completed"),
        ("status=pending,running", lambda t: t.status in ("pending", "running")),
        ("status=failed, completed", lambda t: t.status in ("failed", "completed")),
        ("task_type=start", lambda t: t.task_type == "start"),
        ("task_type=reset,create-port", lambda t: t.task_type in ("reset", "create-port")),
        ("status=completed&task_type=start", lambda t: t.status == "completed" and t.task_type == "start"),
    ],
)
def test_status_and_type_filters(as_alice, tasks, query, pred):
    assert ids(as_alice.get(f"/api/v1/tasks/?{query}")) == alice_ids(tasks, pred)


def test_provider_and_instance_filters(as_alice, tasks, provider, provider_b):
    assert ids(as_alice.get(f"/api/v1/tasks/?provider={provider.pk}")) == alice_ids(
        tasks, lambda t: t.provider_id == provider.pk
    )
    assert ids(as_alice.get(f"/api/v1/tasks/?provider={provider_b.pk}")) == alice_ids(
        tasks, lambda t: t.provider_id == provider_b.pk
    )
    a2 = tasks[2].instance_id
    assert ids(as_alice.get(f"/api/v1/tasks/?instance={a2}")) == alice_ids(tasks, lambda t: t.instance_id == a2)
    assert ids(as_alice.get("/api/v1/tasks/?provider=987654")) == []


def test_created_range_filters(as_alice, tasks):
    after = (T0 + timedelta(minutes=2)).isoformat()
    before = (T0 + timedelta(minutes=4)).strftime("%Y-%m-%dT%H:%M:%SZ")
    got = ids(as_alice.get("/api/v1/tasks/", {"created_after": after, "created_before": before}))
    assert got == alice_ids(tasks, lambda t: T0 + timedelta(minutes=2) <= t.created_at < T0 + timedelta(minutes=4))
    assert got == [tasks[3].pk, tasks[2].pk]
    # A naive date-time is UTC.
    naive = (T0 + timedelta(minutes=6)).replace(tzinfo=None).isoformat()
    assert ids(as_alice.get("/api/v1/tasks/", {"created_after": naive})) == [tasks[6].pk]


@pytest.mark.parametrize("field", ["created_at", "started_at", "completed_at", "progress", "id"])
def test_every_ordering_both_ways(as_alice, tasks, field):
    mine = [t for t in tasks if t.owner.username == "alice"]

    def key(t):
        value = getattr(t, field)
        # MariaDB and SQLite sort NULL first ascending.
        return (value is not None, value if value is not None else 0, t.pk)

    ascending = [t.pk for t in sorted(mine, key=key)]
    assert ids(as_alice.get(f"/api/v1/tasks/?ordering={field}")) == ascending
    assert ids(as_alice.get(f"/api/v1/tasks/?ordering=-{field}")) == list(reversed(ascending))


def test_ties_are_broken_by_id_in_the_same_direction(as_alice, alice, running_instance):
    same = [make_task(running_instance, created_at=T0, status="completed") for _ in range(5)]
    assert ids(as_alice.get("/api/v1/tasks/?ordering=created_at")) == [t.pk for t in same]
    assert ids(as_alice.get("/api/v1/tasks/?ordering=-created_at")) == [t.pk for t in reversed(same)]
    # Pages of equal keys neither repeat nor skip a row.
    pages = [ids(as_alice.get(f"/api/v1/tasks/?ordering=progress&page_size=2&page={n}")) for n in (1, 2, 3)]
    assert sorted(sum(pages, [])) == sorted(t.pk for t in same)


def test_admin_filters(as_root, tasks, alice, bob):
    everyone = [t.pk for t in reversed(tasks)]
    assert ids(as_root.get("/api/v1/admin/tasks/")) == everyone
    assert ids(as_root.get(f"/api/v1/admin/tasks/?user={bob.pk}")) == [t.pk for t in reversed(tasks) if t.owner == bob]
    assert ids(as_root.get("/api/v1/admin/tasks/?username=LIC")) == alice_ids(tasks)
    assert ids(as_root.get("/api/v1/admin/tasks/?username=nobody")) == []
    vm = [t.pk for t in reversed(tasks) if t.instance.instance_type == "vm"]
    assert ids(as_root.get("/api/v1/admin/tasks/?instance_type=vm")) == vm
    assert ids(as_root.get("/api/v1/admin/tasks/?instance_type=vm&status=pending")) == [tasks[2].pk]


def test_admin_username_filter_on_a_broad_match_joins_instead(as_root, tasks, monkeypatch):
    monkeypatch.setattr(api_filters, "USERNAME_MATCH_LIMIT", 0)
    assert ids(as_root.get("/api/v1/admin/tasks/?username=o")) == [
        t.pk for t in reversed(tasks) if "o" in t.owner.username
    ]


def test_admin_username_filter_with_many_matching_users_chunks_the_ids(as_root, tasks, monkeypatch):
    from tasks import lookups

    monkeypatch.setattr(lookups, "IN_CHUNK", 1)
    assert ids(as_root.get("/api/v1/admin/tasks/?username=b")) == [
        t.pk for t in reversed(tasks) if "b" in t.owner.username
    ]


def test_admin_ordering_by_username(as_root, tasks):
    got = ids(as_root.get("/api/v1/admin/tasks/?ordering=username"))
    expected = [t.pk for t in sorted(tasks, key=lambda t: (t.owner.username, t.pk))]
    assert got == expected
    got = ids(as_root.get("/api/v1/admin/tasks/?ordering=-username,created_at"))
    expected = [t.pk for t in sorted(tasks, key=lambda t: (t.owner.username != "bob", t.created_at, t.pk))]
    assert got == expected


def test_users_cannot_order_by_username(as_alice, tasks):
    response = as_alice.get("/api/v1/tasks/?ordering=username")
    assert response.status_code == 400
    assert response.json()["field"] == "ordering"


@pytest.mark.parametrize(
    "query, field",
    [
        ("status=bogus", "status"),
        ("status=pending,nope", "status"),
        ("task_type=format", "task_type"),
        ("provider=abc", "provider"),
        ("provider=0", "provider"),
        ("provider=1.5", "provider"),
        ("provider=99999999999999999999999", "provider"),
        ("instance=-3", "instance"),
        ("created_after=yesterday", "created_after"),
        ("created_before=2026-13-01T00:00:00Z", "created_before"),
        ("created_after=0001-01-01T00:00:00+05:00", "created_after"),
        ("ordering=bogus", "ordering"),
        ("ordering=created_at,-nope", "ordering"),
        ("page=0", "page"),
        ("page=abc", "page"),
        ("page_size=-1", "page_size"),
        ("page_size=lots", "page_size"),
    ],
)
def test_invalid_query_values_are_400_naming_the_parameter(as_alice, tasks, query, field):
    response = as_alice.get(f"/api/v1/tasks/?{query}")
    assert response.status_code == 400, response.content
    body = response.json()
    assert (body["code"], body["field"]) == ("invalid", field)
    assert field in body["detail"]


@pytest.mark.parametrize("query, field", [("user=x", "user"), ("instance_type=lxc", "instance_type")])
def test_invalid_admin_query_values_are_400(as_root, tasks, query, field):
    response = as_root.get(f"/api/v1/admin/tasks/?{query}")
    assert response.status_code == 400
    assert response.json()["field"] == field


def test_pagination_is_capped_at_100(as_alice, alice, running_instance):
    Task.objects.bulk_create(
        Task(
            task_type="start",
            owner=alice,
            initiator=alice,
            provider_id=running_instance.provider_id,
            instance=running_instance,
            created_at=T0 + timedelta(seconds=i),
        )
        for i in range(105)
    )
    first = as_alice.get("/api/v1/tasks/?page_size=500").json()
    assert first["count"] == 105
    assert len(first["results"]) == 100
    assert "page=2" in first["next"] and first["previous"] is None
    second = as_alice.get(first["next"]).json()
    assert len(second["results"]) == 5 and second["next"] is None
    assert len(as_alice.get("/api/v1/tasks/").json()["results"]) == 20
    assert len(as_alice.get("/api/v1/tasks/?page_size=7").json()["results"]) == 7
    past = as_alice.get("/api/v1/tasks/?page=3&page_size=100")
    assert past.status_code == 404
    assert past.json()["code"] == "not_found"
    last = as_alice.get("/api/v1/tasks/?page=last&page_size=100").json()
    assert len(last["results"]) == 5


def test_instance_list_hides_deleted_unless_asked(as_alice, alice, provider, make_instance):
    live = make_instance(alice, provider, name="live")
    gone = make_instance(alice, provider, name="gone", status="deleted")
    assert ids(as_alice.get("/api/v1/instances/")) == [live.pk]
    assert ids(as_alice.get("/api/v1/instances/?status=deleted")) == [gone.pk]
    assert ids(as_alice.get("/api/v1/instances/?status=deleted,running&ordering=name")) == [gone.pk, live.pk]
    assert as_alice.get("/api/v1/instances/?status=zombie").json()["field"] == "status"
