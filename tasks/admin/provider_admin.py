"""Providers in the console: concurrency settings edited live, load against the limit,
a connectivity check, and secrets that can be replaced but never shown.

A save writes only the fields the operator changed (``update_fields``): the
capacity counters on the same row move under the provider lock while the form
is open, and a full save would write their stale values back.
"""

from __future__ import annotations

import json
import logging
import time

from django import forms
from django.contrib import admin, messages
from django.db import transaction
from django.db.models import Count, IntegerField, OuterRef, QuerySet, Subquery, Value
from django.db.models.functions import Coalesce
from django.http import HttpRequest, JsonResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _
from django.views.decorators.cache import never_cache

from tasks.admin.common import SCRIPTS, STYLES, SafeSelectionMixin, log_console_action
from tasks.admin.lists import ReachableFilter
from tasks.engine import dispatch
from tasks.engine import health as provider_health
from tasks.engine.states import EXECUTING, PENDING
from tasks.models import Provider, Task

logger = logging.getLogger(__name__)

CONCURRENCY_FIELDS = (
    "enabled",
    "allow_concurrent_tasks",
    "max_concurrent_tasks",
    "enable_task_polling",
    "task_poll_interval",
)


def _task_count(statuses=None) -> Coalesce:
    """Tasks of each provider row in these states; without states, the "stopping" holds."""
    tasks = Task.objects.filter(provider=OuterRef("pk"))
    tasks = tasks.filter(status__in=statuses) if statuses is not None else tasks.filter(held_until__isnull=False)
    counts = tasks.order_by().values("provider").annotate(n=Count("pk")).values("n")[:1]
    return Coalesce(Subquery(counts, output_field=IntegerField()), Value(0))


SERIAL_LIMIT_ERROR = _(
    "a limit above 1 needs “allow concurrent tasks”: tick it, or set 1 (a serial provider runs one task at a time)"
)


class WriteOnlyTextarea(forms.Textarea):
    """A textarea that never renders a value: a form sent back with an error must not
    show the secret that was typed into it (like PasswordInput(render_value=False))."""

    def format_value(self, value):
        return None


class ProviderForm(forms.ModelForm):
    new_secrets = forms.CharField(
        required=False,
        label=_("Set secrets"),
        widget=WriteOnlyTextarea(attrs={"rows": 3, "cols": 60, "autocomplete": "off", "spellcheck": "false"}),
        help_text=_(
            'Write-only. A JSON object, e.g. {"token": "..."}; it REPLACES the stored secrets, '
            "which are encrypted and never shown (not even when the form comes back with an "
            "error: type them again). Leave empty to keep them."
        ),
    )
    clear_secrets = forms.BooleanField(required=False, label=_("Remove all stored secrets"))

    class Meta:
        model = Provider
        fields = "__all__"

    def clean_new_secrets(self) -> dict | None:
        raw = self.cleaned_data.get("new_secrets", "").strip()
        if not raw:
            return None
        try:
            value = json.loads(raw)
        except ValueError as exc:
            # The message must not echo the input: it is a secret.
            raise forms.ValidationError(
                _("not valid JSON (line %(line)s)") % {"line": getattr(exc, "lineno", "?")}
            ) from None
        if not isinstance(value, dict) or not value:
            raise forms.ValidationError(_('a non-empty JSON object is required, e.g. {"token": "..."}'))
        return value

    def clean(self):
        data = super().clean()
        start, end = data.get("port_range_start"), data.get("port_range_end")
        if start is not None and end is not None and start > end:
            self.add_error("port_range_end", _("must not be below the start of the port range"))
        if data.get("new_secrets") and data.get("clear_secrets"):
            self.add_error("clear_secrets", _("either set new secrets or remove them, not both"))
        # A limit above 1 on a serial provider would save and do nothing (the limit stays 1).
        # Checked only when one of the two changes: an old row may still hold both.
        if {"allow_concurrent_tasks", "max_concurrent_tasks"} & set(self.changed_data):
            limit = data.get("max_concurrent_tasks")
            if limit is not None and limit > 1 and not data.get("allow_concurrent_tasks"):
                self.add_error("max_concurrent_tasks", SERIAL_LIMIT_ERROR)
        return data


