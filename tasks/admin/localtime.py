"""Times in the console: shown in CONSOLE_TIME_ZONE, with the UTC time on hover.

Everything is stored and computed in UTC (USE_TZ, TIME_ZONE = "UTC"); only the
console's pages are rendered in the operator's zone, one zone for the deployment
(settings.CONSOLE_TIME_ZONE). Every time the console prints through ``moment`` is a
``<time>`` element whose title is the same instant in UTC, so a time read off the
console can be matched with logs and the API (which speak UTC).
"""

from __future__ import annotations

import zoneinfo
from datetime import UTC, datetime

from django.conf import settings
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString

ADMIN_PREFIX = "/admin/"


class ConsoleTimeZoneMiddleware:
    """Activate CONSOLE_TIME_ZONE for the console's requests (templates' date filter,
    timezone.localtime, the admin's date filters); the API stays in UTC."""

    def __init__(self, get_response):
        self.get_response = get_response
        self.zone = zoneinfo.ZoneInfo(settings.CONSOLE_TIME_ZONE)

    def __call__(self, request):
        if not request.path_info.startswith(ADMIN_PREFIX):
            return self.get_response(request)
        timezone.activate(self.zone)
        try:
            return self.get_response(request)
        finally:
            timezone.deactivate()


def utc_text(moment: datetime) -> str:
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"


def moment(value: datetime | None, text: str | None = None) -> SafeString | str:
    """``<time>`` with the local time (or ``text``: "3 min ago"), the UTC time in its title."""
    if value is None:
        return "—"
    local = timezone.localtime(value)
    return format_html(
        '<time datetime="{}" title="{}">{}</time>',
        value.astimezone(UTC).isoformat(),
        utc_text(value),
        text if text is not None else f"{local:%Y-%m-%d %H:%M:%S %Z}",
    )
