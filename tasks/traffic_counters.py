"""Traffic counters: bytes each instance received and sent per calendar month.

The accounting samples (tasks.traffic: pmacct on hosts that have it, the
simulated host's counters otherwise) are cumulative counters of the guest's
interface. Every sample, taken by an operation (after create and start, before
stop, restart, reset and delete) or by the periodic sampling below, reaches
``record`` through the ``traffic_synced`` signal and is kept in the database as
``InstanceTraffic`` rows, one per instance and month (UTC):

- the difference to the instance's previous sample is added to the month;
- a counter lower than the previous sample was reset (pmacct restarted, the
  guest rebuilt or re-created): the new value is what moved since the reset,
  so it is added as it is (what moved between the last sample and the reset is
  lost; sampling every few minutes keeps that small);
- the first sample of an instance is its starting point and adds nothing,
  except right after its create, when the counters started from zero with it;
- when the previous sample is in an earlier month, the difference is shared
  between the months by the time each covered (at most a sampling interval's
  worth is estimated that way);
- a sample no newer than the last one recorded is ignored.

Periodic sampling (``sample_job``, a django-q2 schedule every
``TRAFFIC_SAMPLE_MINUTES``) reads every running instance of the providers that
have traffic accounting and are not held as unreachable, then stops the
instances over their owner's monthly limit (``UserQuota.max_traffic_gb`` per
instance, received + sent, 1 GB = 10^9 bytes): a stop task with actor
``system``. Users cannot start or restart an instance over its limit (409
``traffic_limit_exceeded``); admins can.
"""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime

from django.db import transaction
from django.db.models import F
from django.dispatch import receiver
from django.utils import timezone

from tasks import traffic
from tasks.engine.states import InstanceStatus, TaskType
from tasks.models import Instance, InstanceTraffic, Provider

logger = logging.getLogger(__name__)

GB = 10**9
STOP_REASON = "traffic_limit_exceeded"


def month_start(at: datetime) -> date:
    at = at.astimezone(UTC)
    return date(at.year, at.month, 1)


