"""Instances: create, operations, delete, port mappings; their 400 and 409 answers."""

from __future__ import annotations

import pytest

from tasks.models import Instance, PortMapping, Task, UserQuota
from tests.conftest import make_task

CREATE = {"image": "debian/12", "instance_type": "container", "cpu": 1, "memory_mb": 512, "disk_mb": 2048}


def create_body(target, /, **overrides):
    return {"provider": target.pk, **CREATE, **overrides}


def test_create_answers_202_with_task_and_instance(as_alice, alice, provider):
    response = as_alice.post(
        "/api/v1/instances/", create_body(provider, name="web-1", timeout_seconds=900), format="json"
    )
    assert response.status_code == 202, response.content
    body = response.json()
    task, instance = body["task"], body["instance"]
    assert (task["task_type"], task["status"], task["timeout_seconds"]) == ("create", "pending", 900)
    assert task["instance"]["id"] == instance["id"]
    assert (instance["name"], instance["status"], instance["active_task"]) == ("web-1", "creating", task["id"])
    assert instance["resources"] == {"cpu": 1, "memory_mb": 512, "disk_mb": 2048, "bandwidth_mbps": 100}
    assert instance["ports"][0]["is_ssh"] is True
    assert instance["ssh_port"] == instance["ports"][0]["host_port_start"]
    assert Instance.objects.get(pk=instance["id"]).owner == alice
    assert UserQuota.objects.get(user=alice).used_cpu == 1


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"image": ""}, "image"),
        ({"image": None}, "image"),
        ({"cpu": "lots"}, "cpu"),
        ({"cpu": 0}, "cpu"),
        ({"cpu": 10**30}, "cpu"),
        ({"cpu": 1.5}, "cpu"),
        ({"memory_mb": 32}, "memory_mb"),
        ({"disk_mb": 2**40}, "disk_mb"),
        ({"instance_type": "lxc"}, "instance_type"),
        ({"name": "Bad Name!"}, "name"),
        ({"name": "x" * 64}, "name"),
        ({"provider": 98765}, "provider"),
        ({"provider": "one"}, "provider"),
        ({"timeout_seconds": -5}, "timeout_seconds"),
        ({"timeout_seconds": 10**12}, "timeout_seconds"),
        ({"bandwidth_mbps": 0}, "bandwidth_mbps"),
        ({"image": "a\x00b"}, "image"),
    ],
)
def test_create_rejects_bad_input_naming_the_field(as_alice, provider, overrides, field):
    response = as_alice.post("/api/v1/instances/", create_body(provider, **overrides), format="json")
    assert response.status_code == 400, response.content
    assert response.json()["field"] == field
    assert not Instance.objects.exists() and not Task.objects.exists()


def test_create_without_required_fields(as_alice):
    response = as_alice.post("/api/v1/instances/", {}, format="json")
    assert response.status_code == 400
    assert set(response.json()["errors"]) >= {"provider", "image", "cpu", "memory_mb", "disk_mb"}


@pytest.mark.parametrize(
    "raw, content_type",
    [
        ("{not json", "application/json"),
        ("[1, 2]", "application/json"),
        ('"just a string"', "application/json"),
        ("\xff\xfe", "application/json"),
    ],
)
def test_malformed_bodies_are_400(as_alice, provider, raw, content_type):
    response = as_alice.generic("POST", "/api/v1/instances/", raw.encode("latin-1"), content_type)
    assert response.status_code == 400, response.content
    assert response.json()["code"] in ("parse_error", "invalid")


def test_unsupported_media_type_is_415(as_alice):
    response = as_alice.generic("POST", "/api/v1/instances/", b"<xml/>", "application/xml")
    assert response.status_code == 415
    assert response.json()["code"] == "unsupported_media_type"


def test_create_beyond_the_quota_is_409(as_alice, provider):
    response = as_alice.post("/api/v1/instances/", create_body(provider, cpu=17), format="json")
    assert response.status_code == 409
    assert response.json()["code"] == "quota_exceeded"


