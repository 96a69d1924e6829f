"""Signed webhooks: users' endpoints told when their tasks start and end.

Delivery is the worker tier's job (Supervisor.run starts :func:`start_thread`;
``manage.py deliver_webhooks`` runs the same loop), never a task's:

1. :func:`scan` reads the TaskEvent rows added since its cursor (the event log
   every transition writes in its own transaction is the outbox: nothing is added
   to a task's transaction and nothing can be lost between a commit and a
   notice), and for each transition that a webhook subscribes to writes one
   WebhookDelivery holding the exact body. The pair (webhook, event) is unique,
   so reading an event twice never doubles a delivery. The cursor is one row,
   locked while a scanner works (several machines take turns).
2. :func:`deliver_due` claims the deliveries that are due (a conditional UPDATE
   of ``locked_until``: another machine skips them), POSTs each body signed with
   ``X-Webhook-Signature: sha256=<hex HMAC-SHA256 of the body with the webhook's
   secret>``, with a 5 s timeout and no redirects, and logs every attempt. A
   failure is retried after 10 s, 30 s, 1, 2, 5, 10, 20, 30 min, then hourly
   (times WEBHOOK_BACKOFF_SCALE) until WEBHOOK_RETRY_SECONDS (a day) after the
   event, then the delivery is given up (``failed``). While a webhook's endpoint
   fails, its other due deliveries wait for the next attempt instead of each
   spending a timeout.

At least once: a delivery is marked delivered only after a 2xx answer, so a
crash between the answer and the mark sends it again (receivers dedupe on the
``X-Webhook-Delivery`` header).

Targets: unless WEBHOOK_ALLOW_PRIVATE_TARGETS, a URL whose host is or resolves to
a loopback, private, link-local, shared, reserved or multicast address is refused
when the webhook is saved and again at every attempt, after resolving the name;
the connection then goes to the very address that was checked (no second lookup
that a rebinding DNS server could answer differently).
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from urllib.parse import urlsplit

from django.conf import settings
from django.db import close_old_connections, connection, transaction
from django.db.models import Max, Min, Q
from django.utils import timezone
from django.utils.translation import gettext as _

from tasks.engine.states import CANCELLED, COMPLETED, FAILED, RUNNING, TIMEOUT
from tasks.errors import InvalidInput
from tasks.models import TaskEvent, Webhook, WebhookAttempt, WebhookCursor, WebhookDelivery

logger = logging.getLogger(__name__)

EVENTS: dict[str, str] = {
    RUNNING: "task.started",
    COMPLETED: "task.completed",
    FAILED: "task.failed",
    TIMEOUT: "task.timeout",
    CANCELLED: "task.cancelled",
}
ALL_EVENTS = tuple(Webhook.EVENTS)
BACKOFF_SECONDS = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
# A TaskEvent id older than this is trusted to have no lower id still uncommitted.
SCAN_GAP_SECONDS = 10
USER_AGENT = "cloudhost-webhooks/1"
MAX_RESPONSE_BYTES = 4096


class Refused(Exception):
    """The target is not allowed (a private address, a bad URL)."""


# --- targets --------------------------------------------------------------------------


def _public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def resolve(host: str, port: int) -> list[str]:
    """Every address the name resolves to (a literal address: itself)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise Refused(_("%(host)s does not resolve: %(error)s") % {"host": host, "error": exc}) from None
    return list(dict.fromkeys(info[4][0] for info in infos))


def check_target(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, address to connect to) of an allowed URL, or Refused."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Refused(_("the URL must be http:// or https:// with a host"))
    if parts.username or parts.password:
        raise Refused(_("the URL must not carry credentials"))
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise Refused(_("the URL's port is not a number from 1 to 65535")) from None
    host = parts.hostname
    addresses = resolve(host, port)
    if not addresses:
        raise Refused(_("%(host)s does not resolve") % {"host": host})
    if not settings.WEBHOOK_ALLOW_PRIVATE_TARGETS:
        for address in addresses:
            if not _public(ipaddress.ip_address(address.split("%", 1)[0])):
                raise Refused(
                    _("%(host)s resolves to %(address)s, a loopback, private or reserved address")
                    % {"host": host, "address": address}
                )
    return parts.scheme, host, port, addresses[0]


