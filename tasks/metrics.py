"""Prometheus metrics, read from the database at scrape time.

A custom collector rather than counters incremented in-process: the truth is
in the database, shared by every web and worker process on every machine, so
any process answers /metrics with the same figures and nothing is lost on a
restart. The aggregate comes from tasks.stats.task_counts, which keeps a
scrape cheap on large tables (see its module doc).

Exposed (prefix ``cloudhost_``):

- ``tasks{status,provider}`` gauge: tasks by state and provider (zeros included).
- ``task_queue_length{provider}`` gauge: pending tasks.
- ``task_queue_wait_seconds{provider}`` gauge: how long the oldest pending task
  has waited (0 for an empty queue): what the queue alert watches.
- ``tasks_running{provider}`` gauge: tasks holding a slot (running or cancelling).
- ``provider_concurrency_limit{provider}`` gauge, ``provider_enabled{provider}`` gauge,
  ``provider_reachable{provider}`` gauge (0 while its queue is held, tasks.engine.health).
- ``task_duration_seconds{task_type}`` histogram of completed tasks (cumulative
  over every completed task in the table, so rate() works).
- ``tasks_finished_total{task_type,status}`` counter: terminal tasks.
- ``task_failures_total{reason}`` counter: failed or timed-out tasks by error code.
- ``task_lease_expiries_total`` counter: tasks recovered after their worker
  stopped renewing the lease (error code worker_lost).
- ``task_resumptions_total{reason}`` counter: running tasks sent back to pending to
  be resumed by another worker: ``worker_lost`` (its lease ran out) or ``handback``
  (graceful shutdown). Counted from their events (the (kind, to_status) index).
- ``workers_live``, ``workers_busy`` gauges and ``worker_utilization`` gauge.

Counters only go down when old tasks are purged; Prometheus treats that as a
counter reset.
"""

from __future__ import annotations

from collections import defaultdict

from django.utils import timezone
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from tasks import stats
from tasks.engine.states import ALL_STATES, CANCELLING, COMPLETED, FAILED, FINAL, PENDING, RUNNING, TIMEOUT, ErrorCode
from tasks.models import Provider, Task, TaskEvent

PREFIX = "cloudhost"


