"""Live task changes for the front end: one change feed per web process.

Writers (tasks.engine.transitions, tasks.services) call :func:`publish` inside
their transaction; it costs nothing with the ORM broker and one Redis PUBLISH
after commit with Redis. Readers (the ``wait`` and ``stream`` endpoints,
tasks.api.live_views) register with the process's :class:`Hub`, which runs one
feed while anyone watches:

- ``Q_BROKER=redis``: a subscription to the channel :func:`publish` writes to;
  a change reaches the watchers a few milliseconds after its commit.
- ORM broker: one poll every ``LIVE_POLL_SECONDS`` of the TaskEvent rows added
  since the last poll (every transition and every step writes one), plus one
  read of the running tasks' progress (progress alone writes no event). Two
  queries per process per tick, whatever the number of watchers.

A change wakes the watchers through asyncio events and queues; nobody polls per
watcher. The hub renders each changed task once per batch (the user's view and,
when an operator watches everything, the admin's) and hands the same text to
every watcher that may see it.

SSE ids are TaskEvent ids (the newest of the task when it was rendered): a
client that reconnects with ``Last-Event-ID: N`` gets the current state of each
of its tasks with an event after N, and of each of its active tasks (their
progress may have moved meanwhile).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from asgiref.sync import SyncToAsync
from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import close_old_connections, connection, transaction
from django.db.models import Max
from django.utils import timezone

logger = logging.getLogger(__name__)

# A change of a task: (task id, owner id or None when the writer did not know it).
Change = tuple[int, int | None]


# --- writers ------------------------------------------------------------------------------

_redis_lock = threading.Lock()
_redis_clients: dict[str, Any] = {}


def channel() -> str:
    """The Redis channel of this database's changes (several systems may share one Redis)."""
    return settings.LIVE_CHANNEL or f"cloudhost:live:{connection.settings_dict['NAME']}"


def _redis():
    url = settings.REDIS_URL
    with _redis_lock:
        client = _redis_clients.get(url)
        if client is None:
            import redis

            client = _redis_clients[url] = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        return client


def publish(task_id: int, owner_id: int | None = None) -> None:
    """Tell the web processes that the task changed, once the current transaction commits.

    With the ORM broker there is nothing to do (the feed reads the TaskEvent rows);
    with Redis one PUBLISH after commit. Never raises: a lost notice only means a
    watcher learns of the change at its next one (or its client's reconnect).
    """
    if settings.Q_BROKER != "redis":
        return
    message = json.dumps({"task": task_id, "owner": owner_id})

    def send() -> None:
        try:
            _redis().publish(channel(), message)
        except Exception as exc:  # the task's work must go on
            logger.warning("task %s: live notice not published: %s", task_id, exc)

    transaction.on_commit(send)


async def wait_until_final(task_id: int, timeout: float, read) -> tuple[Any, Any] | None:
    """The task as ``read(task_id)`` gives it (``(status, data)``; status None: not there) once it
    is terminal, or after ``timeout`` seconds: woken by the feed, never by a timer. None when the
    task is not there (or went away meanwhile). Both web tiers' ``wait`` endpoints use it."""
    from tasks.engine.states import FINAL

    waiters = hub()
    event = waiters.add_waiter(task_id)
    try:
        await waiters.ready()
        deadline = time.monotonic() + timeout
        status, data = await read(task_id)
        while status is not None and status not in FINAL:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                break
            event.clear()
            status, data = await read(task_id)
    finally:
        waiters.remove_waiter(task_id, event)
    return None if status is None else (status, data)


# --- rendering ------------------------------------------------------------------------------


@dataclass
class Rendered:
    task_id: int
    owner_id: int
    event_id: int
    status: str
    user: str | None = None  # the task as its owner sees it (JSON)
    admin: str | None = None  # as operators see it


def _dumps(data: Any) -> str:
    return json.dumps(data, cls=DjangoJSONEncoder, separators=(",", ":"))


