"""Operation registry: task type -> Operation (one module per type)."""

from __future__ import annotations

from tasks.operations.base import Operation

_REGISTRY: dict[str, Operation] = {}


def register(op: Operation) -> Operation:
    _REGISTRY[op.task_type] = op
    return op


def get_operation(task_type: str) -> Operation:
    if not _REGISTRY:
        _load()
    try:
        return _REGISTRY[task_type]
    except KeyError:
        raise LookupError(f"no operation for task type {task_type!r}") from None


def _load() -> None:
    import importlib

    from django.conf import settings

    from tasks.operations import noop  # noqa: F401  (fallback until the real modules exist)

    # Site-specific operation modules (TASK_EXTRA_OPERATIONS): imported last, they
    # may register new implementations for task types.
    for module in getattr(settings, "TASK_EXTRA_OPERATIONS", []):
        importlib.import_module(module)
