"""Run a command in a guest with data on its stdin, over the exec websockets.

Why websockets: ``record-output`` exec takes no stdin, so a secret would have to
travel in argv or the environment, both readable in /proc and echoed into
operation metadata. Here the command is attached to three streams (stdin,
stdout, stderr, as pylxd does; ``control`` is optional), the payload is written
to stdin, and closing stdin gives the command its EOF.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from providers.base import CancelToken, OperationCancelled, PermanentError, ProviderError, RetryableError
from providers.lxd.client import LXDClient
from providers.lxd.websocket import WebSocket

_OUTPUT_LIMIT = 65536


@dataclass
class ExecResult:
    exit_code: int | None
    stdout: bytes
    stderr: bytes


def exec_with_stdin(
    api: LXDClient, name: str, command: list[str], stdin: bytes, *, op: str, cancel: CancelToken
) -> ExecResult:
    started = api.request(
        "POST",
        f"/1.0/instances/{name}/exec",
        op=op,
        json_body={"command": command, "environment": {}, "wait-for-websocket": True, "interactive": False},
        cancel=cancel,
    )
    op_id = started.operation_id or ""
    fds = ((started.metadata or {}).get("metadata") or {}).get("fds") or {}
    if not op_id or not all(k in fds for k in ("0", "1", "2")):
        raise PermanentError(f"{op}: exec did not return websocket secrets", op=op)
    streams: list[WebSocket] = []
    outputs = {"1": bytearray(), "2": bytearray()}
    readers: list[threading.Thread] = []
    try:
        try:
            for fd in ("0", "1", "2"):
                streams.append(api.open_websocket(op_id, fds[fd]))
        except OSError as exc:
            api.cancel_operation(op_id, op=op)
            raise RetryableError(f"{op}: cannot attach to the exec streams: {exc}", op=op) from None
        for fd, ws in zip(("1", "2"), streams[1:], strict=True):
            t = threading.Thread(target=_drain, args=(ws, outputs[fd]), name=f"lxd-exec-{fd}", daemon=True)
            t.start()
            readers.append(t)
        try:
            streams[0].send_binary(stdin)
            streams[0].send_close()  # EOF on the command's stdin
        except OSError as exc:
            api.cancel_operation(op_id, op=op)
            raise RetryableError(f"{op}: writing to the exec stdin failed: {exc}", op=op) from None
        final = api.wait(started, op=op, cancel=cancel)
    finally:
        for t in readers:
            t.join(timeout=2)
        for ws in streams:
            ws.close()
    rc = (final.get("metadata") or {}).get("return")
    return ExecResult(exit_code=rc, stdout=bytes(outputs["1"]), stderr=bytes(outputs["2"]))


def _drain(ws: WebSocket, sink: bytearray) -> None:
    """Read an output stream until the daemon closes it, keeping at most _OUTPUT_LIMIT bytes."""
    try:
        while True:
            data = ws.recv_message()
            if data is None:
                return
            if len(sink) < _OUTPUT_LIMIT:
                sink += data[: _OUTPUT_LIMIT - len(sink)]
    except (OSError, ProviderError, OperationCancelled):
        return