@admin.register(Provider)
class ProviderAdmin(SafeSelectionMixin, admin.ModelAdmin):
    form = ProviderForm
    list_display = (
        "name",
        "provider_type",
        "load",
        "health",
        "enabled",
        "allow_concurrent_tasks",
        "max_concurrent_tasks",
        "enable_task_polling",
        "task_poll_interval",
        "capacity",
    )
    list_editable = CONCURRENCY_FIELDS
    list_filter = ("provider_type", "enabled", ReachableFilter)
    search_fields = ("name",)
    actions = ("check_connectivity",)
    readonly_fields = (
        "load",
        "health",
        "live_health",
        "capacity",
        "secrets_state",
        "cpu_used",
        "memory_used_mb",
        "disk_used_mb",
        "containers_used",
        "vms_used",
        "created_at",
        "updated_at",
    )
    fieldsets = (
        (None, {"fields": ("name", "provider_type", "enabled", "live_health", "connection")}),
        (_("Secrets"), {"fields": ("secrets_state", "new_secrets", "clear_secrets")}),
        (
            _("Concurrency (applied at the next admission, within a second or two)"),
            {
                "fields": (
                    "load",
                    "allow_concurrent_tasks",
                    "max_concurrent_tasks",
                    "enable_task_polling",
                    "task_poll_interval",
                )
            },
        ),
        (
            "Capacity",
            {
                "fields": (
                    "capacity",
                    ("cpu_total", "cpu_used"),
                    ("memory_total_mb", "memory_used_mb"),
                    ("disk_total_mb", "disk_used_mb"),
                    ("max_containers", "containers_used"),
                    ("max_vms", "vms_used"),
                )
            },
        ),
        (_("Ports"), {"fields": ("port_range_start", "port_range_end", "default_port_block")}),
        (_("Dates"), {"fields": ("created_at", "updated_at")}),
    )

    class Media:
        css = {"all": STYLES}
        js = SCRIPTS

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        # Correlated counts per provider row use the (provider, status, ...) index;
        # a JOIN + GROUP BY over all tasks would not.
        return (
            super()
            .get_queryset(request)
            .annotate(n_running=_task_count(EXECUTING), n_pending=_task_count([PENDING]), n_held=_task_count())
        )

    def get_readonly_fields(self, request: HttpRequest, obj: Provider | None = None):
        fields = list(super().get_readonly_fields(request, obj))
        if obj is not None and obj.instances.exists():
            # Its instances were made by this kind of driver; switching would orphan them.
            fields.append("provider_type")
        return fields

    # ------------------------------------------------------------ columns

    @admin.display(description=_("health"))
    def live_health(self, provider: Provider):
        """The health on the provider's own page, kept current while it stays open
        (tasks/static/tasks/progress.js asks health_view): a queue resumed by a probe
        shows as reachable without a reload."""
        if provider.pk is None:
            return "—"
        url = reverse("admin:tasks_provider_health", args=[provider.pk])
        return format_html(
            '<span data-role="provider-health" data-health-url="{}">{}</span>', url, self.health(provider)
        )

    def health_view(self, request, object_id):
        provider = self.get_object(request, object_id)
        if provider is None:
            return JsonResponse({"code": "not_found", "detail": _("no such provider")}, status=404)
        return JsonResponse({"html": str(self.health(provider)), "held": provider.unreachable_since is not None})

    def get_urls(self):
        from django.urls import path

        info = self.opts.app_label, self.opts.model_name
        view = never_cache(self.admin_site.admin_view(self.health_view))
        name = f"{info[0]}_{info[1]}_health"
        return [path("<path:object_id>/health/", view, name=name), *super().get_urls()]

    @admin.display(description=_("health"))
    def health(self, provider: Provider):
        if provider.pk is None:
            return "—"
        if provider.unreachable_since is None:
            return format_html('<span class="tc-badge tc-badge--completed">{}</span>', _("reachable"))
        return format_html(
            '<span class="tc-badge tc-badge--failed" title="{}">{}</span><div class="tc-muted">{}</div>',
            provider.unreachable_error,
            _("unreachable since %(since)s")
            % {"since": timezone.localtime(provider.unreachable_since).strftime("%Y-%m-%d %H:%M:%S")},
            _("queue held until it answers; last error: %(error)s") % {"error": provider.unreachable_error},
        )

    @admin.display(description=_("running / limit · pending"), ordering="n_running")
    def load(self, provider: Provider):
        running = getattr(provider, "n_running", None)
        pending = getattr(provider, "n_pending", None)
        if running is None:  # the add form: no annotation
            return "—"
        limit = provider.concurrency_limit
        # Ended tasks whose worker may still be stopping hold a slot too (Task.held_until).
        held = getattr(provider, "n_held", 0) or 0
        full = running + held >= limit
        percent = min(100, round(100 * (running + held) / limit)) if limit else 100
        stopping = format_html(" · {}", _("%(n)s stopping") % {"n": held}) if held else ""
        return format_html(
            '<div class="tc-gauge{}" title="{}">'
            '<div class="tc-gauge__bar" style="width: {}%"></div>'
            '<span class="tc-gauge__label">{}</span></div>',
            " tc-gauge--full" if full else "",
            _("%(running)s running of %(limit)s allowed; %(pending)s pending")
            % {"running": running, "limit": limit, "pending": pending},
            percent,
            _("%(running)s / %(limit)s · %(pending)s pending")
            % {"running": running, "limit": limit, "pending": pending}
            + stopping,
        )

    @admin.display(description=_("capacity used"))
    def capacity(self, provider: Provider) -> str:
        return _(
            "CPU %(cpu)s/%(cpu_total)s · RAM %(memory)s/%(memory_total)s MB · "
            "containers %(containers)s/%(max_containers)s · VMs %(vms)s/%(max_vms)s"
        ) % {
            "cpu": provider.cpu_used,
            "cpu_total": provider.cpu_total,
            "memory": provider.memory_used_mb,
            "memory_total": provider.memory_total_mb,
            "containers": provider.containers_used,
            "max_containers": provider.max_containers,
            "vms": provider.vms_used,
            "max_vms": provider.max_vms,
        }

    @admin.display(description=_("stored secrets"))
    def secrets_state(self, provider: Provider) -> str:
        if not provider.secrets_encrypted:
            return _("none")
        try:
            names = sorted(provider.get_secrets())
        except Exception:
            return _("set, but cannot be decrypted with the current SECRETS_KEY")
        # The names are configuration ("token", "password"); the values never leave the server.
        return _("set, encrypted (%(names)s)") % {"names": ", ".join(names)}

    # ------------------------------------------------------------ saving

    def save_model(self, request: HttpRequest, obj: Provider, form: forms.ModelForm, change: bool) -> None:
        secrets = form.cleaned_data.get("new_secrets")
        if secrets:
            obj.set_secrets(secrets)
        elif form.cleaned_data.get("clear_secrets"):
            obj.secrets_encrypted = ""
        if not change:
            obj.save()
        else:
            model_fields = {f.name for f in Provider._meta.concrete_fields}
            fields = [name for name in form.changed_data if name in model_fields]
            if secrets or form.cleaned_data.get("clear_secrets"):
                fields.append("secrets_encrypted")
            if not fields:
                return
            obj.save(update_fields=[*fields, "updated_at"])
            # Never log secrets: only the names of the changed fields.
            logger.info("provider %s: %s changed by %s in the console", obj.pk, ", ".join(fields), request.user)
        provider_id = obj.pk
        # Applied at once: a raised limit or a re-enabled provider admits its queue now.
        transaction.on_commit(lambda: dispatch.admit_soon(provider_id))

    # ------------------------------------------------------------ actions

    @admin.action(description=_("Check connectivity (asks each provider for its version; resumes held queues)"))
    def check_connectivity(self, request: HttpRequest, queryset: QuerySet) -> None:
        from providers.base import build_driver
        from tasks.engine.worker import provider_config

        ok = failed = 0
        for provider in queryset.order_by("name"):
            started = time.monotonic()
            try:
                info = build_driver(provider_config(provider)).server_info()
            except Exception as exc:
                failed += 1
                logger.warning("provider %s: connectivity check failed: %s", provider.pk, exc)
                text = _("%(name)s: unreachable or refused (%(error)s).") % {
                    "name": provider.name,
                    "error": f"{type(exc).__name__}: {exc}",
                }
                if provider.unreachable_since is not None:
                    text += " " + _("Its queue stays held.")
                self.message_user(request, text, messages.ERROR)
                log_console_action(
                    self,
                    request,
                    provider,
                    gettext("Connectivity check: failed (%(error)s)") % {"error": type(exc).__name__},
                )
                continue
            ok += 1
            elapsed = time.monotonic() - started
            text = _("%(name)s: OK, version %(version)s (%(ms)s ms).") % {
                "name": provider.name,
                "version": info.version,
                "ms": f"{elapsed * 1000:.0f}",
            }
            if provider_health.mark_reachable(provider.pk):
                text += " " + _("Its held queue resumes.")
                logged = gettext("Connectivity check: answers, version %(version)s; its held queue resumed")
            else:
                logged = gettext("Connectivity check: answers, version %(version)s")
            self.message_user(request, text, messages.SUCCESS)
            log_console_action(self, request, provider, logged % {"version": info.version})
        if ok + failed > 1:
            self.message_user(
                request,
                _("Connectivity: %(ok)s reachable, %(failed)s failed.") % {"ok": ok, "failed": failed},
                messages.INFO,
            )
