"""Shared pieces of the console: badges, progress bars, redaction, bulk-action reports.

Every bulk action calls the same services as the API, one object at a time, and
reports "N done, M skipped": a skip is a service refusal (the task finished
meanwhile, the instance is busy), never an error, and it changes nothing.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.utils import quote
from django.db import models
from django.http import HttpRequest, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import get_script_prefix, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.text import capfirst
from django.utils.translation import gettext, gettext_lazy, gettext_noop
from django.utils.translation import gettext as _

from tasks.admin.localtime import moment as time_element
from tasks.engine.states import FINAL, InstanceStatus, TaskStatus
from tasks.errors import ServiceError
from tasks.messages import translate as translate_message

logger = logging.getLogger(__name__)

# Keys whose values never leave the server: matched as substrings, case-insensitive.
SECRET_MARKERS = ("password", "secret", "token", "key")
REDACTED = gettext_noop("•••••• (redacted)")  # shown translated (redact)
# A confirmation page lists the objects it acts on; beyond this, narrow the selection.
MAX_BULK = 500
STYLES = ("tasks/admin.css",)
SCRIPTS = ("tasks/progress.js",)


MAX_ID = 2**63 - 1  # the largest id a BIGINT primary key holds


def _valid_id(value: str) -> bool:
    return value.isascii() and value.isdigit() and 1 <= int(value) <= MAX_ID


class SafeSelectionMixin:
    """Changelist actions refuse a forged selection (``_selected_action`` that is not an
    id: ``abc``, empty, ``1.5``, a 30-digit number) with a message instead of a 500; the
    ids are checked before Django's ``pk__in`` filter sees them."""

    def response_action(self, request: HttpRequest, queryset):
        selected = request.POST.getlist(helpers.ACTION_CHECKBOX_NAME)
        if not all(_valid_id(value) for value in selected):
            logger.warning("console action by %s: forged selection refused", request.user)
            self.message_user(request, _("The selection holds an invalid id; nothing was done."), messages.ERROR)
            return HttpResponseRedirect(request.get_full_path())
        return super().response_action(request, queryset)


class ConsolePageMixin(SafeSelectionMixin):
    """Console pages for rows that change only through the services: the console's
    styles and live-progress script, no add, and a read-only object page (the
    list-level "change" permission still gates the actions)."""

    class Media:
        css = {"all": STYLES}
        js = SCRIPTS

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        if obj is not None:
            return False
        return super().has_change_permission(request)

    def changelist_view(self, request, extra_context=None):
        # Django titles the list "Select task to change" when the list-level change
        # permission (the actions') is there, though no row can be edited: name the rows.
        # Their own pages say "View task" (has_change_permission(obj) is False).
        extra = {"title": capfirst(self.model._meta.verbose_name_plural), **(extra_context or {})}
        return super().changelist_view(request, extra_context=extra)


# A list page renders hundreds of links and badges; reverse() for each cost a third
# of the task list's render time. The URLs depend only on the script prefix.
PK_MARK = "__pk__"


@functools.lru_cache(maxsize=64)
def _url(prefix: str, name: str, with_pk: bool) -> str:
    return reverse(name, args=[PK_MARK] if with_pk else None)


def progress_url() -> str:
    return _url(get_script_prefix(), "admin:tasks_task_progress", False)


def change_url(opts, pk) -> str:
    """The admin page of an object (``opts``: its model's _meta), without a reverse() per call."""
    pattern = _url(get_script_prefix(), f"admin:{opts.app_label}_{opts.model_name}_change", True)
    return pattern.replace(PK_MARK, quote(str(pk)))


def status_badge(task_id: int | None, status: str, label: str | None = None) -> SafeString:
    """A coloured badge; with a task id the progress poller keeps it current."""
    if label is None:
        label = TaskStatus(status).label if status in TaskStatus.values else status
    if task_id is None:
        return format_html('<span class="tc-badge tc-badge--{}">{}</span>', status, label)
    return format_html(
        '<span class="tc-badge tc-badge--{}" data-task-id="{}" data-role="badge" data-status="{}" '
        'data-progress-url="{}">{}</span>',
        status,
        task_id,
        status,
        progress_url(),
        label,
    )