def test_create_beyond_provider_capacity_is_409(as_alice, provider):
    provider.cpu_total = 1
    provider.save()
    response = as_alice.post("/api/v1/instances/", create_body(provider, cpu=2), format="json")
    assert response.status_code == 409
    assert response.json()["code"] == "capacity_exceeded"


def test_create_on_a_disabled_provider_or_taken_name_is_409(as_alice, provider):
    assert as_alice.post("/api/v1/instances/", create_body(provider, name="same"), format="json").status_code == 202
    taken = as_alice.post("/api/v1/instances/", create_body(provider, name="same"), format="json")
    assert (taken.status_code, taken.json()["code"], taken.json()["field"]) == (409, "name_taken", "name")
    provider.enabled = False
    provider.save()
    disabled = as_alice.post("/api/v1/instances/", create_body(provider), format="json")
    assert (disabled.status_code, disabled.json()["code"]) == (409, "provider_disabled")


def test_operation_on_a_busy_instance_is_409_with_the_task_in_the_way(as_alice, running_instance):
    first = as_alice.post(f"/api/v1/instances/{running_instance.pk}/stop/", {"timeout_seconds": 60}, format="json")
    assert first.status_code == 202
    task = first.json()["task"]
    assert (task["task_type"], task["timeout_seconds"]) == ("stop", 60)
    second = as_alice.post(f"/api/v1/instances/{running_instance.pk}/restart/")
    assert second.status_code == 409
    assert second.json()["code"] == "instance_busy"
    assert second.json()["active_task"] == task["id"]
    detail = as_alice.get(f"/api/v1/instances/{running_instance.pk}/").json()
    assert detail["active_task"] == task["id"]


def test_operation_forbidden_by_the_instance_state_is_409(as_alice, running_instance):
    response = as_alice.post(f"/api/v1/instances/{running_instance.pk}/start/")
    assert response.status_code == 409
    assert (response.json()["code"], response.json()["status"]) == ("invalid_state", "running")


def test_operation_with_a_bad_timeout_is_400(as_alice, running_instance):
    response = as_alice.post(
        f"/api/v1/instances/{running_instance.pk}/stop/", {"timeout_seconds": "soon"}, format="json"
    )
    assert (response.status_code, response.json()["field"]) == (400, "timeout_seconds")
    assert not Task.objects.exists()


def test_every_operation_queues_its_type(as_alice, alice, provider, make_instance):
    for op in ("stop", "restart", "reset", "reset-password"):
        instance = make_instance(alice, provider)
        response = as_alice.post(f"/api/v1/instances/{instance.pk}/{op}/")
        assert response.status_code == 202
        assert response.json()["task"]["task_type"] == op
    stopped = make_instance(alice, provider, status="stopped")
    assert as_alice.post(f"/api/v1/instances/{stopped.pk}/start/").json()["task"]["task_type"] == "start"


def test_delete_queues_a_delete_task(as_alice, running_instance):
    response = as_alice.delete(f"/api/v1/instances/{running_instance.pk}/")
    assert response.status_code == 202
    assert response.json()["task"]["task_type"] == "delete"
    again = as_alice.delete(f"/api/v1/instances/{running_instance.pk}/")
    assert again.status_code == 409


def test_ports_list_create_and_delete(as_alice, running_instance):
    base = f"/api/v1/instances/{running_instance.pk}/ports/"
    created = as_alice.post(
        base, {"protocol": "both", "guest_port": 8000, "count": 3, "description": "app"}, format="json"
    )
    assert created.status_code == 202, created.content
    port = created.json()["port"]
    assert (port["protocol"], port["guest_port_start"], port["guest_port_end"]) == ("both", 8000, 8002)
    assert port["host_port_end"] - port["host_port_start"] == 2
    assert created.json()["task"]["task_type"] == "create-port"
    listed = as_alice.get(base).json()
    assert [p["id"] for p in listed["results"]] == [port["id"]]
    # Finish the create-port task so the instance is free, then remove the mapping.
    Task.objects.filter(pk=created.json()["task"]["id"]).update(status="completed")
    Instance.objects.filter(pk=running_instance.pk).update(active_task=None)
    PortMapping.objects.filter(pk=port["id"]).update(status=PortMapping.STATUS_ACTIVE)
    removed = as_alice.delete(f"{base}{port['id']}/")
    assert removed.status_code == 202
    assert removed.json()["task"]["task_type"] == "delete-port"