def validate_url(url: str) -> str:
    """The API's and the console's check of a new webhook's URL (400 naming ``url``)."""
    url = (url or "").strip()
    if not url:
        raise InvalidInput(_("url is required"), field="url")
    if len(url) > 500:
        raise InvalidInput(_("url: at most 500 characters"), field="url")
    try:
        check_target(url)
    except Refused as exc:
        raise InvalidInput(f"url: {exc}", field="url") from None
    return url


def validate_events(events) -> list[str]:
    if events in (None, ""):
        return list(ALL_EVENTS)
    if not isinstance(events, list) or not events or not all(isinstance(e, str) for e in events):
        raise InvalidInput(
            _("events: a non-empty list of %(known)s") % {"known": ", ".join(ALL_EVENTS)}, field="events"
        )
    unknown = [e for e in events if e not in ALL_EVENTS]
    if unknown:
        raise InvalidInput(
            _("events: unknown %(unknown)s (known: %(known)s)")
            % {"unknown": ", ".join(unknown), "known": ", ".join(ALL_EVENTS)},
            field="events",
        )
    return list(dict.fromkeys(events))


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


# --- scan: events -> deliveries -------------------------------------------------------------


def scan(limit: int = 1000) -> int:
    """Turn new TaskEvent rows into deliveries; the number of deliveries written."""
    hooks = list(Webhook.objects.filter(enabled=True).values_list("id", "owner_id", "events", "created_at"))
    if not hooks:
        return 0
    by_owner: dict[int, list[tuple[int, list[str], object]]] = defaultdict(list)
    for pk, owner, events, created in hooks:
        by_owner[owner].append((pk, events or list(ALL_EVENTS), created))
    written = 0
    with transaction.atomic():
        cursor = WebhookCursor.objects.select_for_update().filter(pk=1).first()
        if cursor is None:
            cursor = _first_cursor(min(created for *_rest, created in hooks))
        rows = list(
            TaskEvent.objects.filter(id__gt=cursor.last_event_id)
            .order_by("id")
            .values_list("id", "task_id", "task__owner_id", "kind", "to_status", "from_status", "at")[:limit]
        )
        if not rows:
            return 0
        wanted: list[tuple[int, int, int, str]] = []  # (webhook, event id, task, event name)
        for event_id, task_id, owner_id, kind, to_status, from_status, at in rows:
            name = EVENTS.get(to_status)
            if kind != TaskEvent.KIND_TRANSITION or name is None or from_status == to_status:
                continue
            for hook_id, events, created in by_owner.get(owner_id, ()):
                if name in events and at >= created:
                    wanted.append((hook_id, event_id, task_id, name))
        if wanted:
            done = set(
                WebhookDelivery.objects.filter(event_id__in={w[1] for w in wanted}).values_list(
                    "webhook_id", "event_id"
                )
            )
            wanted = [w for w in wanted if (w[0], w[1]) not in done]
        if wanted:
            from tasks.live import render

            rendered = render(sorted({w[2] for w in wanted}))
            now = timezone.now()
            deliveries = [
                WebhookDelivery(
                    webhook_id=hook_id,
                    task_id=task_id,
                    event_id=event_id,
                    event=name,
                    body=f'{{"event":{json.dumps(name)},"task":{rendered[task_id].user}}}',
                    created_at=now,
                    next_attempt_at=now,
                )
                for hook_id, event_id, task_id, name in wanted
                if task_id in rendered
            ]
            WebhookDelivery.objects.bulk_create(deliveries, ignore_conflicts=True)
            written = len(deliveries)
        # Advance past the events old enough that no lower id can still commit; the
        # younger ones are read again next time (and skipped: their deliveries exist).
        horizon = timezone.now() - timedelta(seconds=SCAN_GAP_SECONDS)
        last = cursor.last_event_id
        for event_id, *_rest, at in rows:
            if at > horizon and len(rows) < limit:
                break
            last = event_id
        if last != cursor.last_event_id:
            WebhookCursor.objects.filter(pk=1).update(last_event_id=last, updated_at=timezone.now())
    return written