def render(task_ids: list[int], *, user_view: bool = True, admin_view: bool = False) -> dict[int, Rendered]:
    """The tasks as the list endpoints show them, one query for the rows (sync)."""
    from tasks.api.queueinfo import QueueInfo
    from tasks.api.serializers import AdminTaskSerializer, TaskSerializer
    from tasks.engine.states import PENDING
    from tasks.models import Task, TaskEvent

    if not task_ids:
        return {}
    tasks = list(
        Task.objects.filter(pk__in=task_ids)
        .select_related("provider", "instance", "owner", "initiator")
        .defer("task_data")
    )
    last = dict(
        TaskEvent.objects.filter(task_id__in=task_ids)
        .values("task_id")
        .annotate(m=Max("id"))
        .values_list("task_id", "m")
    )
    now = timezone.now()
    queue = QueueInfo()
    queue.prefetch(t for t in tasks if t.status == PENDING)
    out: dict[int, Rendered] = {}
    for task in tasks:
        item = Rendered(task.pk, task.owner_id, last.get(task.pk, 0), task.status)
        if user_view:
            item.user = _dumps(TaskSerializer(task, context={"admin": False, "queue": queue, "now": now}).data)
        if admin_view:
            item.admin = _dumps(AdminTaskSerializer(task, context={"admin": True, "queue": queue, "now": now}).data)
        out[task.pk] = item
    return out


def resume_ids(owner_id: int | None, after_event_id: int, limit: int = 500) -> list[int]:
    """Tasks a client reconnecting after ``after_event_id`` must hear of: those with a
    newer event and the active ones (progress moves without events), oldest change first."""
    from tasks.engine.states import ACTIVE
    from tasks.models import Task, TaskEvent

    events = TaskEvent.objects.filter(id__gt=after_event_id)
    active = Task.objects.filter(status__in=ACTIVE)
    if owner_id is not None:
        events = events.filter(task__owner_id=owner_id)
        active = active.filter(owner_id=owner_id)
    changed = list(
        events.values("task_id").annotate(m=Max("id")).order_by("-m").values_list("task_id", flat=True)[:limit]
    )
    seen = set(changed)
    ids = list(reversed(changed))
    for pk in active.order_by("id").values_list("id", flat=True)[:limit]:
        if pk not in seen:
            ids.append(pk)
    return ids


# --- feeds ---------------------------------------------------------------------------------


class OrmFeed:
    """One poll per tick of new TaskEvent rows and of running tasks' progress (sync, one thread)."""

    def __init__(self) -> None:
        self.low = None  # every event id <= low was seen (or predates the feed)
        self.seen: dict[int, float] = {}  # ids above low already reported -> when first seen
        self.progress: dict[int, tuple[int, str]] | None = None

    def poll(self) -> list[Change]:
        from tasks.engine.states import EXECUTING
        from tasks.models import Task, TaskEvent

        _check_connection()
        try:
            return self._poll(Task, TaskEvent, EXECUTING)
        except Exception:
            logger.exception("live feed: poll failed; retrying at the next tick")
            connection.close()
            return []

    def _poll(self, Task, TaskEvent, EXECUTING) -> list[Change]:
        changes: dict[int, int | None] = {}
        if self.low is None:
            self.low = TaskEvent.objects.aggregate(m=Max("id"))["m"] or 0
        rows = list(
            TaskEvent.objects.filter(id__gt=self.low)
            .order_by("id")
            .values_list("id", "task_id", "task__owner_id")[: settings.LIVE_BATCH]
        )
        now = time.monotonic()
        for event_id, task_id, owner_id in rows:
            if event_id not in self.seen:
                self.seen[event_id] = now
                changes[task_id] = owner_id
        # Ids are handed out at INSERT but become visible at COMMIT: a lower id may
        # appear after a higher one. So the low-water mark only passes ids seen for
        # LIVE_GAP_SECONDS, and everything above it is read again (the seen set
        # keeps each event to one report).
        if rows and len(rows) >= settings.LIVE_BATCH:
            # Far behind (a burst): skip the gap check for this batch.
            self.low = rows[-1][0]
        else:
            old = [i for i, t in self.seen.items() if now - t >= settings.LIVE_GAP_SECONDS]
            if old:
                ordered = sorted(self.seen)
                low = self.low
                for i in ordered:
                    if now - self.seen[i] >= settings.LIVE_GAP_SECONDS:
                        low = i
                    else:
                        break
                self.low = low
        self.seen = {i: t for i, t in self.seen.items() if i > self.low}
        progress: dict[int, tuple[int, str]] = {}
        owners: dict[int, int] = {}
        for pk, owner, value, message in Task.objects.filter(status__in=EXECUTING).values_list(
            "id", "owner_id", "progress", "status_message"
        ):
            progress[pk] = (value, message)
            owners[pk] = owner
        if self.progress is not None:
            for pk, value in progress.items():
                if self.progress.get(pk) != value and pk not in changes:
                    changes[pk] = owners[pk]
        self.progress = progress
        return list(changes.items())