def next_month(d: date) -> date:
    return date(d.year + d.month // 12, d.month % 12 + 1, 1)


def _month_start_dt(d: date) -> datetime:
    return datetime(d.year, d.month, 1, tzinfo=UTC)


def split_by_month(start: datetime, end: datetime, rx: int, tx: int) -> list[tuple[date, int, int]]:
    """Share (rx, tx) moved between ``start`` and ``end`` among the months, by time covered."""
    last = month_start(end)
    period = month_start(start)
    if period >= last:
        return [(last, rx, tx)]
    total = (end - start).total_seconds() or 1.0
    shares, given_rx, given_tx, cursor = [], 0, 0, start
    while period < last:
        boundary = _month_start_dt(next_month(period))
        fraction = (boundary - cursor).total_seconds() / total
        part_rx, part_tx = int(rx * fraction), int(tx * fraction)
        shares.append((period, part_rx, part_tx))
        given_rx, given_tx, cursor, period = given_rx + part_rx, given_tx + part_tx, boundary, next_month(period)
    shares.append((last, rx - given_rx, tx - given_tx))
    return shares


def record(instance_id: int, rx: int, tx: int, at: datetime, *, from_zero: bool = False) -> bool:
    """Keep one sample of the cumulative counters; False when it was ignored (unknown instance, stale)."""
    rx, tx = max(0, int(rx)), max(0, int(tx))
    with transaction.atomic():
        # The instance row lock orders the samples of one instance (two operations'
        # samples, or an operation's and the periodic one).
        if not list(Instance.objects.select_for_update().filter(pk=instance_id).values_list("pk", flat=True)):
            return False
        last = InstanceTraffic.objects.filter(instance_id=instance_id).order_by("-period").first()
        if last is not None and last.sampled_at is not None:
            if at <= last.sampled_at:
                return False
            delta_rx = rx - last.last_rx if rx >= last.last_rx else rx  # lower: the counter was reset
            delta_tx = tx - last.last_tx if tx >= last.last_tx else tx
            shares = split_by_month(last.sampled_at, at, delta_rx, delta_tx)
        else:
            shares = [(month_start(at), rx, tx) if from_zero else (month_start(at), 0, 0)]
        for period, part_rx, part_tx in shares:
            InstanceTraffic.objects.get_or_create(instance_id=instance_id, period=period)
            changes = {"rx_bytes": F("rx_bytes") + part_rx, "tx_bytes": F("tx_bytes") + part_tx}
            if period == month_start(at):
                changes.update(last_rx=rx, last_tx=tx, sampled_at=at)
            InstanceTraffic.objects.filter(instance_id=instance_id, period=period).update(**changes)
    return True


@receiver(traffic.traffic_synced, dispatch_uid="tasks.traffic_counters.record")
def on_sample(sender, instance_id: int, task_id: int | None, phase: str, sample: traffic.TrafficSample, **kwargs):
    """Every sample the operations or the periodic sampling read; never raises (a stop must go on)."""
    try:
        record(
            instance_id,
            sample.rx_bytes,
            sample.tx_bytes,
            datetime.fromtimestamp(sample.at, UTC),
            from_zero=phase == traffic.AFTER_CREATE,
        )
    except Exception:
        logger.exception("task %s: the traffic sample of instance %s was not recorded", task_id, instance_id)


def human(nbytes: int) -> str:
    """Decimal units, as the limit is given (1 GB = 10^9 bytes): "1.5 MB", "12.0 GB"."""
    value = float(nbytes)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")  # pragma: no cover


def this_month(now: datetime | None = None):
    return InstanceTraffic.objects.filter(period=month_start(now or timezone.now()))


def current(instance: Instance, now: datetime | None = None) -> dict:
    """The API's ``traffic``: this month's counters (zeros before the first sample)."""
    period = month_start(now or timezone.now())
    rows = getattr(instance, "traffic_this_month", None)
    if rows is None:
        rows = list(InstanceTraffic.objects.filter(instance=instance, period=period))
    row = rows[0] if rows else None
    return {
        "period": f"{period:%Y-%m}",
        "rx_bytes": row.rx_bytes if row else 0,
        "tx_bytes": row.tx_bytes if row else 0,
    }


def limit_bytes(instance: Instance) -> int | None:
    """The owner's monthly traffic limit in bytes (None: no limit).

    Every start and restart a user asks for reads it, inside the request's
    transaction: one precompiled statement (tasks.engine.sql) instead of an ORM
    query built each time, which cost a third of a request's CPU.
    """
    from tasks.engine import sql
    from tasks.models import UserQuota

    row = sql.fetchone(
        f"SELECT {sql.col(UserQuota, 'max_traffic_gb')} FROM {sql.table(UserQuota).name} "
        f"WHERE {sql.col(UserQuota, 'user')} = %s",
        [instance.owner_id],
    )
    gb = None if row is None else row[0]
    return None if gb is None else gb * GB


def over_limit(instance: Instance, now: datetime | None = None) -> bool:
    limit = limit_bytes(instance)
    if limit is None:
        return False
    used = current(instance, now)
    return used["rx_bytes"] + used["tx_bytes"] > limit


def over_limit_rows(now: datetime | None = None):
    """This month's rows of instances over their owner's limit."""
    return (
        InstanceTraffic.objects.filter(
            period=month_start(now or timezone.now()), instance__owner__quota__max_traffic_gb__isnull=False
        )
        .annotate(total=F("rx_bytes") + F("tx_bytes"))
        .filter(total__gt=F("instance__owner__quota__max_traffic_gb") * GB)
    )


def enforce_limits(now: datetime | None = None) -> list[int]:
    """Queue a stop (actor system) for each running instance over its limit; the stopped instances' ids."""
    from tasks import services
    from tasks.errors import ServiceError

    stopped = []
    rows = over_limit_rows(now).filter(instance__status=InstanceStatus.RUNNING, instance__active_task__isnull=True)
    for instance_id in rows.values_list("instance_id", flat=True):
        try:
            task = services.request_operation(
                None, instance_id, TaskType.STOP, admin=True, task_data={"reason": STOP_REASON}
            )
        except ServiceError as exc:  # busy or no longer running since the query: the next run sees it
            logger.info("traffic: instance %s over its limit not stopped now: %s", instance_id, exc.detail)
            continue
        logger.warning("traffic: instance %s is over its monthly limit: stop task %s", instance_id, task.pk)
        stopped.append(instance_id)
    return stopped


def sample_running(provider: Provider) -> int:
    """Read the counters of the provider's running instances (each sample is recorded); how many were read."""
    from providers.base import build_driver
    from tasks.engine.worker import provider_config
    from tasks.operations.steps import guest_ref

    instances = list(Instance.objects.filter(provider=provider, status=InstanceStatus.RUNNING).order_by("pk"))
    if not instances:
        return 0
    try:
        driver = build_driver(provider_config(provider))
    except Exception:
        logger.warning("traffic: provider %s: no driver, not sampled", provider.pk, exc_info=True)
        return 0
    read = 0
    for instance in instances:
        sample = traffic.sync(
            connection=provider.connection,
            driver=driver,
            target=traffic.TrafficTarget(
                instance_id=instance.pk,
                guest_name=instance.guest_name,
                addresses=list(instance.addresses or []),
                provider_ref=guest_ref(instance),
            ),
            phase=traffic.PERIODIC,
        )
        read += sample is not None
    return read


def sample_job() -> str:
    """The traffic schedule (tasks.schedules): sample running instances, then stop those over their limit."""
    read = 0
    for provider in Provider.objects.filter(enabled=True, unreachable_since__isnull=True).order_by("pk"):
        if traffic.enabled(provider.connection):
            read += sample_running(provider)
    stopped = enforce_limits()
    return f"{read} sample(s), {len(stopped)} instance(s) stopped over their traffic limit"
