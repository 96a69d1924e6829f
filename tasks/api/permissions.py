"""Who may call what. Visibility of single rows is get_queryset's job (404, never 403).

Admin endpoints need ``is_staff`` and the Django permission of what they do, as
in the admin console (API.md): a viewset names them per action in
``required_permissions``; an action it does not name needs the view permission
of its model for a safe method and the change permission for anything else, so
a new admin action is never open to every staff member by default. As in the
console, a change permission implies the view permission of the same model;
superusers have every permission.
"""

from __future__ import annotations

from django.utils.translation import gettext, gettext_lazy
from rest_framework.permissions import SAFE_METHODS, BasePermission


def _implied(perm: str) -> tuple[str, ...]:
    """The permissions that grant ``perm``: itself, and change_X for view_X (the console's rule)."""
    app, _, codename = perm.partition(".")
    if codename.startswith("view_"):
        return (perm, f"{app}.change_{codename[len('view_') :]}")
    return (perm,)


def has_permission(user, perm: str) -> bool:
    return any(user.has_perm(p) for p in _implied(perm))


def required_permission(request, view) -> str:
    """The permission the view's current action needs."""
    action = getattr(view, "action", None)
    named = getattr(view, "required_permissions", {}) or {}
    if action in named:
        return named[action]
    model = getattr(view, "permission_model", None)
    if model is None:  # nothing declared: superusers only
        return "tasks.undeclared_admin_action"
    verb = "view" if request.method in SAFE_METHODS else "change"
    return f"{model._meta.app_label}.{verb}_{model._meta.model_name}"


class IsStaff(BasePermission):
    """Admin endpoints: an active staff member with the action's permission; anyone else 403."""

    message = gettext_lazy("staff only, with the permission of this action")

    def has_permission(self, request, view) -> bool:
        user = request.user
        if not (user and user.is_authenticated and user.is_active and user.is_staff):
            return False
        perm = required_permission(request, view)
        if has_permission(user, perm):
            return True
        self.message = gettext("you do not have the permission %(permission)s") % {"permission": perm}
        return False
