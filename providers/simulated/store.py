"""The simulated host's state: one SQLite file per provider, shared by all processes.

stdlib sqlite3 in WAL mode with a busy timeout; every write is one BEGIN
IMMEDIATE transaction, so several worker processes (and machines sharing the
directory) serialise on the file instead of overwriting each other.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from providers.simulated.options import default_state_dir

_SCHEMA = """
CREATE TABLE IF NOT EXISTS guests (
    name TEXT PRIMARY KEY,
    guest_id TEXT NOT NULL,
    instance_type TEXT NOT NULL,
    image TEXT NOT NULL,
    cpu INTEGER NOT NULL,
    memory_mb INTEGER NOT NULL,
    disk_mb INTEGER NOT NULL,
    bandwidth_mbps INTEGER NOT NULL DEFAULT 0,
    labels TEXT NOT NULL DEFAULT '{}',
    status TEXT NOT NULL,
    password_hash TEXT NOT NULL DEFAULT '',
    generation INTEGER NOT NULL DEFAULT 0,
    rx_bytes INTEGER NOT NULL DEFAULT 0,
    tx_bytes INTEGER NOT NULL DEFAULT 0,
    running_since REAL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS ports (
    guest TEXT NOT NULL,
    handle TEXT NOT NULL,
    protocol TEXT NOT NULL,
    host_start INTEGER NOT NULL,
    host_end INTEGER NOT NULL,
    guest_start INTEGER NOT NULL,
    guest_end INTEGER NOT NULL,
    listen_ip TEXT NOT NULL,
    PRIMARY KEY (guest, handle)
);
CREATE INDEX IF NOT EXISTS ports_host ON ports (protocol, host_start);
CREATE TABLE IF NOT EXISTS executions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL,
    guest TEXT NOT NULL,
    at REAL NOT NULL,
    pid INTEGER NOT NULL,
    applied INTEGER NOT NULL,
    outcome TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS executions_guest ON executions (guest, op);
CREATE TABLE IF NOT EXISTS calls (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL,
    guest TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started REAL NOT NULL,
    ended REAL
);
CREATE INDEX IF NOT EXISTS calls_guest ON calls (guest, started);
CREATE TABLE IF NOT EXISTS counters (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""

_initialised: set[str] = set()
_local = threading.local()
_MAX_CONNECTIONS = 4
_init_lock = threading.Lock()


def _hash_password(password: str, salt: str | None = None) -> str:
    salt = salt or secrets.token_hex(8)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), 1000).hex()
    return f"{salt}${digest}"


def addresses_for(name: str) -> list[str]:
    """The guest's (deterministic) addresses: 10.x.y.z and a ULA IPv6."""
    h = hashlib.sha256(name.encode()).digest()
    return [f"10.{h[0]}.{h[1]}.{h[2] % 253 + 1}", f"fd42:{h[3]:02x}{h[4]:02x}:{h[5]:02x}{h[6]:02x}::{h[7] % 250 + 2:x}"]


def _traffic_rate(name: str) -> tuple[int, int]:
    """Bytes per second (rx, tx) a running guest moves: steady, per guest."""
    h = hashlib.sha256(b"traffic:" + name.encode()).digest()
    tx = 2_000 + int.from_bytes(h[:2], "big") % 48_000
    return tx * 3, tx


def _ensure_wal(db: sqlite3.Connection) -> None:
    """Switch the file to WAL once. Changing the journal mode needs the file to itself and
    SQLite does not wait (busy_timeout) for that: many workers opening a new provider's
    file at once got "database is locked". Once it is WAL (it stays so), nothing to do."""
    for attempt in range(50):
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
                return
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == 49:
                raise
            time.sleep(0.01 + 0.01 * attempt)


