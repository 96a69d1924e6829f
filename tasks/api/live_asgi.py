"""The live endpoints as a plain ASGI application (config/asgi.py routes them here).

Django's ASGI handler gives every request a thread of its own for its synchronous
parts (asgiref's ThreadSensitiveContext: the middleware, the signals), kept until
the response ends: a stream would keep one thread, and that thread's database
connection, for as long as it is open. This application answers the same two
paths with the same behaviour as tasks.api.live_views (which serve them under
WSGI) without that: its few database reads (authentication, the task, the
replay) run on a small shared pool (LIVE_DB_THREADS threads and connections
per process), and a waiting client costs a coroutine and a socket.

Authentication: ``Authorization: Token <key>`` or the session cookie (the
admin's login), as in the rest of the API.
"""

from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from http.cookies import SimpleCookie
from types import SimpleNamespace
from urllib.parse import parse_qs

from asgiref.sync import SyncToAsync
from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import close_old_connections
from django.utils.translation import gettext_noop

from tasks import live
from tasks.api.live_views import FALSE, MAX_WAIT_SECONDS, TRUE, _may_view_all, _read_task, _replay

logger = logging.getLogger(__name__)

_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="live-db")


def _on_pool(func):
    def run(*args):
        close_old_connections()  # the pool's connections are kept (CONN_MAX_AGE), checked here
        return func(*args)

    return SyncToAsync(run, thread_sensitive=False, executor=_pool)


class Refusal(Exception):
    """A refused request. ``detail`` is an English message marked with gettext_noop (with
    ``%(name)s`` placeholders filled from ``params``): it is translated when the answer is
    sent, in the request's language (this app runs outside Django's LocaleMiddleware)."""

    def __init__(self, status: int, code: str, detail: str, params: dict | None = None, **extra):
        super().__init__(detail)
        self.status, self.detail, self.params = status, detail, params or {}
        self.body = {"code": code, "detail": detail % self.params if params else detail, **extra}

    def translated(self, headers: dict, cookie) -> dict:
        from django.utils import translation

        language_cookie = cookie.get(settings.LANGUAGE_COOKIE_NAME)
        request = SimpleNamespace(
            COOKIES={settings.LANGUAGE_COOKIE_NAME: language_cookie.value} if language_cookie else {},
            META={"HTTP_ACCEPT_LANGUAGE": headers.get("accept-language", "")},
        )
        with translation.override(translation.get_language_from_request(request)):
            text = translation.gettext(self.detail)
            return {**self.body, "detail": text % self.params if self.params else text}


def _authenticate(authorization: str, session_key: str | None):
    """The active user the request speaks for, or Refusal (sync, on the pool)."""
    from django.contrib.auth import get_user
    from rest_framework.authtoken.models import Token

    if authorization:
        parts = authorization.split()
        if parts and parts[0].lower() == "token":
            if len(parts) != 2:
                raise Refusal(401, "authentication_failed", gettext_noop("invalid token header"))
            token = Token.objects.select_related("user").filter(key=parts[1]).first()
            if token is None or not token.user.is_active:
                raise Refusal(401, "authentication_failed", gettext_noop("invalid token"))
            return token.user
    if session_key:
        from importlib import import_module

        store = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
        user = get_user(SimpleNamespace(session=store))
        if user.is_authenticated and user.is_active:
            return user
    raise Refusal(401, "not_authenticated", gettext_noop("authentication credentials were not provided"))


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


