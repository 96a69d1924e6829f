"""The simulated Driver and the simulated host's shell (for traffic accounting)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

from providers.base import (
    AmbiguousOutcome,
    CancelToken,
    Capabilities,
    ConflictError,
    GuestSpec,
    GuestState,
    NotFoundError,
    OperationCancelled,
    PermanentError,
    PortSpec,
    ProgressCallback,
    ProviderConfig,
    RetryableError,
    ServerInfo,
    UnreachableError,
    UnsupportedError,
    host_port_busy,
)
from providers.simulated.options import MUTATING_OPS, SimulatedOptions, default_speed, default_state_dir
from providers.simulated.store import SimulatedStore, _guest_id, _hash_password, addresses_for

# Base durations in seconds at speed 1.0 (what a small LXD host takes).
DELAYS: dict[str, float] = {
    "image": 12.0,  # download the image
    "unpack": 8.0,  # unpack the root filesystem
    "configure": 5.0,  # limits, network, cloud-init
    "boot": 3.0,
    "shutdown": 3.0,
    "force_stop": 1.0,
    "remove": 3.0,
    "reinstall": 15.0,
    "password": 2.0,
    "port": 0.5,
}
SLICE_SECONDS = 0.25  # progress and cancel granularity inside a delay

# Guest status on the simulated host -> GuestState.status (tasks.engine.states.InstanceStatus values).
_STATE_STATUS = {
    "running": "running",
    "stopped": "stopped",
    "creating": "creating",
    "rebuilding": "resetting",
}


# ---------------------------------------------------------------- host channel


class SimulatedHostChannel:
    """The simulated host's shell: answers the commands the panel runs on a host.

    Only ``pmacct -p <pipe> -s -O json`` is understood (traffic accounting): the
    pipe's file name is the guest name, the output is one JSON object per line
    as pmacct's memory plugin prints with ``aggregate: src_host, dst_host``.
    """

    PEER = "203.0.113.10"  # TEST-NET-3: the other end of every simulated flow

    def __init__(self, store: SimulatedStore):
        self.store = store

    def run(self, argv: list[str], stdin: bytes | None = None, timeout: float = 30.0) -> tuple[int, str, str]:
        if not argv or Path(argv[0]).name != "pmacct":
            return 127, "", f"{argv[0] if argv else ''}: command not found\n"
        if "-s" not in argv or "-p" not in argv:
            return 1, "", "pmacct: only '-p <pipe> -s' is simulated\n"
        pipe = argv[argv.index("-p") + 1] if argv.index("-p") + 1 < len(argv) else ""
        name = Path(pipe).name.removesuffix(".pipe")
        guest = self.store.guest(name)
        if guest is None:
            return 1, "", f"ERROR: Unable to connect to the pipe {pipe}: No such file or directory\n"
        rx, tx = self.store.traffic(name)
        ip = addresses_for(name)[0]
        rows = [
            {"ip_src": ip, "ip_dst": self.PEER, "packets": tx // 1200, "bytes": tx},
            {"ip_src": self.PEER, "ip_dst": ip, "packets": rx // 1200, "bytes": rx},
        ]
        if "json" in argv:
            return 0, "".join(json.dumps(r) + "\n" for r in rows), ""
        lines = ["SRC_IP           DST_IP           PACKETS               BYTES"]
        lines += [f"{r['ip_src']:<16} {r['ip_dst']:<16} {r['packets']:<21} {r['bytes']}" for r in rows]
        lines.append(f"\nFor a total of: {len(rows)} entries")
        return 0, "\n".join(lines) + "\n", ""


# ------------------------------------------------------------------------ driver


def _recorded(method):
    """The execution record: each mutating call's start and end on its guest (SimulatedStore.calls),
    so a test can see whether two operations ever touched one guest, or more than a
    provider's limit touched the host, at the same instant."""
    op = method.__name__

    @functools.wraps(method)
    def wrapper(self, target, *args, **kwargs):
        name = target.name if isinstance(target, GuestSpec) else self._name(target)
        cancel = next((a for a in (*args, *kwargs.values()) if isinstance(a, CancelToken)), None)
        if cancel is not None and cancel.cancelled and op not in self.options.ignore_cancel_ops:
            # Entered with a cancelled token: it stops at its first check, before it changes
            # anything on the guest (or it is a no-op). Not an execution on the guest.
            return method(self, target, *args, **kwargs)
        call = self.store.call_started(op, name)
        try:
            return method(self, target, *args, **kwargs)
        finally:
            self.store.call_ended(call)

    return wrapper