class TaskCollector(Collector):
    def collect(self):
        counts = stats.task_counts()
        providers = {p.pk: p for p in Provider.objects.order_by("name", "id")}
        by_status_provider: dict[tuple[str, int], int] = defaultdict(int)
        finished: dict[tuple[str, str], int] = defaultdict(int)
        failures: dict[str, int] = defaultdict(int)
        buckets: dict[str, list[int]] = defaultdict(lambda: [0] * (len(stats.HISTOGRAM_BUCKETS) + 1))
        duration_sum: dict[str, float] = defaultdict(float)
        lease_expiries = 0
        for (status, task_type, provider_id, code, bucket), (n, seconds) in counts.items():
            by_status_provider[(status, provider_id)] += n
            if status in FINAL:
                finished[(task_type, status)] += n
            if status in (FAILED, TIMEOUT):
                failures[code or status] += n
            if code == ErrorCode.WORKER_LOST:
                lease_expiries += n
            if status == COMPLETED and bucket != stats.NO_BUCKET:
                buckets[task_type][bucket] += n
                duration_sum[task_type] += seconds

        tasks = GaugeMetricFamily(f"{PREFIX}_tasks", "Tasks by state and provider", labels=["status", "provider"])
        queue = GaugeMetricFamily(f"{PREFIX}_task_queue_length", "Pending tasks per provider", labels=["provider"])
        running = GaugeMetricFamily(
            f"{PREFIX}_tasks_running", "Tasks holding a slot (running or cancelling)", labels=["provider"]
        )
        limit = GaugeMetricFamily(
            f"{PREFIX}_provider_concurrency_limit", "Concurrency limit per provider", labels=["provider"]
        )
        enabled = GaugeMetricFamily(f"{PREFIX}_provider_enabled", "1 when the provider is enabled", labels=["provider"])
        reachable = GaugeMetricFamily(
            f"{PREFIX}_provider_reachable",
            "0 while the provider is held as unreachable (its queue waits for it to answer)",
            labels=["provider"],
        )
        wait = GaugeMetricFamily(
            f"{PREFIX}_task_queue_wait_seconds",
            "Seconds the oldest pending task of the provider has waited (0 when none waits)",
            labels=["provider"],
        )
        now = timezone.now()
        slots = 0
        for pid, provider in providers.items():
            name = provider.name
            for status in ALL_STATES:
                tasks.add_metric([status, name], by_status_provider.get((status, pid), 0))
            queue.add_metric([name], by_status_provider.get((PENDING, pid), 0))
            wait.add_metric([name], _oldest_wait(pid, now) if by_status_provider.get((PENDING, pid)) else 0.0)
            in_use = by_status_provider.get((RUNNING, pid), 0) + by_status_provider.get((CANCELLING, pid), 0)
            running.add_metric([name], in_use)
            limit.add_metric([name], provider.concurrency_limit)
            enabled.add_metric([name], 1 if provider.enabled else 0)
            reachable.add_metric([name], 0 if provider.unreachable_since is not None else 1)
            if provider.enabled:
                slots += provider.concurrency_limit
        yield from (tasks, queue, wait, running, limit, enabled, reachable)

        histogram = HistogramMetricFamily(
            f"{PREFIX}_task_duration_seconds", "Run time of completed tasks", labels=["task_type"]
        )
        for task_type in sorted(buckets):
            cumulative, series = 0, []
            for bound, n in zip([*stats.HISTOGRAM_BUCKETS, float("inf")], buckets[task_type], strict=True):
                cumulative += n
                series.append((floatToGoString(bound), cumulative))
            histogram.add_metric([task_type], series, duration_sum[task_type])
        yield histogram
        yield _wait_histogram()

        done = CounterMetricFamily(
            f"{PREFIX}_tasks_finished", "Tasks that reached a terminal state", labels=["task_type", "status"]
        )
        for (task_type, status), n in sorted(finished.items()):
            done.add_metric([task_type, status], n)
        yield done

        failed = CounterMetricFamily(
            f"{PREFIX}_task_failures", "Failed or timed-out tasks by reason (error code)", labels=["reason"]
        )
        for code, n in sorted(failures.items()):
            failed.add_metric([code], n)
        yield failed

        yield CounterMetricFamily(
            f"{PREFIX}_task_lease_expiries",
            "Tasks recovered after their worker stopped renewing the lease (worker_lost)",
            value=lease_expiries,
        )

        resumed = CounterMetricFamily(
            f"{PREFIX}_task_resumptions",
            "Running tasks sent back to pending to be resumed (worker_lost or handback at shutdown)",
            labels=["reason"],
        )
        for reason, n in resumption_counts().items():
            resumed.add_metric([reason], n)
        yield resumed

        workers = stats.worker_counts()
        yield GaugeMetricFamily(f"{PREFIX}_workers_live", "Worker processes with a recent heartbeat", workers["live"])
        yield GaugeMetricFamily(f"{PREFIX}_workers_busy", "Live workers running a task", workers["busy"])
        in_use = sum(v for (status, _pid), v in by_status_provider.items() if status in (RUNNING, CANCELLING))
        yield GaugeMetricFamily(
            f"{PREFIX}_worker_utilization",
            "Tasks holding a slot / sum of the limits of enabled providers",
            in_use / slots if slots else 0.0,
        )


def resumption_counts() -> dict[str, int]:
    """Resumptions by reason (worker_lost, handback), both always present."""
    from django.db.models import Count

    from tasks.engine.transitions import RESUMED_HANDBACK, RESUMED_LOST

    rows = (
        TaskEvent.objects.filter(kind=TaskEvent.KIND_TRANSITION, to_status=PENDING)
        .values("reason")
        .annotate(n=Count("id"))
        .values_list("reason", "n")
    )
    found = dict(rows)
    return {
        label: found.get(reason, 0) for label, reason in (("worker_lost", RESUMED_LOST), ("handback", RESUMED_HANDBACK))
    }


def _oldest_wait(provider_id: int, now) -> float:
    """Age of the provider's oldest pending task: one seek in the admission index."""
    oldest = (
        Task.objects.filter(provider_id=provider_id, status=PENDING)
        .order_by("created_at", "id")
        .values_list("created_at", flat=True)
        .first()
    )
    return max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0


def _wait_histogram() -> HistogramMetricFamily:
    """created -> started of the tasks started in the last 24 h (a window, not a counter since start:
    use histogram_quantile on it directly, not over rate())."""
    from tasks.waitstats import BUCKETS, wait_stats

    family = HistogramMetricFamily(
        f"{PREFIX}_task_wait_seconds",
        "Seconds from created to started of tasks started in the last 24 h",
        labels=["provider", "task_type"],
    )
    for row in wait_stats()["by_provider_type"]:
        cumulative, series = 0, []
        for bound, n in zip([*BUCKETS, float("inf")], row["buckets"], strict=True):
            cumulative += n
            series.append((floatToGoString(bound), cumulative))
        family.add_metric([row["provider"]["name"], row["task_type"]], series, row["sum"])
    return family


registry = CollectorRegistry(auto_describe=False)
registry.register(TaskCollector())


def render() -> bytes:
    """The Prometheus text exposition of every metric above."""
    return generate_latest(registry)
