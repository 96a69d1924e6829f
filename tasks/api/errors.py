"""Every API error is JSON ``{"code", "detail", ...}`` with a stable code.

- tasks.errors.ServiceError: its own code, status and extra fields (``field``,
  ``active_task``, ``status``).
- Validation errors (serializers, filters, pagination): 400 ``invalid`` with
  ``field`` (the first offending input, dotted for nested ones), a readable
  ``detail`` and all messages under ``errors``.
- Everything DRF raises (401, 403, 404, 405, 406, 415, 429, parse errors): the
  exception's default code.
- A database DataError that validation missed (a value the column cannot hold)
  is a 400 too: input must never produce a 500.
- A body over Django's upload limits (RequestDataTooBig) is 413
  ``request_too_large``; any other SuspiciousOperation 400 ``bad_request``.

``bad_request``, ``permission_denied``, ``not_found`` and ``server_error`` below
are the Django-level handlers (400/403/404/500) for what happens outside DRF (no
view matched, a bad Host header, a crash): JSON under /api/, Django's pages
elsewhere. Bodies over API_MAX_BODY_BYTES never reach a view
(tasks.api.middleware: 413).
"""

from __future__ import annotations

import logging

from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.db import DataError
from django.http import Http404, JsonResponse
from django.utils.translation import gettext as _
from django.views import defaults
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from tasks.errors import ServiceError

logger = logging.getLogger(__name__)

CODES = {
    exceptions.NotAuthenticated: "not_authenticated",
    exceptions.AuthenticationFailed: "authentication_failed",
    exceptions.PermissionDenied: "permission_denied",
    exceptions.NotFound: "not_found",
    exceptions.MethodNotAllowed: "method_not_allowed",
    exceptions.NotAcceptable: "not_acceptable",
    exceptions.UnsupportedMediaType: "unsupported_media_type",
    exceptions.ParseError: "parse_error",
    exceptions.Throttled: "throttled",
}


def _first_error(data, prefix: str = "") -> tuple[str | None, str]:
    """The dotted name and first message of the first error in a DRF error structure."""
    if isinstance(data, dict) and data:
        key = next(iter(data))
        name = f"{prefix}.{key}" if prefix else str(key)
        if name == "non_field_errors":
            name = None
        field, message = _first_error(data[key], name or "")
        return (field or name), message
    if isinstance(data, list) and data:
        return _first_error(data[0], prefix)
    return (prefix or None), str(data)


def validation_body(data) -> dict:
    body: dict = {"code": "invalid", "detail": _("invalid input"), "errors": data}
    field, message = _first_error(data)
    if field:
        body["field"] = field
        body["detail"] = f"{field}: {message}"
    elif message:
        body["detail"] = message
    return body


def exception_handler(exc, context):
    if isinstance(exc, ServiceError):
        # Some services pass field=None when no single input is at fault: leave it out.
        body = {key: value for key, value in exc.as_dict().items() if not (key == "field" and value is None)}
        return Response(body, status=exc.http_status)
    if isinstance(exc, DataError):
        view = context.get("view")
        logger.warning("%s: input the database refused: %s", type(view).__name__, exc)
        return Response(
            {"code": "invalid", "detail": _("a value is out of range for its field")},
            status=status.HTTP_400_BAD_REQUEST,
        )
    if isinstance(exc, RequestDataTooBig):
        return Response({"code": "request_too_large", "detail": str(exc)}, status=413)
    if isinstance(exc, SuspiciousOperation):
        logger.warning("%s: suspicious request: %s", type(context.get("view")).__name__, exc)
        return Response({"code": "bad_request", "detail": _("bad request")}, status=status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound(str(exc) or None)
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.ValidationError):
        response.data = validation_body(response.data)
        response.status_code = status.HTTP_400_BAD_REQUEST
        return response
    code = next((c for cls, c in CODES.items() if isinstance(exc, cls)), None) or getattr(exc, "default_code", "error")
    data = response.data
    detail = data.get("detail", data) if isinstance(data, dict) else data
    response.data = {"code": code, "detail": str(detail)}
    return response


def _api(request) -> bool:
    return request.path.startswith("/api/")


def bad_request(request, exception=None):
    if _api(request):
        if isinstance(exception, RequestDataTooBig):
            return JsonResponse({"code": "request_too_large", "detail": str(exception)}, status=413)
        return JsonResponse({"code": "bad_request", "detail": _("bad request")}, status=400)
    return defaults.bad_request(request, exception)


def permission_denied(request, exception=None):
    if _api(request):
        return JsonResponse({"code": "permission_denied", "detail": _("you may not do this")}, status=403)
    return defaults.permission_denied(request, exception)


def not_found(request, exception=None):
    if request.path.startswith("/api/"):
        return JsonResponse({"code": "not_found", "detail": _("no such endpoint or object")}, status=404)
    return defaults.page_not_found(request, exception)


def server_error(request):
    if request.path.startswith("/api/"):
        return JsonResponse({"code": "internal_error", "detail": _("internal error; it has been logged")}, status=500)
    return defaults.server_error(request)