def test_port_conflict_is_409(as_alice, alice, provider, make_instance, running_instance):
    other = make_instance(alice, provider, name="other")
    PortMapping.objects.create(
        instance=other,
        provider=provider,
        protocol="tcp",
        host_port_start=20500,
        host_port_end=20510,
        guest_port_start=1,
        guest_port_end=11,
        status=PortMapping.STATUS_ACTIVE,
    )
    response = as_alice.post(
        f"/api/v1/instances/{running_instance.pk}/ports/",
        {"protocol": "tcp", "guest_port": 80, "host_port": 20505},
        format="json",
    )
    assert response.status_code == 409
    assert response.json()["code"] == "port_conflict"
    # UDP on the same host port is free.
    udp = as_alice.post(
        f"/api/v1/instances/{running_instance.pk}/ports/",
        {"protocol": "udp", "guest_port": 80, "host_port": 20505},
        format="json",
    )
    assert udp.status_code == 202


@pytest.mark.parametrize(
    "body, field",
    [
        ({"protocol": "sctp", "guest_port": 80}, "protocol"),
        ({"protocol": "tcp", "guest_port": 0}, "guest_port"),
        ({"protocol": "tcp", "guest_port": 70000}, "guest_port"),
        ({"protocol": "tcp", "guest_port": 65535, "count": 2}, "guest_port"),
        ({"protocol": "tcp", "guest_port": 80, "count": 5000}, "count"),
        ({"protocol": "tcp", "guest_port": 80, "host_port": 65535, "count": 3}, "host_port"),
        ({"protocol": "tcp"}, "guest_port"),
    ],
)
def test_bad_port_requests_are_400(as_alice, running_instance, body, field):
    response = as_alice.post(f"/api/v1/instances/{running_instance.pk}/ports/", body, format="json")
    assert response.status_code == 400, response.content
    assert response.json()["field"] == field


def test_deleting_an_unknown_port_is_404(as_alice, running_instance, bob, provider, make_instance):
    assert as_alice.delete(f"/api/v1/instances/{running_instance.pk}/ports/123456/").status_code == 404
    bobs = make_instance(bob, provider, name="bobs")
    mapping = PortMapping.objects.create(
        instance=bobs,
        provider=provider,
        protocol="tcp",
        host_port_start=21000,
        host_port_end=21000,
        guest_port_start=22,
        guest_port_end=22,
        status=PortMapping.STATUS_ACTIVE,
    )
    # Another instance's mapping through my instance's URL: not found either.
    assert as_alice.delete(f"/api/v1/instances/{running_instance.pk}/ports/{mapping.pk}/").status_code == 404
    assert PortMapping.objects.get(pk=mapping.pk).status == PortMapping.STATUS_ACTIVE


def test_instance_detail_shows_active_task_and_live_ports_only(as_alice, running_instance):
    for status in (PortMapping.STATUS_ACTIVE, PortMapping.STATUS_DELETED):
        PortMapping.objects.create(
            instance=running_instance,
            provider=running_instance.provider,
            protocol="tcp",
            host_port_start=22000 if status == "active" else 22001,
            host_port_end=22000 if status == "active" else 22001,
            guest_port_start=22,
            guest_port_end=22,
            status=status,
        )
    task = make_task(running_instance)
    Instance.objects.filter(pk=running_instance.pk).update(active_task=task)
    body = as_alice.get(f"/api/v1/instances/{running_instance.pk}/").json()
    assert [p["host_port_start"] for p in body["ports"]] == [22000]
    assert body["active_task"] == task.pk
    assert {"status", "provider", "resources", "ports", "addresses", "ssh_port"} <= set(body)
