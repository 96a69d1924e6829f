"""Traffic accounting: called at the panel's sync points; pmacct read through the host channel."""

from __future__ import annotations

import json
import logging
import time

import pytest

from tasks import services, traffic
from tasks.traffic import PmacctAccounting, TrafficError, TrafficTarget, parse_pmacct_json
from tests.operations.conftest import fresh, inject, run

PMACCT_OUTPUT = "\n".join(
    [
        json.dumps({"ip_src": "10.1.2.3", "ip_dst": "198.51.100.7", "packets": 10, "bytes": 1500}),
        json.dumps({"ip_src": "198.51.100.7", "ip_dst": "10.1.2.3", "packets": 30, "bytes": 45000}),
        json.dumps({"ip_src": "fd42::5", "ip_dst": "2001:db8::1", "packets": 2, "bytes": 200}),
        json.dumps({"ip_src": "2001:db8::1", "ip_dst": "FD42::5", "packets": 1, "bytes": 100}),
        json.dumps({"ip_src": "10.9.9.9", "ip_dst": "198.51.100.7", "packets": 1, "bytes": 60}),
        "not json at all",
        "",
        "For a total of: 5 entries",
    ]
)


def test_pmacct_output_is_summed_per_direction():
    sample = parse_pmacct_json(PMACCT_OUTPUT, ["10.1.2.3", "fd42::5/64"])
    assert (sample.tx_bytes, sample.rx_bytes) == (1700, 45100)
    assert (sample.tx_packets, sample.rx_packets) == (12, 31)
    assert sample.unclassified_bytes == 60 and sample.source == "pmacct"


def test_pmacct_without_json_rows_is_an_error():
    with pytest.raises(TrafficError):
        parse_pmacct_json("SRC_IP DST_IP PACKETS BYTES\n10.0.0.1 10.0.0.2 1 60\n", ["10.0.0.1"])
    assert parse_pmacct_json("", ["10.0.0.1"]).rx_bytes == 0  # an empty table is zero traffic


class FakeChannel:
    def __init__(self, rc=0, out=PMACCT_OUTPUT, err=""):
        self.rc, self.out, self.err = rc, out, err
        self.calls = []

    def run(self, argv, stdin=None, timeout=30.0):
        self.calls.append((argv, stdin, timeout))
        return self.rc, self.out, self.err


def test_pmacct_reads_the_guests_pipe_through_the_host_channel():
    accounting = PmacctAccounting({"pipe": "/run/pmacct/{guest}-{instance}.pipe", "binary": "/usr/bin/pmacct"})
    channel = FakeChannel()
    target = TrafficTarget(instance_id=7, guest_name="vps-abc", addresses=["10.1.2.3"])
    sample = accounting.sync(target, phase=traffic.BEFORE_STOP, channel=channel, timeout=3)
    assert channel.calls == [(["/usr/bin/pmacct", "-p", "/run/pmacct/vps-abc-7.pipe", "-s", "-O", "json"], None, 3)]
    assert sample.rx_bytes == 45000
    with pytest.raises(TrafficError, match="exited 1"):
        accounting.sync(target, phase="x", channel=FakeChannel(rc=1, err="no pipe"), timeout=3)
    with pytest.raises(TrafficError, match="no host channel"):
        accounting.sync(target, phase="x", channel=None, timeout=3)


class Recorder:
    name = "recording"
    calls: list = []

    def __init__(self, options):
        pass

    def sync(self, target, *, phase, channel, timeout):
        Recorder.calls.append((phase, target.guest_name))
        return None


def test_operations_sync_at_the_panels_points(alice, provider, monkeypatch):
    monkeypatch.setitem(traffic.BACKENDS, "recording", Recorder)
    monkeypatch.setattr(Recorder, "calls", [])
    inject(provider, traffic="recording")
    instance, _ = services.create_instance(alice, provider=provider, image="debian/12")
    run(provider)
    for op in ("stop", "start", "restart", "reset", "reset-password", "delete"):
        services.request_operation(alice, instance.pk, op)
        run(provider)
    assert fresh(instance).status == "deleted"
    assert Recorder.calls == [
        (phase, instance.guest_name)
        for phase in ("after_create", "before_stop", "after_start", "before_restart", "before_reset", "before_delete")
    ]


def test_pmacct_through_the_simulated_host_counts_while_running(alice, provider):
    samples = []

    def receiver(sender, instance_id, task_id, phase, sample, **kwargs):
        samples.append((phase, instance_id, task_id, sample))

    traffic.traffic_synced.connect(receiver)
    try:
        inject(provider, traffic="pmacct")
        instance, create = services.create_instance(alice, provider=provider, image="debian/12")
        run(provider)
        time.sleep(0.05)  # the guest moves some bytes
        stop = services.request_operation(alice, instance.pk, "stop")
        run(provider)
    finally:
        traffic.traffic_synced.disconnect(receiver)
    assert [(s[0], s[1], s[2]) for s in samples] == [
        ("after_create", instance.pk, create.pk),
        ("before_stop", instance.pk, stop.pk),
    ]
    first, second = samples[0][3], samples[1][3]
    assert second.rx_bytes > first.rx_bytes and second.tx_bytes > first.tx_bytes > 0
    assert second.unclassified_bytes == 0  # every flow matched the instance's addresses
    assert "syncing traffic counters" in set(fresh(stop).events.values_list("message", flat=True))


def test_a_failing_accounting_read_never_fails_the_operation(alice, provider, live_instance, caplog):
    # The pipe names no guest the host knows: pmacct exits 1.
    inject(provider, traffic="pmacct", pmacct={"pipe": "/var/run/pmacct/missing.pipe"})
    with caplog.at_level(logging.WARNING, logger="tasks.traffic"):
        task = services.request_operation(alice, live_instance.pk, "stop")
        run(provider)
    assert fresh(task).status == "completed" and fresh(live_instance).status == "stopped"
    assert f"task {task.pk}: traffic counters of instance {live_instance.pk} not read at before_stop" in caplog.text
