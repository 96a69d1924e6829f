"""A real ASGI server (uvicorn, config.asgi.application) in a thread, and an SSE reader."""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass

import pytest
import requests
import uvicorn
from rest_framework.authtoken.models import Token


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_settings(settings):
    settings.LIVE_POLL_SECONDS = 0.05
    settings.LIVE_IDLE_SECONDS = 0.0
    settings.LIVE_KEEPALIVE_SECONDS = 0.5
    return settings


@pytest.fixture
def asgi_server(transactional_db, live_settings):
    """The web tier's ASGI application served by uvicorn on a free port; yields its base URL."""
    from config.asgi import application

    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(application, host="127.0.0.1", port=port, lifespan="on", log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def token_header(user) -> dict[str, str]:
    token, _ = Token.objects.get_or_create(user=user)
    return {"Authorization": f"Token {token.key}"}


@dataclass
class Event:
    id: str | None
    event: str
    data: dict


class SSEReader:
    """Reads Server-Sent Events from a streaming requests response, in a thread."""

    def __init__(self, url: str, headers: dict[str, str]):
        self.response = requests.get(url, headers=headers, stream=True, timeout=(5, 30))
        self.events: list[Event] = []
        self.comments: list[str] = []
        self.lock = threading.Condition()
        self.closed = False
        if self.response.status_code == 200:
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()

    def _read(self) -> None:
        fields: dict[str, str] = {}
        try:
            for raw in self.response.iter_lines(decode_unicode=True):
                line = raw or ""
                if line.startswith(":"):
                    with self.lock:
                        self.comments.append(line[1:].strip())
                        self.lock.notify_all()
                    continue
                if line == "":
                    if "data" in fields:
                        event = Event(fields.get("id"), fields.get("event", "message"), json.loads(fields["data"]))
                        with self.lock:
                            self.events.append(event)
                            self.lock.notify_all()
                    fields = {}
                    continue
                name, _, value = line.partition(":")
                fields[name] = value[1:] if value.startswith(" ") else value
        except Exception:
            pass
        finally:
            with self.lock:
                self.closed = True
                self.lock.notify_all()

    def wait_for(self, predicate, timeout: float = 10.0) -> Event:
        """The first event (in arrival order) that satisfies predicate."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                for event in self.events:
                    if predicate(event):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.closed:
                    raise AssertionError(
                        f"no matching event within {timeout} s; got {[e.data.get('id') for e in self.events]}"
                    )
                self.lock.wait(remaining)

    def wait_comment(self, text: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        with self.lock:
            while not any(text in c for c in self.comments):
                remaining = deadline - time.monotonic()
                assert remaining > 0 and not self.closed, f"no comment {text!r}; got {self.comments}"
                self.lock.wait(remaining)

    def close(self) -> None:
        self.response.close()


@pytest.fixture(autouse=True)
def _sqlite_readers_take_no_table_locks():
    """The in-memory test database is shared between threads in SQLite's shared-cache mode,
    where a reader's table lock makes a concurrent writer fail at once ("database table is
    locked") instead of waiting. The server's threads only read what the test writes, so
    they read without those locks (read_uncommitted applies to shared-cache connections)."""
    from django.db import connection
    from django.db.backends.signals import connection_created

    def no_read_locks(sender, connection, **kwargs):
        if connection.vendor == "sqlite":
            connection.cursor().execute("PRAGMA read_uncommitted = 1")

    if connection.vendor != "sqlite":
        yield
        return
    connection_created.connect(no_read_locks)
    try:
        yield
    finally:
        connection_created.disconnect(no_read_locks)