def _first_cursor(since) -> WebhookCursor:
    """The cursor's first position: just before the first event the oldest webhook may see."""
    first = TaskEvent.objects.filter(at__gte=since).aggregate(m=Min("id"))["m"]
    start = (first - 1) if first else (TaskEvent.objects.aggregate(m=Max("id"))["m"] or 0)
    WebhookCursor.objects.bulk_create([WebhookCursor(pk=1, last_event_id=start)], ignore_conflicts=True)
    return WebhookCursor.objects.select_for_update().get(pk=1)


# --- delivery ----------------------------------------------------------------------------------


def backoff(attempts: int) -> timedelta:
    """The wait after the ``attempts``-th failed attempt."""
    step = BACKOFF_SECONDS[min(attempts, len(BACKOFF_SECONDS)) - 1]
    return timedelta(seconds=step * settings.WEBHOOK_BACKOFF_SCALE)


class _PinnedHTTP(http.client.HTTPConnection):
    """HTTP to the checked address, with the URL's host in the Host header."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to the checked address; the certificate is checked against the URL's host."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def post(url: str, body: bytes, headers: dict[str, str]) -> int:
    """One POST; the response code (no redirect is followed: a 3xx is a failure). Raises
    Refused for a target that is not allowed, OSError for network errors."""
    scheme, host, port, address = check_target(url)
    parts = urlsplit(url)
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    cls = _PinnedHTTPS if scheme == "https" else _PinnedHTTP
    conn = cls(host, port, address, settings.WEBHOOK_TIMEOUT_SECONDS)
    try:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        response.read(MAX_RESPONSE_BYTES)
        return response.status
    finally:
        conn.close()


def _attempt(delivery: WebhookDelivery, hook: Webhook) -> tuple[bool, int | None, str, int]:
    """(ok, response code, error, milliseconds) of one attempt; never raises."""
    body = delivery.body.encode()
    started = time.monotonic()
    try:
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "X-Webhook-Event": delivery.event,
            "X-Webhook-Delivery": str(delivery.pk),
            "X-Webhook-Signature": sign(hook.secret, body),
        }
        code = post(hook.url, body, headers)
    except Refused as exc:
        return False, None, f"refused: {exc}"[:500], _ms(started)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        return False, None, f"{type(exc).__name__}: {exc}"[:500], _ms(started)
    ok = 200 <= code < 300
    return ok, code, "" if ok else f"HTTP {code}", _ms(started)


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _claim(now, limit: int) -> list[WebhookDelivery]:
    """Due deliveries this process may send, locked for a while (another deliverer skips them)."""
    due = list(
        WebhookDelivery.objects.filter(status=WebhookDelivery.PENDING, next_attempt_at__lte=now)
        .filter(Q(locked_until__isnull=True) | Q(locked_until__lt=now))
        .order_by("next_attempt_at", "id")
        .values_list("id", flat=True)[:limit]
    )
    if not due:
        return []
    hold = now + timedelta(seconds=settings.WEBHOOK_TIMEOUT_SECONDS * 4 + 60)
    claimed = []
    for pk in due:
        won = (
            WebhookDelivery.objects.filter(pk=pk, status=WebhookDelivery.PENDING)
            .filter(Q(locked_until__isnull=True) | Q(locked_until__lt=now))
            .update(locked_until=hold)
        )
        if won:
            claimed.append(pk)
    return list(WebhookDelivery.objects.filter(pk__in=claimed).select_related("webhook").order_by("next_attempt_at"))


def _deliver_group(hook: Webhook, deliveries: list[WebhookDelivery]) -> int:
    """One webhook's due deliveries, in order; after a failure the rest wait for the next try."""
    attempted = 0
    for index, delivery in enumerate(deliveries):
        ok, code, error, ms = _attempt(delivery, hook)
        attempted += 1
        _record(delivery, ok, code, error, ms)
        if not ok:
            rest = [d.pk for d in deliveries[index + 1 :]]
            if rest:
                retry_at = WebhookDelivery.objects.filter(pk=delivery.pk).values_list("next_attempt_at", flat=True)
                WebhookDelivery.objects.filter(pk__in=rest, status=WebhookDelivery.PENDING).update(
                    locked_until=None, next_attempt_at=retry_at.first() or timezone.now()
                )
            break
    return attempted