def instance_badge(instance_id: int, status: str) -> SafeString:
    label = InstanceStatus(status).label if status in InstanceStatus.values else status
    return format_html(
        '<span class="tc-badge tc-badge--i-{}" data-instance-id="{}" data-role="instance-badge">{}</span>',
        status,
        instance_id,
        label,
    )


def progress_bar(task_id: int, status: str, progress: int, message: str = "", *, wide: bool = False) -> SafeString:
    """A bar the poller updates in place (data-task-id); its colour follows the status."""
    return format_html(
        '<div class="tc-progress tc-progress--{status}{wide}" data-task-id="{id}" data-role="progress" '
        'data-status="{status}" data-progress-url="{url}" role="progressbar" aria-valuemin="0" '
        'aria-valuemax="100" aria-valuenow="{progress}">'
        '<div class="tc-progress__bar" style="width: {progress}%"></div>'
        '<span class="tc-progress__label">{progress}%<span class="tc-progress__msg">{sep}{message}</span></span>'
        "</div>",
        status=status,
        wide=" tc-progress--wide" if wide else "",
        id=task_id,
        url=progress_url(),
        progress=int(progress),
        sep=" · " if message else "",
        message=translate_message(message),  # stored in English (tasks/messages.py)
    )


def human_duration(delta: timedelta | float | None) -> str:
    """Compact durations an operator reads at a glance: 850 ms, 42 s, 3 min 05 s, 2 h 10 min."""
    if delta is None:
        return "—"
    seconds = delta.total_seconds() if isinstance(delta, timedelta) else float(delta)
    seconds = max(0.0, seconds)
    if seconds < 1:
        return _("%(n)s ms") % {"n": f"{seconds * 1000:.0f}"}
    if seconds < 60:
        return _("%(n)s s") % {"n": f"{seconds:.1f}" if seconds < 10 else f"{seconds:.0f}"}
    minutes, sec = divmod(int(seconds), 60)
    if minutes < 60:
        return _("%(min)s min %(s)s s") % {"min": minutes, "s": f"{sec:02d}"}
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return _("%(h)s h %(min)s min") % {"h": hours, "min": f"{minutes:02d}"}
    return _("%(d)s d %(h)s h") % {"d": hours // 24, "h": hours % 24}


def age(moment: datetime | None, now: datetime | None = None) -> str:
    if moment is None:
        return "—"
    return _("%(duration)s ago") % {"duration": human_duration((now or timezone.now()) - moment)}


def exact_time(moment: datetime | None, now: datetime | None = None) -> SafeString | str:
    """To the millisecond in the console's time zone, with how long ago (or how soon), the
    UTC time on hover (tasks.admin.localtime): what an operator correlates with logs."""
    if moment is None:
        return "—"
    local = timezone.localtime(moment)
    delta = (now or timezone.now()) - moment
    if delta.total_seconds() >= 0:
        relative = _("%(duration)s ago") % {"duration": human_duration(delta)}
    else:
        relative = _("in %(duration)s") % {"duration": human_duration(-delta)}
    text = f"{local:%Y-%m-%d %H:%M:%S}.{local.microsecond // 1000:03d} {local:%Z} ({relative})"
    return time_element(moment, text)


def redact(value: Any) -> Any:
    """A copy of JSON-like data with the values of secret-looking keys replaced."""
    if isinstance(value, dict):
        return {
            key: (gettext(REDACTED) if any(m in str(key).lower() for m in SECRET_MARKERS) else redact(item))
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [redact(item) for item in value]
    return value


def admin_link(obj: models.Model | None, text: str | None = None) -> SafeString | str:
    if obj is None:
        return "—"
    url = change_url(obj._meta, obj.pk)
    return format_html('<a href="{}">{}</a>', url, text if text is not None else str(obj))


def is_final(status: str) -> bool:
    return status in FINAL


# ------------------------------------------------------------------ bulk actions


@dataclass
class BulkResult:
    """What one bulk action did: objects acted on, and the ones skipped with why."""

    verb: str
    done: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        text = _("%(verb)s: %(done)s done, %(skipped)s skipped") % {
            "verb": self.verb,
            "done": len(self.done),
            "skipped": len(self.skipped),
        }
        if self.failed:
            text += _(", %(n)s failed") % {"n": len(self.failed)}
        details = [f"{label}: {why}" for label, why in (self.skipped + self.failed)[:10]]
        if len(self.skipped) + len(self.failed) > 10:
            details.append("…")
        return text + (" (" + "; ".join(details) + ")" if details else "") + "."

    def report(self, modeladmin: admin.ModelAdmin, request: HttpRequest) -> None:
        if self.failed:
            level = messages.ERROR
        elif self.skipped:
            level = messages.WARNING
        else:
            level = messages.SUCCESS
        modeladmin.message_user(request, self.summary(), level)


def run_bulk(
    verb: str,
    objects: Iterable[models.Model],
    perform: Callable[[models.Model], Any],
    *,
    label: Callable[[models.Model], str] = str,
) -> BulkResult:
    """Call ``perform`` per object, each in its own transaction (inside the service).

    A ServiceError is the service saying no (lost race, busy, wrong state): a skip.
    Anything else is a bug or an outage: logged and counted as failed, and the
    remaining objects are still tried.
    """
    result = BulkResult(verb)
    for obj in objects:
        try:
            perform(obj)
        except ServiceError as exc:
            result.skipped.append((label(obj), exc.detail))
        except Exception as exc:
            logger.exception("%s of %s failed in the console", verb, label(obj))
            result.failed.append((label(obj), f"{type(exc).__name__}: {exc}"))
        else:
            result.done.append(label(obj))
    return result


class ReasonForm(forms.Form):
    reason = forms.CharField(
        max_length=500,
        required=True,
        strip=True,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60, "autofocus": True}),
        label=gettext_lazy("Reason"),
        help_text=gettext_lazy("Recorded in each task's timeline and shown to its owner."),
    )


