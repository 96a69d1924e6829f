"""A minimal RFC 6455 websocket client for the LXD/Incus exec streams.

Why our own: pylxd's websocket path (ws4py) does not pin the server certificate
(it passes only the client cert to ``ssl``), and it waits on the operation
without a timeout. Exec needs three short-lived binary streams (stdin, stdout,
stderr) over the same transport as the REST calls: the unix socket, or TLS with
the client certificate and the pinned server certificate. That is a handshake,
masked client frames and a close, about a hundred lines.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import ssl
import struct
import threading

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class WebSocketError(OSError):
    """Handshake refused or the stream broke; an OSError so callers treat it as transport."""


class WebSocket:
    def __init__(self, sock: socket.socket, leftover: bytes = b""):
        self.sock = sock
        self._buf = bytearray(leftover)
        self._send_lock = threading.Lock()
        self.closed = False

    # ----------------------------------------------------------------- connect

    @classmethod
    def connect(
        cls,
        *,
        resource: str,
        unix_path: str | None = None,
        host: str = "",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        pinned_sha256: str | None = None,
        timeout: float = 10.0,
    ) -> WebSocket:
        if unix_path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(unix_path)
            except OSError:
                sock.close()
                raise
            host_header = "lxd"
        else:
            raw = socket.create_connection((host, port), timeout=timeout)
            try:
                sock = ssl_context.wrap_socket(raw, server_hostname=host) if ssl_context else raw
            except OSError:
                raw.close()
                raise
            if pinned_sha256 is not None:
                der = sock.getpeercert(binary_form=True) or b""
                if hashlib.sha256(der).hexdigest() != pinned_sha256:
                    sock.close()
                    raise ssl.SSLError("server certificate fingerprint does not match the pinned one")
            host_header = f"{host}:{port}"
        try:
            key = base64.b64encode(os.urandom(16)).decode()
            request = (
                f"GET {resource} HTTP/1.1\r\nHost: {host_header}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            sock.sendall(request.encode())
            head, leftover = _read_head(sock)
            status_line, _, rest = head.partition("\r\n")
            parts = status_line.split(" ", 2)
            if len(parts) < 2 or parts[1] != "101":
                raise WebSocketError(f"websocket upgrade refused: {status_line.strip()} {leftover[:200]!r}")
            headers = {}
            for line in rest.split("\r\n"):
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            expected = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()
            if headers.get("sec-websocket-accept") != expected:
                raise WebSocketError("websocket upgrade: bad Sec-WebSocket-Accept")
        except BaseException:
            sock.close()
            raise
        return cls(sock, leftover)

    # ------------------------------------------------------------------ frames

    def send_binary(self, data: bytes) -> None:
        self._send(OP_BINARY, data)

    def send_close(self, code: int = 1000) -> None:
        if self.closed:
            return
        try:
            self._send(OP_CLOSE, struct.pack("!H", code))
        except OSError:
            pass
        self.closed = True

    def _send(self, opcode: int, payload: bytes) -> None:
        # Client frames are always masked (RFC 6455 5.3).
        head = bytearray([0x80 | opcode])
        n = len(payload)
        if n < 126:
            head.append(0x80 | n)
        elif n < 1 << 16:
            head.append(0x80 | 126)
            head += struct.pack("!H", n)
        else:
            head.append(0x80 | 127)
            head += struct.pack("!Q", n)
        mask = os.urandom(4)
        head += mask
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        with self._send_lock:
            self.sock.sendall(bytes(head) + masked)

    def recv_message(self) -> bytes | None:
        """Next data message; None when the peer closed the stream."""
        message = bytearray()
        while True:
            fin, opcode, payload = self._read_frame()
            if opcode == OP_CLOSE:
                self.send_close()
                return None
            if opcode == OP_PING:
                self._send(OP_PONG, payload)
                continue
            if opcode == OP_PONG:
                continue
            message += payload
            if fin:
                return bytes(message)

    def _read_frame(self) -> tuple[bool, int, bytes]:
        b0, b1 = self._read_exact(2)
        fin, opcode = bool(b0 & 0x80), b0 & 0x0F
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self._read_exact(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._read_exact(8))
        mask = self._read_exact(4) if b1 & 0x80 else b""
        payload = self._read_exact(n)
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return fin, opcode, payload

    def _read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise WebSocketError("websocket closed by the server")
            self._buf += chunk
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def close(self) -> None:
        self.send_close()
        try:
            self.sock.close()
        except OSError:
            pass


def _read_head(sock: socket.socket) -> tuple[str, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise WebSocketError("connection closed during the websocket handshake")
        buf += chunk
        if len(buf) > 65536:
            raise WebSocketError("websocket handshake response too large")
    head, _, leftover = buf.partition(b"\r\n\r\n")
    return head.decode("latin-1"), leftover
