"""The ASGI application the web tier runs (gunicorn with uvicorn workers, run.sh).

Two halves behind one port:
- the live endpoints (GET /api/v1/tasks/stream/ and /api/v1/tasks/{id}/wait/) go to
  tasks.api.live_asgi, a plain ASGI application: a waiting client holds a
  coroutine and a socket, not a thread (Django's ASGI handler would keep a thread
  per request for its synchronous middleware while a stream stays open);
- everything else (the API's DRF views, the admin, /metrics) runs as the WSGI
  application in a pool of WEB_THREADS threads per process, as under gunicorn's
  threaded workers. Django's ASGI handler would run every synchronous view on one
  thread per process (asgiref's thread_sensitive mode), a fraction of the
  concurrency the API has under WSGI.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

from asgiref.sync import SyncToAsync  # noqa: E402
from asgiref.wsgi import WsgiToAsgi, WsgiToAsgiInstance  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.asgi import get_asgi_application  # noqa: E402
from django.core.wsgi import get_wsgi_application  # noqa: E402

django_asgi = get_asgi_application()
from tasks.api import live_asgi  # noqa: E402  (after Django's set-up)

LIVE_PATH = re.compile(r"^/api/v1/tasks/(?:stream|[0-9]+/wait)/$")


# The plain function under asgiref's @sync_to_async (which would pin it to one thread).
_RAW_RUN_WSGI_APP = WsgiToAsgiInstance.__dict__["run_wsgi_app"].func


class _ThreadedInstance(WsgiToAsgiInstance):
    executor: ThreadPoolExecutor | None = None

    def start_response(self, status, response_headers, exc_info=None):
        # Django writes Set-Cookie values with a leading space (SimpleCookie.output(header=""));
        # WSGI servers pass that on, HTTP/1.1 parsers such as h11 refuse it.
        headers = [(name, value.strip()) for name, value in response_headers]
        return super().start_response(status, headers, exc_info)

    async def run_wsgi_app(self, body):  # asgiref runs it on one shared thread; here: the pool
        call = SyncToAsync(_RAW_RUN_WSGI_APP, thread_sensitive=False, executor=self.executor)
        return await call(self, body)


class ThreadedWsgi(WsgiToAsgi):
    """asgiref's WSGI adapter, each request on a thread of a pool of ``threads``."""

    def __init__(self, wsgi_application, threads: int):
        super().__init__(wsgi_application)
        self.instance_class = type(
            "Instance", (_ThreadedInstance,), {"executor": ThreadPoolExecutor(threads, thread_name_prefix="web")}
        )

    async def __call__(self, scope, receive, send):
        await self.instance_class(self.wsgi_application, self.duplicate_header_limit)(scope, receive, send)


wsgi_half = ThreadedWsgi(get_wsgi_application(), settings.WEB_THREADS)


async def application(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "http":
        if LIVE_PATH.match(scope.get("path", "")):
            await live_asgi.application(scope, receive, send)
        else:
            await wsgi_half(scope, receive, send)
        return
    await django_asgi(scope, receive, send)  # websockets: none today
