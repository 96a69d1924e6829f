"""The simulated provider's settings: the provider's ``connection`` JSON, validated.

Knobs are listed in docs/operations.md. Django settings are read (when Django
is configured) only for the default speed and state directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from providers.base import PermanentError

MUTATING_OPS = (
    "create",
    "start",
    "stop",
    "restart",
    "delete",
    "rebuild",
    "set_password",
    "add_port",
    "remove_port",
)
INJECTABLE_OPS = (*MUTATING_OPS, "get_state")
FAILURE_KINDS = ("retryable", "permanent", "ambiguous")


def _django_setting(name: str) -> Any:
    try:
        from django.conf import settings

        if settings.configured:
            return getattr(settings, name, None)
    except Exception:  # Django absent or misconfigured: fall back to the environment
        return None
    return None


def default_speed() -> float:
    value = _django_setting("SIMULATED_SPEED")
    if value is None:
        value = os.environ.get("SIMULATED_SPEED", "1.0")
    try:
        speed = float(value)
    except (TypeError, ValueError):
        raise PermanentError(f"SIMULATED_SPEED must be a number, got {value!r}") from None
    return max(0.0, speed)


def default_state_dir() -> Path:
    """SIMULATED_STATE_DIR, else <VAR_DIR>/simulated (VAR_DIR from settings or the env, else ./var)."""
    explicit = os.environ.get("SIMULATED_STATE_DIR")
    if explicit:
        return Path(explicit)
    var_dir = _django_setting("VAR_DIR") or os.environ.get("VAR_DIR") or "var"
    return Path(var_dir) / "simulated"


@dataclass
class SimulatedOptions:
    """The provider's ``connection`` JSON, validated. Unknown keys are refused (typos)."""

    speed: float | None = None
    state_dir: str | None = None
    slow: float = 1.0
    seed: int | None = None
    fail_rate: float = 0.0
    fail_kind: str = "retryable"
    fail_rate_ops: tuple[str, ...] = MUTATING_OPS
    fail_ops: dict[str, str] = field(default_factory=dict)
    fail_times: dict[str, int] = field(default_factory=dict)
    fail_epoch: str = ""
    hang_ops: tuple[str, ...] = ()
    hang_seconds: float = 3600.0
    ignore_cancel_ops: tuple[str, ...] = ()
    delete_leaves_guest: bool = False
    graceful_stop_fails: bool = False
    unreachable: bool = False
    # Host ports something outside the panel holds on the simulated host: mapping one
    # fails with "address already in use", as on a real host.
    host_ports_in_use: tuple[int, ...] = ()
    traffic: str = "none"
    pmacct: dict[str, Any] = field(default_factory=dict)
    # (traffic and pmacct belong to tasks.traffic; they are accepted here so the
    # unknown-key check does not refuse them.)

    @classmethod
    def from_connection(cls, connection: dict[str, Any] | None) -> SimulatedOptions:
        errors = validate_connection(connection or {})
        if errors:
            raise PermanentError("simulated provider settings: " + "; ".join(errors))
        data = dict(connection or {})
        opts = cls()
        for key, value in data.items():
            if key in ("fail_rate_ops", "hang_ops", "ignore_cancel_ops", "host_ports_in_use"):
                value = tuple(value)
            elif key == "fail_times":
                value = {k: int(v) for k, v in value.items()}
            elif key in ("speed", "slow", "fail_rate", "hang_seconds"):
                value = float(value)
            elif key == "fail_epoch":
                value = str(value)
            setattr(opts, key, value)
        return opts


def validate_connection(connection: dict[str, Any]) -> list[str]:
    """Every problem with a simulated provider's connection JSON, as readable sentences."""
    errors: list[str] = []
    if not isinstance(connection, dict):
        return ["the connection settings must be a JSON object"]
    known = {f for f in SimulatedOptions.__dataclass_fields__}
    for key in connection:
        if key not in known:
            errors.append(f"unknown key {key!r} (known: {', '.join(sorted(known))})")

    def number(key: str, low: float, high: float | None = None) -> None:
        if key not in connection:
            return
        value = connection[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            errors.append(f"{key} must be a number")
        elif value < low or (high is not None and value > high):
            errors.append(f"{key} must be between {low} and {high}" if high is not None else f"{key} must be >= {low}")

    number("speed", 0.0)
    number("slow", 0.0)
    number("fail_rate", 0.0, 1.0)
    number("hang_seconds", 0.0)
    if "seed" in connection and (isinstance(connection["seed"], bool) or not isinstance(connection["seed"], int)):
        errors.append("seed must be an integer")
    if "state_dir" in connection and not isinstance(connection["state_dir"], str):
        errors.append("state_dir must be a path")
    if connection.get("fail_kind", "retryable") not in FAILURE_KINDS:
        errors.append(f"fail_kind must be one of {', '.join(FAILURE_KINDS)}")
    for key in ("fail_rate_ops", "hang_ops", "ignore_cancel_ops"):
        value = connection.get(key, [])
        if not isinstance(value, list) or any(op not in INJECTABLE_OPS for op in value):
            errors.append(f"{key} must be a list of operations from {', '.join(INJECTABLE_OPS)}")
    fail_ops = connection.get("fail_ops", {})
    if not isinstance(fail_ops, dict) or any(
        op not in INJECTABLE_OPS or kind not in FAILURE_KINDS for op, kind in fail_ops.items()
    ):
        errors.append(f"fail_ops maps an operation to one of {', '.join(FAILURE_KINDS)}")
    elif fail_ops.get("get_state") == "ambiguous":
        errors.append("fail_ops: get_state cannot be ambiguous (it changes nothing)")
    fail_times = connection.get("fail_times", {})
    if not isinstance(fail_times, dict) or any(
        op not in INJECTABLE_OPS or isinstance(n, bool) or not isinstance(n, int) or n < 0
        for op, n in fail_times.items()
    ):
        errors.append("fail_times maps an operation to a count of failures (integer >= 0)")
    for key in ("delete_leaves_guest", "graceful_stop_fails", "unreachable"):
        if key in connection and not isinstance(connection[key], bool):
            errors.append(f"{key} must be true or false")
    in_use = connection.get("host_ports_in_use", [])
    if not isinstance(in_use, list) or any(
        isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 65535 for n in in_use
    ):
        errors.append("host_ports_in_use must be a list of port numbers (1-65535)")
    if "traffic" in connection and not isinstance(connection["traffic"], str):
        errors.append("traffic must be the name of a traffic accounting (none, pmacct)")
    if "pmacct" in connection and not isinstance(connection["pmacct"], dict):
        errors.append("pmacct must be an object")
    return errors