class ConfirmForm(forms.Form):
    """A confirmation without a reason (destructive instance actions)."""


def confirm_action(
    modeladmin: admin.ModelAdmin,
    request: HttpRequest,
    queryset: models.QuerySet,
    *,
    action: str,
    title: str,
    explanation: str,
    perform: Callable[[dict], BulkResult],
    form_class: type[forms.Form] = ReasonForm,
    danger: bool = False,
    button: str = "",
    post_url: str = "",
    describe: Callable[[models.Model], str] | None = None,
) -> TemplateResponse | None:
    """The intermediate page of an action: ask (a reason), then act and report.

    The page posts back the action name and the selected ids, so the second POST
    arrives at the changelist like the first, with ``confirm`` set. Returning None
    sends the operator back to the changelist with the report.
    """
    confirmed = request.method == "POST" and request.POST.get("confirm") == action
    form = form_class(request.POST if confirmed else None)
    if confirmed and form.is_valid():
        perform(form.cleaned_data).report(modeladmin, request)
        return None
    count = queryset.count()
    if count > MAX_BULK:
        modeladmin.message_user(
            request,
            _("%(count)s objects selected; act on at most %(max)s at a time (narrow the filter).")
            % {"count": count, "max": MAX_BULK},
            messages.ERROR,
        )
        return None
    opts = modeladmin.model._meta
    context = {
        **modeladmin.admin_site.each_context(request),
        "title": title,
        "subtitle": None,
        "opts": opts,
        "objects": [(obj, describe(obj) if describe else "") for obj in queryset],
        "action": action,
        "explanation": explanation,
        "form": form,
        "danger": danger,
        "button": button or _("Confirm"),
        "post_url": post_url,
        "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
        "changelist_url": reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist"),
        "media": forms.Media(css={"all": STYLES}),
    }
    return TemplateResponse(request, "admin/tasks/confirm_action.html", context)


def log_console_action(modeladmin: admin.ModelAdmin, request: HttpRequest, obj: models.Model, message: str) -> None:
    """Record a console action in Django's admin log (the object's History, the index's
    Recent actions). A failure to log never undoes or hides the action itself."""
    try:
        modeladmin.log_change(request, obj, message)
    except Exception:
        logger.exception("admin log entry for %s not written", obj)
