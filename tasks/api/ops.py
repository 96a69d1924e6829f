"""/healthz and /metrics: plain Django views (no session, token or CSRF machinery)."""

from __future__ import annotations

import hmac
import logging

from django.conf import settings
from django.db import connection
from django.http import HttpResponse, JsonResponse
from django.utils.translation import gettext as _
from prometheus_client import CONTENT_TYPE_LATEST

from tasks import metrics

logger = logging.getLogger(__name__)


def _check_database() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()
    return "ok"


def _check_broker() -> str:
    if settings.Q_BROKER == "redis":
        import redis

        client = redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
        try:
            client.ping()
        finally:
            client.close()
        return "ok"
    # The ORM broker is a table in the database: reachable when its table answers.
    from django_q.models import OrmQ  # imported late: django_q's models need the app registry

    OrmQ.objects.exists()
    return "ok"


def healthz(request):
    """200 {"database": "ok", "broker": "ok"}, or 503 naming what failed."""
    result, healthy = {}, True
    for name, check in (("database", _check_database), ("broker", _check_broker)):
        try:
            result[name] = check()
        except Exception as exc:
            healthy = False
            result[name] = f"error: {type(exc).__name__}"
            logger.warning("healthz: %s check failed: %s", name, exc)
    response = JsonResponse(result, status=200 if healthy else 503)
    response["Cache-Control"] = "no-store"
    return response


def metrics_view(request):
    """Prometheus text format. With settings.METRICS_TOKEN set, it needs `Authorization: Bearer <token>`."""
    token = settings.METRICS_TOKEN
    if token:
        sent = request.headers.get("Authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
            return JsonResponse({"code": "not_authenticated", "detail": _("metrics need the bearer token")}, status=401)
    try:
        body = metrics.render()
    except Exception as exc:
        logger.warning("metrics: scrape failed: %s", exc)
        return JsonResponse({"code": "unavailable", "detail": _("database unavailable")}, status=503)
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)
