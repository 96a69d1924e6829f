"""Monthly traffic counters per instance, from the accounting samples; the limit that stops an instance."""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta

import pytest
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from providers.simulated.store import addresses_for
from tasks import services, traffic, traffic_counters
from tasks.models import InstanceTraffic, Task, UserQuota
from tasks.traffic_counters import GB, month_start, record, split_by_month
from tests.operations.conftest import fresh, inject, run, store


def at(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def month(instance, period: date) -> tuple[int, int]:
    row = InstanceTraffic.objects.filter(instance=instance, period=period).first()
    return (row.rx_bytes, row.tx_bytes) if row else (0, 0)


def client_for(user) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.get_or_create(user=user)[0].key}")
    return client


# ----------------------------------------------------------------- record()


def test_differences_of_the_cumulative_counters_are_added_to_the_month(running_instance):
    assert record(running_instance.pk, 1000, 100, at(2026, 3, 5, 10))  # first sample: the starting point
    assert month(running_instance, date(2026, 3, 1)) == (0, 0)
    record(running_instance.pk, 1500, 160, at(2026, 3, 5, 11))
    record(running_instance.pk, 4000, 400, at(2026, 3, 9, 0))
    assert month(running_instance, date(2026, 3, 1)) == (3000, 300)


def test_right_after_create_the_counters_count_from_zero(running_instance):
    record(running_instance.pk, 700, 70, at(2026, 3, 5, 10), from_zero=True)
    assert month(running_instance, date(2026, 3, 1)) == (700, 70)


def test_a_counter_reset_counts_what_moved_since_the_reset(running_instance):
    record(running_instance.pk, 10_000, 5_000, at(2026, 3, 1, 1))
    record(running_instance.pk, 12_000, 6_000, at(2026, 3, 1, 2))  # +2000 / +1000
    record(running_instance.pk, 300, 6_500, at(2026, 3, 1, 3))  # rx reset (pmacct restarted): +300; tx +500
    record(running_instance.pk, 900, 100, at(2026, 3, 1, 4))  # +600; tx reset: +100
    assert month(running_instance, date(2026, 3, 1)) == (2900, 1600)


def test_a_sample_no_newer_than_the_last_is_ignored(running_instance):
    record(running_instance.pk, 0, 0, at(2026, 3, 1, 1))
    record(running_instance.pk, 500, 50, at(2026, 3, 1, 2))
    assert not record(running_instance.pk, 400, 40, at(2026, 3, 1, 2))  # same time (a duplicate)
    assert not record(running_instance.pk, 9_999, 999, at(2026, 3, 1, 1, 30))  # older (arrived late)
    record(running_instance.pk, 600, 60, at(2026, 3, 1, 3))
    assert month(running_instance, date(2026, 3, 1)) == (600, 60)


def test_a_difference_across_a_month_boundary_is_shared_by_time(running_instance):
    record(running_instance.pk, 0, 0, at(2026, 1, 31, 23))
    record(running_instance.pk, 7200, 720, at(2026, 2, 1, 1))  # one hour in each month
    assert month(running_instance, date(2026, 1, 1)) == (3600, 360)
    assert month(running_instance, date(2026, 2, 1)) == (3600, 360)
    # The next difference starts from the newest row's counters.
    record(running_instance.pk, 8200, 820, at(2026, 2, 2))
    assert month(running_instance, date(2026, 2, 1)) == (4600, 460)


def test_human_units_are_decimal_like_the_limit():
    assert [traffic_counters.human(n) for n in (0, 999, 1000, 1_500_000, 10 * GB, 3 * 10**12)] == [
        "0 B",
        "999 B",
        "1.0 kB",
        "1.5 MB",
        "10.0 GB",
        "3.0 TB",
    ]


def test_split_over_several_months_and_the_year_end():
    shares = split_by_month(at(2025, 11, 16), at(2026, 1, 16), 6100, 0)
    assert [s[0] for s in shares] == [date(2025, 11, 1), date(2025, 12, 1), date(2026, 1, 1)]
    assert sum(s[1] for s in shares) == 6100  # nothing lost to rounding
    assert shares[1][1] == 3100  # December: 31 of the 61 days
    assert split_by_month(at(2026, 5, 2), at(2026, 5, 3), 10, 20) == [(date(2026, 5, 1), 10, 20)]


# ----------------------------------------------------------------- from the operations


def test_operations_samples_are_kept_and_shown_in_the_api(alice, provider):
    samples = []
    traffic.traffic_synced.connect(lambda sender, sample, **kw: samples.append(sample), weak=False, dispatch_uid="t")
    try:
        inject(provider, traffic="pmacct")  # read through the simulated host's pmacct
        instance, _ = services.create_instance(alice, provider=provider, image="debian/12")
        run(provider)
        time.sleep(0.05)  # the guest moves some bytes
        services.request_operation(alice, instance.pk, "stop")
        run(provider)
    finally:
        traffic.traffic_synced.disconnect(dispatch_uid="t")
    assert fresh(instance).status == "stopped"
    # From zero at the create to the sample before the stop: all of it counted.
    assert len(samples) == 2
    rx, tx = samples[1].rx_bytes, samples[1].tx_bytes
    assert samples[0].rx_bytes < rx <= store(provider).traffic(instance.guest_name)[0] and tx > 0
    period = month_start(timezone.now())
    assert month(instance, period) == (rx, tx)
    body = client_for(alice).get(f"/api/v1/instances/{instance.pk}/").json()
    assert body["traffic"] == {"period": f"{period:%Y-%m}", "rx_bytes": rx, "tx_bytes": tx}
    listed = client_for(alice).get("/api/v1/instances/").json()["results"]
    assert listed[0]["traffic"] == body["traffic"]


