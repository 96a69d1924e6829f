"""The request size limit of the API: 413 JSON before anything reads the body.

DRF reads a JSON body straight from the request stream, past Django's
DATA_UPLOAD_MAX_MEMORY_SIZE, so without this a 100 MB body would be read and
parsed in full. Under /api/ a body declared larger than ``API_MAX_BODY_BYTES``
is refused from its Content-Length alone (nothing of it is read); a
Content-Length that is not a number is 400. Both in the API's error shape.
A body without Content-Length (chunked) is not read by Django at all.
This runs before LocaleMiddleware: a refusal picks the request's language itself.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.http import JsonResponse
from django.utils import translation
from django.utils.translation import gettext as _

logger = logging.getLogger(__name__)


class APIRequestLimitMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if request.path.startswith("/api/"):
            refused = self.check(request)
            if refused is not None:
                return refused
        return self.get_response(request)

    @staticmethod
    def check(request) -> JsonResponse | None:
        raw = request.META.get("CONTENT_LENGTH") or "0"
        try:
            length = int(raw)
        except ValueError:
            length = -1
        if length < 0:
            with translation.override(translation.get_language_from_request(request)):
                return JsonResponse({"code": "bad_request", "detail": _("invalid Content-Length header")}, status=400)
        limit = settings.API_MAX_BODY_BYTES
        if length > limit:
            logger.warning("%s %s: body of %d bytes refused (limit %d)", request.method, request.path, length, limit)
            with translation.override(translation.get_language_from_request(request)):
                detail = _("the request body is %(length)s bytes; the limit is %(limit)s") % {
                    "length": length,
                    "limit": limit,
                }
            return JsonResponse({"code": "request_too_large", "detail": detail, "limit": limit}, status=413)
        return None
