"""Operation registry: task type -> Operation (one module per type)."""

from __future__ import annotations

from tasks.operations.base import Operation

_REGISTRY: dict[str, Operation] = {}
_loaded = False

# One module per task type; each registers its Operation when imported.
MODULES = (
    "tasks.operations.create",
    "tasks.operations.start",
    "tasks.operations.stop",
    "tasks.operations.restart",
    "tasks.operations.delete",
    "tasks.operations.reset",
    "tasks.operations.reset_password",
    "tasks.operations.create_port",
    "tasks.operations.delete_port",
)


def register(op: Operation) -> Operation:
    _REGISTRY[op.task_type] = op
    return op


def get_operation(task_type: str) -> Operation:
    if not _loaded:
        _load()
    try:
        return _REGISTRY[task_type]
    except KeyError:
        raise LookupError(f"no operation for task type {task_type!r}") from None


def _load() -> None:
    # A flag, not "registry empty": importing one operation module directly
    # (a test) must not keep the others from loading.
    global _loaded
    import importlib

    from django.conf import settings

    for module in MODULES:
        importlib.import_module(module)

    # Site-specific operation modules (TASK_EXTRA_OPERATIONS): imported last, they
    # may register new implementations for task types.
    for module in settings.TASK_EXTRA_OPERATIONS:
        importlib.import_module(module)
    _loaded = True