def test_an_instance_without_samples_shows_zero_traffic(alice, running_instance):
    body = client_for(alice).get(f"/api/v1/instances/{running_instance.pk}/").json()
    assert body["traffic"] == {"period": f"{timezone.now():%Y-%m}", "rx_bytes": 0, "tx_bytes": 0}


def test_the_periodic_sampling_reads_running_instances(alice, provider, running_instance, make_instance):
    inject(provider, traffic="pmacct")
    running_instance.addresses = addresses_for(running_instance.guest_name)  # as its create read them
    running_instance.save(update_fields=["addresses"])
    stopped = make_instance(alice, provider, status="stopped")
    assert traffic_counters.sample_job().startswith("1 sample(s)")  # the stopped one is not read
    time.sleep(0.05)
    traffic_counters.sample_job()
    rx, tx = month(running_instance, month_start(timezone.now()))
    assert 0 < rx <= store(provider).traffic(running_instance.guest_name)[0] and tx > 0
    assert not InstanceTraffic.objects.filter(instance=stopped).exists()


def test_providers_without_accounting_are_not_sampled(provider, running_instance):
    assert traffic_counters.sample_job().startswith("0 sample(s)")
    assert not InstanceTraffic.objects.exists()


# ----------------------------------------------------------------- the monthly limit


def _used(instance, nbytes: int) -> None:
    InstanceTraffic.objects.update_or_create(
        instance=instance,
        period=month_start(timezone.now()),
        defaults={"rx_bytes": nbytes // 2, "tx_bytes": nbytes - nbytes // 2, "sampled_at": timezone.now()},
    )


def test_an_instance_over_its_limit_is_stopped_by_a_system_task(alice, bob, provider, make_instance):
    UserQuota.objects.update_or_create(user=alice, defaults={"max_traffic_gb": 2})
    over = make_instance(alice, provider)
    under = make_instance(alice, provider)
    unlimited = make_instance(bob, provider)  # bob has no limit
    _used(over, 2 * GB + 1)
    _used(under, 2 * GB)
    _used(unlimited, 50 * GB)
    # Last month's traffic does not count.
    InstanceTraffic.objects.create(instance=under, period=date(2020, 1, 1), rx_bytes=10 * GB)

    assert traffic_counters.sample_job().endswith("1 instance(s) stopped over their traffic limit")
    task = Task.objects.get(instance=over)
    assert task.task_type == "stop" and task.initiator is None
    assert task.task_data["reason"] == "traffic_limit_exceeded"
    assert task.events.first().actor == "system"
    assert not Task.objects.filter(instance__in=[under, unlimited]).exists()
    # Its stop being under way, the next run queues nothing more.
    traffic_counters.sample_job()
    assert Task.objects.filter(instance=over).count() == 1
    run(provider)
    assert fresh(task).status == "completed" and fresh(over).status == "stopped"
    traffic_counters.sample_job()  # stopped: nothing to do
    assert Task.objects.filter(instance=over).count() == 1


def test_users_cannot_start_an_instance_over_its_limit_admins_can(alice, root, provider, make_instance):
    UserQuota.objects.update_or_create(user=alice, defaults={"max_traffic_gb": 1})
    instance = make_instance(alice, provider, status="stopped")
    _used(instance, GB + 5)
    response = client_for(alice).post(f"/api/v1/instances/{instance.pk}/start/", {}, format="json")
    assert response.status_code == 409 and response.json()["code"] == "traffic_limit_exceeded"
    assert not Task.objects.filter(instance=instance).exists()
    response = client_for(root).post(f"/api/v1/admin/instances/{instance.pk}/start/", {}, format="json")
    assert response.status_code == 202
    # Raising the limit lets the user start it again.
    Task.objects.filter(instance=instance).update(status="completed", completed_at=timezone.now())
    instance.__class__.objects.filter(pk=instance.pk).update(active_task=None)
    UserQuota.objects.filter(user=alice).update(max_traffic_gb=5)
    assert client_for(alice).post(f"/api/v1/instances/{instance.pk}/start/", {}, format="json").status_code == 202


@pytest.mark.parametrize("limit", [None, 10])
def test_admin_shows_the_months_traffic_and_the_limit(client, root, alice, provider, running_instance, limit):
    UserQuota.objects.update_or_create(user=alice, defaults={"max_traffic_gb": limit})
    _used(running_instance, 3_000_000)
    InstanceTraffic.objects.create(
        instance=running_instance, period=month_start(timezone.now() - timedelta(days=40)), rx_bytes=5_000_000
    )
    client.force_login(root)
    page = client.get("/admin/tasks/instance/").content.decode()
    assert "↓ 1.5 MB ↑ 1.5 MB" in page  # this month: 1,500,000 B each way
    detail = client.get(f"/admin/tasks/instance/{running_instance.pk}/change/").content.decode()
    assert f"{timezone.now():%Y-%m}" in detail and "5.0 MB" in detail  # the month before too
    assert ("monthly limit: 10.0 GB" if limit else "monthly limit: none") in detail