StepHook = Callable[[str, str, CancelToken], None]


class SimulatedDriver:
    """A Driver (providers.base) over the simulated store."""

    # Test seam: called at the start of every delay step with (op, guest name,
    # cancel token), in the worker's thread. Tests use it to cancel, force-stop
    # or time out an operation at a precise point. None in production.
    step_hook: ClassVar[StepHook | None] = None

    def __init__(self, config: ProviderConfig):
        self.config = config
        self._steps: dict[str, int] = {}  # delay steps spent per op by this driver (one per task run)
        self.options = SimulatedOptions.from_connection(config.connection)
        self.store = SimulatedStore(self.options.state_dir or default_state_dir(), config.provider_id)
        self.speed = self.options.speed if self.options.speed is not None else default_speed()

    # --- contract: metadata ---

    def server_info(self) -> ServerInfo:
        self._reachable("server_info")
        return ServerInfo(
            version="simulated-1",
            details={"state_file": str(self.store.path), "guests": len(self.store.guests()), "speed": self.speed},
        )

    def capabilities(self) -> Capabilities:
        return Capabilities(
            instance_types=("container", "vm"),
            live_port_mapping=True,
            password_methods=("exec",),
            native_rebuild=True,
            remote_cancel=True,
        )

    def host_channel(self) -> SimulatedHostChannel:
        return SimulatedHostChannel(self.store)

    # --- helpers ---

    def _name(self, ref: dict[str, Any]) -> str:
        name = (ref or {}).get("name")
        if not name:
            raise PermanentError("guest reference without a name")
        return str(name)

    def _ref(self, name: str) -> dict[str, Any]:
        return {"name": name, "id": _guest_id(name)}

    def _spend(
        self,
        op: str,
        name: str,
        cancel: CancelToken,
        progress: ProgressCallback,
        base_seconds: float,
        lo: int,
        hi: int,
        message: str,
    ) -> None:
        """Spend one delay step (base seconds x speed x slow) in cancel-aware slices, progress lo -> hi."""
        hook = type(self).step_hook
        if hook is not None:
            hook(op, name, cancel)
        self._hold(op, name, cancel)
        ignore_cancel = op in self.options.ignore_cancel_ops
        if not ignore_cancel:
            cancel.raise_if_cancelled()
        total = base_seconds * self.speed * self.options.slow
        progress(lo, message)
        start = time.monotonic()
        while True:
            elapsed = time.monotonic() - start
            if elapsed >= total:
                break
            chunk = min(SLICE_SECONDS, total - elapsed)
            if ignore_cancel:
                time.sleep(chunk)
            else:
                cancel.sleep(chunk)
            done = min(1.0, (time.monotonic() - start) / total) if total else 1.0
            progress(int(lo + (hi - lo) * done), message)
        progress(hi, message)

    def _hold(self, op: str, name: str, cancel: CancelToken) -> None:
        """Test seam across processes: ``$SIMULATED_HOLDS`` names a JSON file
        ``{guest name: "op:n"}``. At the n-th delay step of ``op`` that this driver
        (one task run) spends on that guest, the first run to get there anywhere
        creates ``<file>.<guest>.held`` and then waits there until its token is
        cancelled (a shutdown's handback, a lost lease) or its process is killed;
        later runs pass. Tests interrupt an operation at a chosen step with it.
        Unset in production: one dictionary update per delay step."""
        key = f"{op}@{name}"
        self._steps[key] = n = self._steps.get(key, 0) + 1
        path = os.environ.get("SIMULATED_HOLDS")
        if not path:
            return
        try:
            holds = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return
        if holds.get(name) != f"{op}:{n}":
            return
        try:
            os.close(os.open(f"{path}.{name}.held", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        while True:
            cancel.sleep(SLICE_SECONDS)

    def _hang(self, op: str, cancel: CancelToken) -> None:
        """A provider call that never returns (until cancelled, unless it ignores cancel)."""
        if op in self.options.ignore_cancel_ops:
            time.sleep(self.options.hang_seconds)
            return
        end = time.monotonic() + self.options.hang_seconds
        while time.monotonic() < end:
            cancel.sleep(SLICE_SECONDS)

    def _reachable(self, op: str) -> None:
        """``unreachable``: the host is down; every call fails to connect and changes nothing."""
        if self.options.unreachable:
            raise UnreachableError(f"{op}: cannot connect to the simulated host: connection refused", op=op)

    def _begin(self, op: str, name: str, cancel: CancelToken) -> bool:
        """Failure injection at the start of a call. Returns True when the call must end ambiguously."""
        self._reachable(op)
        if op in self.options.hang_ops:
            try:
                self._hang(op, cancel)
            except OperationCancelled:
                if op in MUTATING_OPS:
                    self.store.record(op, name, applied=False, outcome="cancelled")
                raise
        kind = self._failure_kind(op)
        if kind in ("retryable", "permanent"):
            if op in MUTATING_OPS:
                self.store.record(op, name, applied=False, outcome=f"failed:{kind}")
            message = f"simulated {kind} failure of {op} on {name}"
            if kind == "retryable":
                raise RetryableError(message, op=op, remote_status=503, remote_message="Service Unavailable")
            raise PermanentError(message, op=op, remote_status=500, remote_message="Internal Server Error")
        return kind == "ambiguous"

    def _failure_kind(self, op: str) -> str | None:
        opts = self.options
        limit = opts.fail_times.get(op)
        if limit is not None:
            if limit and self.store.take_failure(f"fail_times:{opts.fail_epoch}:{op}", limit):
                return opts.fail_ops.get(op, "retryable")
            return None
        if op in opts.fail_ops:
            return opts.fail_ops[op]
        if opts.fail_rate > 0 and op in opts.fail_rate_ops:
            if opts.seed is None:
                draw = random.random()
            else:
                # A persistent counter keeps the sequence reproducible across driver
                # instances (one per task) and processes.
                draw = random.Random(f"{opts.seed}:{self.store.next_counter('fail_rate')}").random()
            if draw < opts.fail_rate:
                return opts.fail_kind
        return None

    def _finish(self, op: str, name: str, *, applied: bool, ambiguous: bool, outcome: str = "") -> None:
        self.store.record(op, name, applied=applied, outcome=outcome or ("applied" if applied else "noop"))
        if ambiguous:
            raise AmbiguousOutcome(
                f"simulated: the connection dropped after {op} of {name} was sent", op=op, remote_status=None
            )

    def _require(self, name: str, op: str) -> dict[str, Any]:
        guest = self.store.guest(name)
        if guest is None:
            self.store.record(op, name, applied=False, outcome="failed:not_found")
            raise NotFoundError(f"guest {name} does not exist", op=op, remote_status=404)
        return guest

    @contextlib.contextmanager
    def _recording(self, op: str, name: str, state: dict[str, bool]) -> Iterator[None]:
        """Record a cancelled or failed call (``state['applied']`` says if it changed something)."""
        try:
            yield
        except OperationCancelled:
            self.store.record(op, name, applied=state.get("applied", False), outcome="cancelled")
            raise
        except (PermanentError, RetryableError) as exc:
            self.store.record(op, name, applied=state.get("applied", False), outcome=f"failed:{type(exc).__name__}")
            raise

    # --- contract: operations ---

    @_recorded
    def create(self, spec: GuestSpec, cancel: CancelToken, progress: ProgressCallback) -> dict[str, Any]:
        op, name = "create", spec.name
        if spec.instance_type not in ("container", "vm"):
            raise UnsupportedError(f"instance type {spec.instance_type!r} is not supported", op=op)
        if spec.cpu < 1 or spec.memory_mb < 1 or spec.disk_mb < 1:
            raise PermanentError("cpu, memory_mb and disk_mb must be positive", op=op, remote_status=400)
        ambiguous = self._begin(op, name, cancel)
        existing = self.store.guest(name)
        if existing is not None and existing["status"] != "creating":
            # Ensure semantics: a retry after a lost response finds the guest it made.
            progress(100, "guest already exists")
            self._finish(op, name, applied=False, ambiguous=False)
            return self._ref(name)
        state = {"applied": False}
        with self._recording(op, name, state):
            if existing is None:
                self._spend(op, name, cancel, progress, DELAYS["image"], 0, 45, f"downloading image {spec.image}")
                now = time.time()
                with self.store.transaction() as db:
                    db.execute(
                        "INSERT OR IGNORE INTO guests (name, guest_id, instance_type, image, cpu, memory_mb, disk_mb,"
                        " bandwidth_mbps, labels, status, created_at, updated_at)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'creating', ?, ?)",
                        (
                            name,
                            _guest_id(name),
                            spec.instance_type,
                            spec.image,
                            spec.cpu,
                            spec.memory_mb,
                            spec.disk_mb,
                            spec.bandwidth_mbps,
                            json.dumps(spec.labels, sort_keys=True),
                            now,
                            now,
                        ),
                    )
                state["applied"] = True
            self._spend(op, name, cancel, progress, DELAYS["unpack"], 45, 80, "unpacking the root filesystem")
            self._spend(op, name, cancel, progress, DELAYS["configure"], 80, 100, "configuring limits and network")
            with self.store.transaction() as db:
                self.store.set_status(db, name, "stopped")
            state["applied"] = True
        self._finish(op, name, applied=True, ambiguous=ambiguous)
        return self._ref(name)

    @_recorded
    def start(self, ref: dict[str, Any], cancel: CancelToken, progress: ProgressCallback) -> None:
        op, name = "start", self._name(ref)
        ambiguous = self._begin(op, name, cancel)
        guest = self._require(name, op)
        if guest["status"] == "running":
            progress(100, "already running")
            self._finish(op, name, applied=False, ambiguous=ambiguous)
            return
        self._usable(guest, op)
        with self._recording(op, name, {}):
            self._spend(op, name, cancel, progress, DELAYS["boot"], 0, 100, "booting")
            with self.store.transaction() as db:
                self.store.set_status(db, name, "running")
        self._finish(op, name, applied=True, ambiguous=ambiguous)

    @_recorded
    def stop(
        self, ref: dict[str, Any], cancel: CancelToken, progress: ProgressCallback, graceful_timeout: int = 30
    ) -> None:
        op, name = "stop", self._name(ref)
        ambiguous = self._begin(op, name, cancel)
        guest = self._require(name, op)
        if guest["status"] != "running":
            progress(100, "already stopped")
            self._finish(op, name, applied=False, ambiguous=ambiguous)
            return
        with self._recording(op, name, {}):
            if self.options.graceful_stop_fails:
                # The guest ignores the ACPI/SIGPWR request: wait out the graceful timeout, then force.
                self._spend(op, name, cancel, progress, float(graceful_timeout), 0, 70, "shutting down")
                self._spend(op, name, cancel, progress, DELAYS["force_stop"], 70, 100, "forcing the stop")
            else:
                self._spend(op, name, cancel, progress, DELAYS["shutdown"], 0, 100, "shutting down")
            with self.store.transaction() as db:
                self.store.set_status(db, name, "stopped")
        self._finish(op, name, applied=True, ambiguous=ambiguous)

    @_recorded
    def restart(self, ref: dict[str, Any], cancel: CancelToken, progress: ProgressCallback) -> None:
        op, name = "restart", self._name(ref)
        ambiguous = self._begin(op, name, cancel)
        guest = self._require(name, op)
        self._usable(guest, op)
        with self._recording(op, name, {}):
            if guest["status"] == "running":
                self._spend(op, name, cancel, progress, DELAYS["shutdown"], 0, 40, "shutting down")
                with self.store.transaction() as db:
                    self.store.set_status(db, name, "stopped")
            self._spend(op, name, cancel, progress, DELAYS["boot"], 40, 100, "booting")
            with self.store.transaction() as db:
                self.store.set_status(db, name, "running")
        self._finish(op, name, applied=True, ambiguous=ambiguous)

    @_recorded
    def delete(self, ref: dict[str, Any], cancel: CancelToken, progress: ProgressCallback) -> None:
        op, name = "delete", self._name(ref)
        ambiguous = self._begin(op, name, cancel)
        guest = self.store.guest(name)
        if guest is None:
            progress(100, "already gone")
            self._finish(op, name, applied=False, ambiguous=ambiguous)
            return
        state = {"applied": False}
        with self._recording(op, name, state):
            if guest["status"] == "running":
                self._spend(op, name, cancel, progress, DELAYS["shutdown"], 0, 30, "stopping the guest")
                with self.store.transaction() as db:
                    self.store.set_status(db, name, "stopped")
                state["applied"] = True
            self._spend(op, name, cancel, progress, DELAYS["remove"], 30, 100, "removing the guest")
            if self.options.delete_leaves_guest:
                # A provider that answers "deleted" but keeps the guest (the bug
                # delete verification exists for).
                self._finish(op, name, applied=False, ambiguous=ambiguous, outcome="left_behind")
                return
            with self.store.transaction() as db:
                db.execute("DELETE FROM ports WHERE guest = ?", (name,))
                db.execute("DELETE FROM guests WHERE name = ?", (name,))
        self._finish(op, name, applied=True, ambiguous=ambiguous)

    @_recorded
    def rebuild(
        self, ref: dict[str, Any], spec: GuestSpec, cancel: CancelToken, progress: ProgressCallback
    ) -> dict[str, Any]:
        op, name = "rebuild", self._name(ref)
        ambiguous = self._begin(op, name, cancel)
        guest = self._require(name, op)
        if guest["status"] == "creating":
            self.store.record(op, name, applied=False, outcome="failed:busy")
            raise ConflictError(f"guest {name} is still being created", op=op, remote_status=409)
        state = {"applied": False}
        with self._recording(op, name, state):
            if guest["status"] == "running":
                self._spend(op, name, cancel, progress, DELAYS["shutdown"], 0, 15, "stopping the guest")
            with self.store.transaction() as db:
                self.store.set_status(db, name, "rebuilding")
            state["applied"] = True
            self._spend(op, name, cancel, progress, DELAYS["reinstall"], 15, 100, f"reinstalling from {spec.image}")
            with self.store.transaction() as db:
                db.execute(
                    "UPDATE guests SET image = ?, generation = generation + 1, password_hash = '', updated_at = ?"
                    " WHERE name = ?",
                    (spec.image, time.time(), name),
                )
                self.store.set_status(db, name, "stopped")
        self._finish(op, name, applied=True, ambiguous=ambiguous)
        return self._ref(name)

    @_recorded
    def set_password(self, ref: dict[str, Any], password: str, cancel: CancelToken, progress: ProgressCallback) -> None:
        op, name = "set_password", self._name(ref)
        if not password:
            raise PermanentError("empty password", op=op, remote_status=400)
        ambiguous = self._begin(op, name, cancel)
        guest = self._require(name, op)
        if guest["status"] != "running":
            self.store.record(op, name, applied=False, outcome="failed:not_running")
            raise PermanentError(f"guest {name} is not running: cannot set its password", op=op, remote_status=409)
        with self._recording(op, name, {}):
            self._spend(op, name, cancel, progress, DELAYS["password"], 0, 100, "setting the root password")
            with self.store.transaction() as db:
                db.execute(
                    "UPDATE guests SET password_hash = ?, updated_at = ? WHERE name = ?",
                    (_hash_password(password), time.time(), name),
                )
        self._finish(op, name, applied=True, ambiguous=ambiguous)

    @_recorded
    def add_port(self, ref: dict[str, Any], port: PortSpec, cancel: CancelToken, progress: ProgressCallback) -> None:
        op, name = "add_port", self._name(ref)
        _check_port(port, op)
        ambiguous = self._begin(op, name, cancel)
        self._require(name, op)
        with self._recording(op, name, {}):
            self._spend(op, name, cancel, progress, DELAYS["port"], 0, 100, f"mapping {port.handle}")
            conflict = ""
            held = [p for p in self.options.host_ports_in_use if port.host_port_start <= p <= port.host_port_end]
            with self.store.transaction() as db:
                same = db.execute("SELECT * FROM ports WHERE guest = ? AND handle = ?", (name, port.handle)).fetchone()
                clash = db.execute(
                    "SELECT guest, handle FROM ports WHERE protocol = ? AND host_start <= ? AND host_end >= ?"
                    " AND NOT (guest = ? AND handle = ?)",
                    (port.protocol, port.host_port_end, port.host_port_start, name, port.handle),
                ).fetchone()
                if same is not None and (same["guest_start"], same["guest_end"]) != (
                    port.guest_port_start,
                    port.guest_port_end,
                ):
                    conflict = f"{port.handle} exists with other guest ports"
                elif clash is not None:
                    conflict = (
                        f"host port(s) {port.host_port_start}-{port.host_port_end}/{port.protocol} already"
                        f" bound by {clash['guest']} ({clash['handle']})"
                    )
                elif same is None and held:
                    conflict = f"listen {port.protocol} 0.0.0.0:{held[0]}: bind: address already in use"
                elif same is None:
                    db.execute(
                        "INSERT INTO ports (guest, handle, protocol, host_start, host_end, guest_start, guest_end,"
                        " listen_ip) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            name,
                            port.handle,
                            port.protocol,
                            port.host_port_start,
                            port.host_port_end,
                            port.guest_port_start,
                            port.guest_port_end,
                            port.listen_ip,
                        ),
                    )
            if conflict:
                # Raised outside the store transaction: recording it opens its own.
                text = f"{op}: {conflict}"
                raise host_port_busy(
                    text, conflict, op=op, remote_status=500, remote_message=conflict
                ) or ConflictError(conflict, op=op, remote_status=409)
            applied = same is None
        self._finish(op, name, applied=applied, ambiguous=ambiguous)

    @_recorded
    def remove_port(self, ref: dict[str, Any], port: PortSpec, cancel: CancelToken, progress: ProgressCallback) -> None:
        op, name = "remove_port", self._name(ref)
        _check_port(port, op)
        ambiguous = self._begin(op, name, cancel)
        with self._recording(op, name, {}):
            self._spend(op, name, cancel, progress, DELAYS["port"], 0, 100, f"unmapping {port.handle}")
            with self.store.transaction() as db:
                removed = db.execute("DELETE FROM ports WHERE guest = ? AND handle = ?", (name, port.handle)).rowcount
        self._finish(op, name, applied=bool(removed), ambiguous=ambiguous)

    def get_state(self, ref: dict[str, Any]) -> GuestState:
        name = self._name(ref)
        self._begin("get_state", name, CancelToken())
        guest = self.store.guest(name)
        if guest is None:
            return GuestState(exists=False, status="unknown")
        ports = [
            PortSpec(
                protocol=p["protocol"],
                host_port_start=p["host_start"],
                host_port_end=p["host_end"],
                guest_port_start=p["guest_start"],
                guest_port_end=p["guest_end"],
                listen_ip=p["listen_ip"],
            )
            for p in self.store.ports(name)
        ]
        running = guest["status"] == "running"
        return GuestState(
            exists=True,
            status=_STATE_STATUS.get(guest["status"], "unknown"),
            addresses=addresses_for(name) if running else [],
            ref=self._ref(name),
            ports=ports,
        )

    def _usable(self, guest: dict[str, Any], op: str) -> None:
        if guest["status"] in ("creating", "rebuilding"):
            self.store.record(op, guest["name"], applied=False, outcome="failed:broken")
            what = "creation" if guest["status"] == "creating" else "rebuild"
            raise PermanentError(
                f"guest {guest['name']} is unusable: its {what} did not finish", op=op, remote_status=409
            )


def _check_port(port: PortSpec, op: str) -> None:
    if port.protocol not in ("tcp", "udp"):
        raise PermanentError(f"protocol must be tcp or udp, got {port.protocol!r}", op=op, remote_status=400)
    for value in (port.host_port_start, port.host_port_end, port.guest_port_start, port.guest_port_end):
        if not 1 <= value <= 65535:
            raise PermanentError(f"port {value} out of range", op=op, remote_status=400)
    if (port.host_port_end - port.host_port_start) != (port.guest_port_end - port.guest_port_start) or (
        port.host_port_end < port.host_port_start
    ):
        raise PermanentError("host and guest ranges must have the same length", op=op, remote_status=400)
