"""Every API error is JSON ``{"code", "detail", ...}`` with a stable code."""

from __future__ import annotations

from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from tasks.errors import ServiceError


def exception_handler(exc, context):
    if isinstance(exc, ServiceError):
        return Response(exc.as_dict(), status=exc.http_status)
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    data = response.data
    if isinstance(exc, exceptions.ValidationError):
        body = {"code": "invalid", "detail": "invalid input", "errors": data}
        if isinstance(data, dict) and data:
            field = next(iter(data))
            body["field"] = field
            first = data[field]
            if isinstance(first, list) and first:
                body["detail"] = f"{field}: {first[0]}"
        response.data = body
        response.status_code = status.HTTP_400_BAD_REQUEST
        return response
    code = getattr(exc, "default_code", "error")
    if isinstance(exc, exceptions.NotAuthenticated):
        code = "not_authenticated"
    elif isinstance(exc, exceptions.PermissionDenied):
        code = "permission_denied"
    elif isinstance(exc, exceptions.NotFound):
        code = "not_found"
    detail = data.get("detail", data) if isinstance(data, dict) else data
    response.data = {"code": code, "detail": str(detail)}
    return response