def _record(delivery: WebhookDelivery, ok: bool, code: int | None, error: str, ms: int) -> None:
    now = timezone.now()
    attempts = delivery.attempts + 1
    fields: dict = {
        "attempts": attempts,
        "last_attempt_at": now,
        "last_response_code": code,
        "last_error": error,
        "locked_until": None,
    }
    if ok:
        fields.update(status=WebhookDelivery.DELIVERED, delivered_at=now)
    else:
        retry_at = now + backoff(attempts)
        if retry_at > delivery.created_at + timedelta(seconds=settings.WEBHOOK_RETRY_SECONDS):
            fields["status"] = WebhookDelivery.FAILED
            logger.warning(
                "webhook %s: delivery %s (task %s, %s) given up after %d attempts: %s",
                delivery.webhook_id,
                delivery.pk,
                delivery.task_id,
                delivery.event,
                attempts,
                error,
            )
        else:
            fields["next_attempt_at"] = retry_at
    with transaction.atomic():
        WebhookAttempt.objects.create(
            delivery_id=delivery.pk, at=now, ok=ok, response_code=code, error=error, duration_ms=ms
        )
        WebhookDelivery.objects.filter(pk=delivery.pk).update(**fields)
    if not ok:
        logger.info(
            "webhook %s: delivery %s (task %s) failed: %s", delivery.webhook_id, delivery.pk, delivery.task_id, error
        )


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(settings.WEBHOOK_CONCURRENCY, thread_name_prefix="webhook")
        return _pool


def deliver_due(limit: int | None = None) -> int:
    """Send what is due (webhooks in parallel, each one's deliveries in order); attempts made."""
    claimed = _claim(timezone.now(), limit or settings.WEBHOOK_BATCH)
    if not claimed:
        return 0
    groups: dict[int, list[WebhookDelivery]] = defaultdict(list)
    hooks: dict[int, Webhook] = {}
    for delivery in claimed:
        groups[delivery.webhook_id].append(delivery)
        hooks[delivery.webhook_id] = delivery.webhook
    if settings.WEBHOOK_CONCURRENCY == 1 or len(groups) == 1:
        return sum(_deliver_group(hooks[pk], group) for pk, group in groups.items())
    futures = [_executor().submit(_in_pool_thread, hooks[pk], group) for pk, group in groups.items()]
    return sum(f.result() for f in futures)


def _in_pool_thread(hook: Webhook, deliveries: list[WebhookDelivery]) -> int:
    try:
        return _deliver_group(hook, deliveries)
    finally:
        connection.close()  # the pool thread's own connection


def run_once() -> tuple[int, int]:
    """One round: (deliveries written by the scan, attempts made)."""
    written = scan()
    return written, deliver_due()


def run_forever(stopping: Callable[[], bool]) -> None:
    """The deliverer's loop (the worker tier's thread, the management command)."""
    while not stopping():
        close_old_connections()
        busy = False
        try:
            if Webhook.objects.exists():
                written, attempted = run_once()
                busy = attempted >= settings.WEBHOOK_BATCH
        except Exception:
            logger.exception("webhooks: delivery round failed; retrying")
            connection.close()
        deadline = time.monotonic() + (0 if busy else settings.WEBHOOK_POLL_SECONDS)
        while not stopping() and time.monotonic() < deadline:
            time.sleep(min(0.05, settings.WEBHOOK_POLL_SECONDS))
    connection.close()


def start_thread(stopping: Callable[[], bool]) -> threading.Thread:
    """Run the deliverer beside the worker tier's loop (Supervisor.run)."""
    thread = threading.Thread(target=run_forever, args=(stopping,), name="webhooks", daemon=True)
    thread.start()
    return thread
