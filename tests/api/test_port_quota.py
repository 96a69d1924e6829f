"""Host ports per user are bounded by the quota's max_ports (default 50), port by port (issue 18, item 2)."""

from __future__ import annotations

from django.test import override_settings

from tasks.models import PortMapping, Provider, Task, UserQuota
from tests.api.conftest import client_for


def ports_of(instance):
    return f"/api/v1/instances/{instance.pk}/ports/"


def finish_all():
    """Let the queued create-port tasks go (test set-up: the quota counts live mappings, not tasks)."""
    from tasks.models import Instance

    Task.objects.filter(status="pending").update(status="completed")
    Instance.objects.update(active_task=None)


def test_one_user_cannot_take_a_providers_range(as_alice, alice, provider, make_instance):
    instance = make_instance(alice, provider)
    # The attack: count up to 1,000 per request.
    response = as_alice.post(ports_of(instance), {"protocol": "tcp", "guest_port": 1000, "count": 1000}, format="json")
    assert response.status_code == 409, response.content
    body = response.json()
    assert (body["code"], body["resource"], body["limit"], body["requested"]) == ("quota_exceeded", "ports", 50, 1000)
    assert "ports" in body["detail"]
    assert not PortMapping.objects.exists()
    assert UserQuota.objects.get(user=alice).max_ports == 50


def test_ranges_count_port_by_port_across_instances_and_providers(as_alice, alice, provider, make_instance):
    other = Provider.objects.create(name="sim-z", provider_type="simulated")
    first, second = make_instance(alice, provider), make_instance(alice, other)
    assert as_alice.post(ports_of(first), {"protocol": "both", "guest_port": 100, "count": 40}).status_code == 202
    finish_all()
    refused = as_alice.post(ports_of(second), {"protocol": "tcp", "guest_port": 100, "count": 11})
    assert (refused.status_code, refused.json()["code"], refused.json()["requested"]) == (409, "quota_exceeded", 51)
    assert as_alice.post(ports_of(second), {"protocol": "udp", "guest_port": 100, "count": 10}).status_code == 202
    finish_all()
    full = as_alice.post(ports_of(first), {"protocol": "tcp", "guest_port": 9000})
    assert (full.status_code, full.json()["resource"]) == (409, "ports")
    # A deleted mapping gives its ports back.
    PortMapping.objects.filter(instance=second).update(status=PortMapping.STATUS_DELETED)
    assert as_alice.post(ports_of(first), {"protocol": "tcp", "guest_port": 9000}).status_code == 202


def test_the_quota_is_per_user_and_can_be_raised(as_alice, as_bob, alice, bob, provider, make_instance):
    mine, theirs = make_instance(alice, provider), make_instance(bob, provider)
    assert as_alice.post(ports_of(mine), {"protocol": "tcp", "guest_port": 1, "count": 50}).status_code == 202
    # Bob's quota is his own.
    assert as_bob.post(ports_of(theirs), {"protocol": "tcp", "guest_port": 1, "count": 50}).status_code == 202
    finish_all()
    UserQuota.objects.filter(user=alice).update(max_ports=60)
    assert as_alice.post(ports_of(mine), {"protocol": "tcp", "guest_port": 100, "count": 10}).status_code == 202


def test_an_operator_may_exceed_the_users_quota(alice, root, provider, make_instance):
    instance = make_instance(alice, provider)
    response = client_for(root).post(
        f"/api/v1/admin/instances/{instance.pk}/ports/", {"protocol": "tcp", "guest_port": 1, "count": 200}
    )
    assert response.status_code == 202, response.content


def test_the_default_block_of_a_new_instance_counts(as_alice, alice, provider):
    body = {"provider": provider.pk, "image": "debian/12", "cpu": 1, "memory_mb": 512, "disk_mb": 2048}
    assert as_alice.post("/api/v1/instances/", body, format="json").status_code == 202  # 5 ports
    finish_all()
    UserQuota.objects.filter(user=alice).update(max_ports=9)
    refused = as_alice.post("/api/v1/instances/", body, format="json")
    assert refused.status_code == 409
    assert (refused.json()["code"], refused.json()["resource"], refused.json()["requested"]) == (
        "quota_exceeded",
        "ports",
        10,
    )
    # Nothing was reserved by the refused create.
    quota = UserQuota.objects.get(user=alice)
    assert (quota.used_instances, PortMapping.objects.count()) == (1, 2)


@override_settings(DEFAULT_QUOTA_PORTS=3)
def test_the_default_comes_from_the_setting(as_alice, alice, provider, make_instance):
    instance = make_instance(alice, provider)
    response = as_alice.post(ports_of(instance), {"protocol": "tcp", "guest_port": 1, "count": 4})
    assert (response.status_code, response.json()["limit"]) == (409, 3)
