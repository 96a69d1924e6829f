"""GET /api/v1/tasks/{id}/wait/ and GET /api/v1/tasks/stream/ as Django async views.

Under the ASGI server these paths never reach Django: config/asgi.py sends them
to tasks.api.live_asgi, which answers the same without a thread per open
connection. These views serve them under WSGI (config.wsgi, the test client),
where each waiting request holds its thread; the helpers below (the task read,
the replay, the permission check) are shared by both.

Both register with the process's tasks.live hub before they read the task(s),
so a change between the read and the registration still wakes them, and then
sleep until the hub's feed reports a change (or the time is up): no timer reads
the database on their behalf.

Authentication is the API's (a token or a session); errors keep the API's shape
``{"code", "detail"}`` (400 names the ``field``).
"""

from __future__ import annotations

import asyncio
import json
import logging

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET
from rest_framework.authtoken.models import Token

from tasks import live

logger = logging.getLogger(__name__)

MAX_WAIT_SECONDS = 60
TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off", "")


def _error(status: int, code: str, detail: str, **extra) -> JsonResponse:
    response = JsonResponse({"code": code, "detail": detail, **extra}, status=status)
    if status == 401:
        response["WWW-Authenticate"] = "Token"
    return response


async def _user(request):
    """The caller (token or session), or a JsonResponse refusing them."""
    header = request.headers.get("Authorization", "")
    if header:
        parts = header.split()
        if parts and parts[0].lower() == "token":
            if len(parts) != 2:
                return _error(401, "authentication_failed", "invalid token header")
            token = await Token.objects.select_related("user").filter(key=parts[1]).afirst()
            if token is None or not token.user.is_active:
                return _error(401, "authentication_failed", "invalid token")
            return token.user
    user = await request.auser()
    if user is None or not user.is_authenticated or not user.is_active:
        return _error(401, "not_authenticated", "authentication credentials were not provided")
    return user


def _read_task(user, task_id: int):
    from tasks.api.queueinfo import QueueInfo
    from tasks.api.serializers import TaskDetailSerializer
    from tasks.models import Task

    task = (
        Task.objects.filter(pk=task_id, owner=user)
        .select_related("provider", "instance", "owner", "initiator")
        .prefetch_related("events")
        .first()
    )
    if task is None:
        return None, None
    data = TaskDetailSerializer(task, context={"admin": False, "queue": QueueInfo(), "now": timezone.now()}).data
    return task.status, data


@csrf_exempt  # GET only: a POST gets 405, not a CSRF 403
@require_GET
async def wait(request, pk: str):
    """Answer when the task is terminal, or after ``timeout`` seconds (at most 60) with its state then."""
    user = await _user(request)
    if isinstance(user, HttpResponse):
        return user
    raw = request.GET.get("timeout", str(MAX_WAIT_SECONDS))
    try:
        timeout = float(raw)
        if timeout != timeout or timeout < 0:  # NaN or negative
            raise ValueError
    except ValueError:
        return _error(400, "invalid", "timeout: seconds, a number from 0 to 60", field="timeout")
    timeout = min(timeout, MAX_WAIT_SECONDS)
    try:
        task_id = int(pk)
    except ValueError:
        return _error(404, "not_found", "no such object")
    read = sync_to_async(_read_task)
    found = await live.wait_until_final(task_id, timeout, lambda pk: read(user, pk))
    if found is None:
        return _error(404, "not_found", "no such object")
    _status, data = found
    return JsonResponse(data, encoder=DjangoJSONEncoder, json_dumps_params={"separators": (",", ":")})


def _may_view_all(user) -> bool:
    return bool(user.is_staff and user.has_perm("tasks.view_task"))


@csrf_exempt
@require_GET
async def stream(request):
    """Server-Sent Events of the caller's tasks (``?all=1``: everyone's, for operators)."""
    user = await _user(request)
    if isinstance(user, HttpResponse):
        return user
    flag = request.GET.get("all", "").strip().lower()
    if flag not in TRUE + FALSE:
        return _error(400, "invalid", "all: 1 or 0", field="all")
    everyone = flag in TRUE
    if everyone and not await sync_to_async(_may_view_all)(user):
        return _error(403, "permission_denied", "?all=1 needs staff status and the tasks.view_task permission")
    raw_last = request.headers.get("Last-Event-ID", request.GET.get("last_event_id", "")).strip()
    last_id = None
    if raw_last:
        try:
            last_id = int(raw_last)
            if last_id < 0:
                raise ValueError
        except ValueError:
            return _error(400, "invalid", "Last-Event-ID: an event id from this stream", field="Last-Event-ID")

    hub = live.hub()
    watcher = hub.add_stream(user.pk, all=everyone)
    try:
        await hub.ready()  # the feed sees every change from here on
        replay = await sync_to_async(_replay)(None if everyone else user.pk, last_id, everyone)
    except BaseException:
        hub.remove_stream(watcher)
        raise

    async def events():
        try:
            yield f"retry: 3000\n: connected {json.dumps({'user': user.pk, 'all': everyone})}\n\n"
            # Ids only grow within a stream (a progress notice carries its task's last
            # event id, which may be older than one already sent).
            newest = last_id or 0
            for event_id, text in replay:
                newest = max(newest, event_id)
                yield live.sse("task", text, newest)
            keepalive = settings.LIVE_KEEPALIVE_SECONDS
            while not watcher.overflowed:
                try:
                    event_id, text = await asyncio.wait_for(watcher.queue.get(), keepalive)
                except TimeoutError:
                    yield ": keepalive\n\n"
                    continue
                newest = max(newest, event_id)
                yield live.sse("task", text, newest)
            logger.info("stream of user %s fell %d messages behind; closed", user.pk, settings.LIVE_QUEUE_SIZE)
        finally:
            hub.remove_stream(watcher)

    response = StreamingHttpResponse(events(), content_type="text/event-stream; charset=utf-8")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
    return response


def _replay(owner_id: int | None, last_id: int | None, everyone: bool) -> list[tuple[int, str]]:
    """What a reconnecting client missed (nothing on a first connect)."""
    if last_id is None:
        return []
    ids = live.resume_ids(owner_id, last_id)
    rendered = live.render(ids, user_view=not everyone, admin_view=everyone)
    out = []
    for pk in ids:
        item = rendered.get(pk)
        if item is not None:
            out.append((item.event_id, item.admin if everyone else item.user))
    return out
