"""Errors raised by the services; every surface maps them the same way.

Each carries a stable ``code`` (API.md), an HTTP status for the API, and extra
fields (the field at fault, the id of the task in the way).
"""

from __future__ import annotations

from django.utils.translation import gettext as _


class ServiceError(Exception):
    code = "error"
    http_status = 400

    def __init__(self, detail: str, **extra):
        super().__init__(detail)
        self.detail = detail
        self.extra = extra

    def as_dict(self) -> dict:
        return {"code": self.code, "detail": self.detail, **self.extra}


class InvalidInput(ServiceError):
    code = "invalid"
    http_status = 400

    def __init__(self, detail: str, field: str | None = None, **extra):
        if field:
            extra["field"] = field
        super().__init__(detail, **extra)


class NotFound(ServiceError):
    code = "not_found"
    http_status = 404


class Conflict(ServiceError):
    code = "conflict"
    http_status = 409


class InstanceBusy(Conflict):
    code = "instance_busy"

    def __init__(self, active_task_id: int | None):
        super().__init__(
            _("the instance already has an active task (%(id)s)") % {"id": active_task_id}, active_task=active_task_id
        )


class InvalidState(Conflict):
    code = "invalid_state"


class NotCancellable(Conflict):
    code = "not_cancellable"


class QuotaExceeded(Conflict):
    code = "quota_exceeded"


class TrafficLimitExceeded(Conflict):
    code = "traffic_limit_exceeded"


class CapacityExceeded(Conflict):
    code = "capacity_exceeded"


class PortConflict(Conflict):
    code = "port_conflict"


class NameTaken(Conflict):
    code = "name_taken"


class ProviderUnavailable(Conflict):
    code = "provider_disabled"


class Gone(ServiceError):
    code = "gone"
    http_status = 410


class NotRetryable(Conflict):
    code = "not_retryable"
