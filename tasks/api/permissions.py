"""Who may call what. Visibility of single rows is get_queryset's job (404, never 403)."""

from __future__ import annotations

from django.utils.translation import gettext_lazy
from rest_framework.permissions import BasePermission


class IsStaff(BasePermission):
    """Admin endpoints: staff only; anyone else authenticated gets 403."""

    message = gettext_lazy("staff only")

    def has_permission(self, request, view) -> bool:
        user = request.user
        return bool(user and user.is_authenticated and user.is_active and user.is_staff)