@dataclass(eq=False)
class StreamWatcher:
    owner_id: int
    all: bool = False
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(maxsize=settings.LIVE_QUEUE_SIZE))
    overflowed: bool = False


class Hub:
    """The watchers of one process (one event loop) and the feed that serves them."""

    def __init__(self) -> None:
        self.waiters: dict[int, set[asyncio.Event]] = defaultdict(set)
        self.streams: set[StreamWatcher] = set()
        self.runner: asyncio.Task | None = None
        self.started: asyncio.Event | None = None  # set once the feed has its starting point
        self.loop: asyncio.AbstractEventLoop | None = None
        # The feed's database work runs in one thread of its own (one connection).
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="live-feed")
        self.render_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="live-render")
        self.feed: OrmFeed | None = None
        self.batches = 0  # feed batches handled (tests, the benchmark)
        self.renders = 0  # render calls: at most one per batch, whatever the number of watchers

    # -- watchers
    def watching(self) -> bool:
        return bool(self.waiters or self.streams)

    def add_waiter(self, task_id: int) -> asyncio.Event:
        event = asyncio.Event()
        self.waiters[task_id].add(event)
        self._ensure_running()
        return event

    def remove_waiter(self, task_id: int, event: asyncio.Event) -> None:
        group = self.waiters.get(task_id)
        if group is not None:
            group.discard(event)
            if not group:
                del self.waiters[task_id]

    def add_stream(self, owner_id: int, *, all: bool = False) -> StreamWatcher:
        watcher = StreamWatcher(owner_id=owner_id, all=all)
        self.streams.add(watcher)
        self._ensure_running()
        return watcher

    def remove_stream(self, watcher: StreamWatcher) -> None:
        self.streams.discard(watcher)

    def _ensure_running(self) -> None:
        loop = asyncio.get_running_loop()
        if self.runner is None or self.runner.done() or self.loop is not loop:
            self.loop = loop
            self.started = asyncio.Event()
            self.runner = loop.create_task(self._run())

    async def ready(self, timeout: float = 5.0) -> None:
        """Until the feed has its starting point (the ORM feed's first read, the Redis
        subscription): a change committed after this reaches the watchers. A watcher that
        answers before it could miss what happens in between (a test caught it)."""
        self._ensure_running()
        try:
            await asyncio.wait_for(self.started.wait(), timeout)
        except TimeoutError:
            logger.warning("live feed: not started within %s s; watching anyway", timeout)

    # -- the feed
    async def _run(self) -> None:
        try:
            if settings.Q_BROKER == "redis":
                await self._run_redis()
            else:
                await self._run_orm()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("live feed stopped; the next watcher starts it again")
        finally:
            if self.runner is asyncio.current_task():
                self.runner = None

    async def _idle_exit(self, idle_since: float | None) -> tuple[bool, float | None]:
        """(stop now, idle since): the feed stops LIVE_IDLE_SECONDS after the last watcher left."""
        if self.watching():
            return False, None
        now = time.monotonic()
        if idle_since is None:
            return False, now
        return now - idle_since >= settings.LIVE_IDLE_SECONDS, idle_since

    async def _run_orm(self) -> None:
        if self.feed is None:
            self.feed = OrmFeed()
        poll = SyncToAsync(self.feed.poll, thread_sensitive=False, executor=self.executor)
        idle_since = None
        first = True
        while True:
            stop, idle_since = await self._idle_exit(idle_since)
            if stop:
                return
            started = time.monotonic()
            changes = await poll()
            if first:
                first = False
                self.started.set()
            if changes:
                await self.dispatch(changes)
            await asyncio.sleep(max(0.0, settings.LIVE_POLL_SECONDS - (time.monotonic() - started)))

    async def _run_redis(self) -> None:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(settings.REDIS_URL)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel())
            self.started.set()
            idle_since = None
            while True:
                stop, idle_since = await self._idle_exit(idle_since)
                if stop:
                    return
                message = await pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                batch = [message]
                # Whatever else arrived meanwhile goes in the same batch (one render).
                while len(batch) < settings.LIVE_BATCH:
                    more = await pubsub.get_message(timeout=0)
                    if more is None:
                        break
                    batch.append(more)
                changes: dict[int, int | None] = {}
                for item in batch:
                    try:
                        data = json.loads(item["data"])
                        changes[int(data["task"])] = data.get("owner")
                    except (ValueError, KeyError, TypeError):
                        logger.warning("live feed: ignored a malformed notice %r", item.get("data"))
                if changes:
                    await self.dispatch(list(changes.items()))
        finally:
            try:
                await pubsub.unsubscribe()
                await pubsub.aclose()
                await client.aclose()
            except Exception:
                pass

    async def dispatch(self, changes: list[Change]) -> None:
        """Wake the waiters of the changed tasks; render once and queue for the streams."""
        self.batches += 1
        for task_id, _owner in changes:
            for event in self.waiters.get(task_id, ()):
                event.set()
        if not self.streams:
            return
        admin_view = any(w.all for w in self.streams)
        owners = {w.owner_id for w in self.streams if not w.all}
        wanted = [t for t, owner in changes if admin_view or owner is None or owner in owners]
        if not wanted:
            return
        do_render = SyncToAsync(_render_in_thread, thread_sensitive=False, executor=self.render_executor)
        self.renders += 1
        try:
            # A notice without its owner (a progress write): only tasks someone here watches are rendered.
            unknown = any(owner is None for _t, owner in changes)
            watched = owners if unknown and not admin_view else None
            rendered = await do_render(wanted, admin_view, watched)
        except Exception:
            logger.exception("live feed: rendering %d task(s) failed", len(wanted))
            return
        for item in rendered.values():
            for watcher in list(self.streams):
                text = item.admin if watcher.all else (item.user if watcher.owner_id == item.owner_id else None)
                if text is None:
                    continue
                self.offer(watcher, (item.event_id, text))

    def offer(self, watcher: StreamWatcher, message: tuple[int, str]) -> None:
        try:
            watcher.queue.put_nowait(message)
        except asyncio.QueueFull:
            # A client this far behind reconnects and resumes from its Last-Event-ID.
            watcher.overflowed = True