async def _send_json(send, status: int, body) -> None:
    data = json.dumps(body, cls=DjangoJSONEncoder, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Token"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


async def application(scope, receive, send) -> None:
    """GET /api/v1/tasks/stream/ and GET /api/v1/tasks/{id}/wait/ (config/asgi.py checks the path)."""
    path = scope["path"]
    headers = _headers(scope)
    cookie = SimpleCookie()
    try:
        if scope["method"] != "GET":
            raise Refusal(
                405, "method_not_allowed", gettext_noop('method "%(method)s" not allowed'), {"method": scope["method"]}
            )
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:
            pass
        morsel = cookie.get(settings.SESSION_COOKIE_NAME)
        query = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode("latin-1")).items()}
        user = await _on_pool(_authenticate)(headers.get("authorization", ""), morsel.value if morsel else None)
        if path.endswith("/stream/"):
            await _stream(scope, receive, send, user, query, headers)
        else:
            await _wait(send, user, int(path.rstrip("/").split("/")[-2]), query)
    except Refusal as refusal:
        await _send_json(send, refusal.status, refusal.translated(headers, cookie))


async def _wait(send, user, task_id: int, query: dict) -> None:
    raw = query.get("timeout", str(MAX_WAIT_SECONDS))
    try:
        timeout = float(raw)
        if timeout != timeout or timeout < 0:
            raise ValueError
    except ValueError:
        raise Refusal(
            400, "invalid", gettext_noop("timeout: seconds, a number from 0 to 60"), field="timeout"
        ) from None
    timeout = min(timeout, MAX_WAIT_SECONDS)
    read = _on_pool(_read_task)
    found = await live.wait_until_final(task_id, timeout, lambda pk: read(user, pk))
    if found is None:
        raise Refusal(404, "not_found", gettext_noop("no such object"))
    _status, data = found
    await _send_json(send, 200, data)


async def _stream(scope, receive, send, user, query: dict, headers: dict) -> None:
    flag = query.get("all", "").strip().lower()
    if flag not in TRUE + FALSE:
        raise Refusal(400, "invalid", gettext_noop("all: 1 or 0"), field="all")
    everyone = flag in TRUE
    if everyone and not await _on_pool(_may_view_all)(user):
        raise Refusal(
            403, "permission_denied", gettext_noop("?all=1 needs staff status and the tasks.view_task permission")
        )
    raw_last = (headers.get("last-event-id") or query.get("last_event_id", "")).strip()
    last_id = None
    if raw_last:
        try:
            last_id = int(raw_last)
            if last_id < 0:
                raise ValueError
        except ValueError:
            raise Refusal(
                400, "invalid", gettext_noop("Last-Event-ID: an event id from this stream"), field="Last-Event-ID"
            ) from None

    hub = live.hub()
    watcher = hub.add_stream(user.pk, all=everyone)
    disconnected = asyncio.ensure_future(_until_disconnect(receive))
    try:
        await hub.ready()  # the feed sees every change from here on
        replay = await _on_pool(_replay)(None if everyone else user.pk, last_id, everyone)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no"),
                ],
            }
        )

        async def emit(text: str) -> None:
            await send({"type": "http.response.body", "body": text.encode(), "more_body": True})

        await emit(f"retry: 3000\n: connected {json.dumps({'user': user.pk, 'all': everyone})}\n\n")
        newest = last_id or 0
        for event_id, text in replay:
            newest = max(newest, event_id)
            await emit(live.sse("task", text, newest))
        keepalive = settings.LIVE_KEEPALIVE_SECONDS
        while not watcher.overflowed and not disconnected.done():
            getter = asyncio.ensure_future(watcher.queue.get())
            done, _pending = await asyncio.wait(
                {getter, disconnected}, timeout=keepalive, return_when="FIRST_COMPLETED"
            )
            if getter not in done:
                getter.cancel()
                if disconnected in done:
                    break
                await emit(": keepalive\n\n")
                continue
            event_id, text = getter.result()
            newest = max(newest, event_id)
            await emit(live.sse("task", text, newest))
        if watcher.overflowed:
            logger.info("stream of user %s fell %d messages behind; closed", user.pk, settings.LIVE_QUEUE_SIZE)
        if not disconnected.done():
            await send({"type": "http.response.body", "body": b"", "more_body": False})
    except OSError:
        pass  # the client went away mid-write
    finally:
        hub.remove_stream(watcher)
        disconnected.cancel()


async def _until_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