class SimulatedStore:
    """The simulated host's state: one SQLite file per provider, shared by all processes."""

    def __init__(self, state_dir: str | os.PathLike[str], provider_id: int):
        self.dir = Path(state_dir)
        self.provider_id = provider_id
        self.path = self.dir / f"provider-{provider_id}.sqlite3"
        key = str(self.path.absolute())
        if key not in _initialised or not self.path.exists():
            with _init_lock:
                self.dir.mkdir(parents=True, exist_ok=True)
                with self._connect() as db:
                    _ensure_wal(db)
                    # One transaction: one sync instead of one per statement.
                    db.executescript("BEGIN;" + _SCHEMA + "COMMIT;")
                _initialised.add(key)

    @classmethod
    def for_provider(cls, provider_id: int, connection: dict[str, Any] | None = None) -> SimulatedStore:
        state_dir = (connection or {}).get("state_dir") or default_state_dir()
        return cls(state_dir, provider_id)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # One connection per thread and file, kept open: closing the last
        # connection of a WAL database checkpoints and syncs it, which made every
        # call cost a disk flush. A few files per thread at most (tests make many).
        cache: OrderedDict[str, sqlite3.Connection] | None = getattr(_local, "connections", None)
        if cache is None or getattr(_local, "pid", None) != os.getpid():  # a forked child opens its own
            cache = _local.connections = OrderedDict()
            _local.pid = os.getpid()
        key = str(self.path)
        db = cache.pop(key, None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA busy_timeout=30000")
            db.execute("PRAGMA synchronous=NORMAL")
        cache[key] = db
        while len(cache) > _MAX_CONNECTIONS:
            _, old = cache.popitem(last=False)
            old.close()
        yield db

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE: one writer at a time across processes, no lock upgrades."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            try:
                db.execute("COMMIT")
            except BaseException:
                # The cached connection must not stay inside a failed transaction.
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    # --- reads (tests and the driver) ---

    def guest(self, name: str) -> dict[str, Any] | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM guests WHERE name = ?", (name,)).fetchone()
        return dict(row) if row else None

    def guests(self) -> list[dict[str, Any]]:
        with self._connect() as db:
            return [dict(r) for r in db.execute("SELECT * FROM guests ORDER BY name")]

    def ports(self, name: str | None = None) -> list[dict[str, Any]]:
        with self._connect() as db:
            if name is None:
                rows = db.execute("SELECT * FROM ports ORDER BY guest, protocol, host_start")
            else:
                rows = db.execute("SELECT * FROM ports WHERE guest = ? ORDER BY protocol, host_start", (name,))
            return [dict(r) for r in rows]

    def executions(self, op: str | None = None, guest: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM executions WHERE 1=1", []
        if op:
            sql += " AND op = ?"
            args.append(op)
        if guest:
            sql += " AND guest = ?"
            args.append(guest)
        with self._connect() as db:
            return [dict(r) for r in db.execute(sql + " ORDER BY id", args)]

    def applied(self, op: str, guest: str) -> int:
        """How many calls of ``op`` on ``guest`` changed something."""
        with self._connect() as db:
            return db.execute(
                "SELECT COUNT(*) FROM executions WHERE op = ? AND guest = ? AND applied = 1", (op, guest)
            ).fetchone()[0]

    def password_matches(self, name: str, password: str) -> bool:
        guest = self.guest(name)
        if not guest or not guest["password_hash"]:
            return False
        salt = guest["password_hash"].split("$", 1)[0]
        return secrets.compare_digest(_hash_password(password, salt), guest["password_hash"])

    def traffic(self, name: str, now: float | None = None) -> tuple[int, int]:
        """Cumulative (rx, tx) bytes of the guest's interface."""
        guest = self.guest(name)
        if guest is None:
            return 0, 0
        rx, tx = guest["rx_bytes"], guest["tx_bytes"]
        if guest["running_since"] is not None:
            elapsed = max(0.0, (now or time.time()) - guest["running_since"])
            rate_rx, rate_tx = _traffic_rate(name)
            rx += int(elapsed * rate_rx)
            tx += int(elapsed * rate_tx)
        return rx, tx

    # --- writes ---

    def record(self, op: str, guest: str, *, applied: bool, outcome: str) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO executions (op, guest, at, pid, applied, outcome) VALUES (?, ?, ?, ?, ?, ?)",
                (op, guest, time.time(), os.getpid(), int(applied), outcome),
            )

    def call_started(self, op: str, guest: str) -> int:
        """The execution record: a mutating call on ``guest`` begins (see :meth:`calls`)."""
        with self.transaction() as db:
            return db.execute(
                "INSERT INTO calls (op, guest, pid, started) VALUES (?, ?, ?, ?)", (op, guest, os.getpid(), time.time())
            ).lastrowid

    def call_ended(self, call_id: int) -> None:
        with self.transaction() as db:
            db.execute("UPDATE calls SET ended = ? WHERE id = ?", (time.time(), call_id))

    def calls(self, guest: str | None = None) -> list[dict[str, Any]]:
        """Every mutating provider call with its start and end (``ended`` None: still running,
        or its process died inside it), oldest first: what tests check for overlaps."""
        sql, args = "SELECT * FROM calls", []
        if guest is not None:
            sql, args = f"{sql} WHERE guest = ?", [guest]
        with self._connect() as db:
            return [dict(row) for row in db.execute(f"{sql} ORDER BY started, id", args)]

    def take_failure(self, key: str, limit: int) -> bool:
        """Atomically count one injected failure under ``key`` if fewer than ``limit`` were."""
        with self.transaction() as db:
            row = db.execute("SELECT value FROM counters WHERE key = ?", (key,)).fetchone()
            used = row[0] if row else 0
            if used >= limit:
                return False
            db.execute(
                "INSERT INTO counters (key, value) VALUES (?, 1) ON CONFLICT(key) DO UPDATE SET value = value + 1",
                (key,),
            )
            return True

    def next_counter(self, key: str) -> int:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO counters (key, value) VALUES (?, 1) ON CONFLICT(key) DO UPDATE SET value = value + 1",
                (key,),
            )
            return db.execute("SELECT value FROM counters WHERE key = ?", (key,)).fetchone()[0]

    def put_guest(
        self,
        name: str,
        *,
        status: str = "running",
        instance_type: str = "container",
        image: str = "debian/12",
        cpu: int = 1,
        memory_mb: int = 512,
        disk_mb: int = 10240,
    ) -> None:
        """Create a guest directly (test fixtures, demo data): no delay, no execution recorded."""
        now = time.time()
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO guests (name, guest_id, instance_type, image, cpu, memory_mb, disk_mb,"
                " status, running_since, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    _guest_id(name),
                    instance_type,
                    image,
                    cpu,
                    memory_mb,
                    disk_mb,
                    status,
                    now if status == "running" else None,
                    now,
                    now,
                ),
            )

    def set_status(self, db: sqlite3.Connection, name: str, status: str) -> None:
        """Change a guest's status inside ``db``'s transaction, folding traffic counters on stop."""
        row = db.execute("SELECT status, running_since FROM guests WHERE name = ?", (name,)).fetchone()
        if row is None:
            return
        now = time.time()
        if status == "running":
            since = row["running_since"] if row["status"] == "running" else now
            db.execute(
                "UPDATE guests SET status = ?, running_since = ?, updated_at = ? WHERE name = ?",
                (status, since, now, name),
            )
            return
        if row["running_since"] is not None:
            rate_rx, rate_tx = _traffic_rate(name)
            elapsed = max(0.0, now - row["running_since"])
            db.execute(
                "UPDATE guests SET rx_bytes = rx_bytes + ?, tx_bytes = tx_bytes + ? WHERE name = ?",
                (int(elapsed * rate_rx), int(elapsed * rate_tx), name),
            )
        db.execute(
            "UPDATE guests SET status = ?, running_since = NULL, updated_at = ? WHERE name = ?", (status, now, name)
        )


def _guest_id(name: str) -> str:
    return "sim-" + hashlib.sha256(name.encode()).hexdigest()[:10]