_checked_at: dict[int, float] = {}


def _check_connection(every: float = 30.0) -> None:
    """close_old_connections at most every ``every`` seconds in this thread: with
    CONN_HEALTH_CHECKS it costs a round trip, too much before every render or poll."""
    now = time.monotonic()
    key = threading.get_ident()
    if now - _checked_at.get(key, 0.0) >= every:
        _checked_at[key] = now
        close_old_connections()


def _render_in_thread(task_ids: list[int], admin_view: bool, owners: set[int] | None = None) -> dict[int, Rendered]:
    from tasks.models import Task

    _check_connection()
    try:
        if owners is not None:
            task_ids = list(Task.objects.filter(pk__in=task_ids, owner_id__in=owners).values_list("id", flat=True))
        return render(task_ids, user_view=True, admin_view=admin_view)
    except Exception:
        connection.close()
        raise


def sse(event: str, data: str, event_id: int | None = None) -> str:
    """One Server-Sent Event (data is JSON: one line)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {data}\n\n"


_hubs: dict[int, Hub] = {}


def hub() -> Hub:
    """This event loop's hub (one per process under uvicorn; tests may run several loops)."""
    loop = asyncio.get_running_loop()
    found = _hubs.get(id(loop))
    if found is None or found.loop not in (None, loop):
        found = _hubs[id(loop)] = Hub()
    return found
