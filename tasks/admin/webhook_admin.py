"""All users' webhooks and their deliveries (each attempt with its answer) in the console."""

from __future__ import annotations

import logging

from django import forms
from django.contrib import admin
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone

from tasks import webhooks
from tasks.admin.common import run_bulk
from tasks.errors import InvalidInput
from tasks.models import Webhook, WebhookAttempt, WebhookDelivery

logger = logging.getLogger(__name__)


class WebhookForm(forms.ModelForm):
    """The secret is write-only: required for a new webhook, left as it is when blank."""

    secret = forms.CharField(
        required=False,
        min_length=8,
        max_length=200,
        widget=forms.PasswordInput(render_value=False),
        help_text="HMAC key of X-Webhook-Signature; leave blank to keep the current one.",
    )
    events = forms.MultipleChoiceField(
        choices=[(e, e) for e in Webhook.EVENTS], widget=forms.CheckboxSelectMultiple, required=True
    )

    class Meta:
        model = Webhook
        fields = ["owner", "url", "events", "enabled"]

    def clean_url(self):
        try:
            return webhooks.validate_url(self.cleaned_data.get("url", ""))
        except InvalidInput as exc:
            raise ValidationError(exc.detail) from None

    def clean_secret(self):
        secret = self.cleaned_data.get("secret", "")
        if not secret and self.instance.pk is None:
            raise ValidationError("a new webhook needs a secret")
        return secret

    def save(self, commit=True):
        hook = super().save(commit=False)
        if self.cleaned_data.get("secret"):
            hook.secret = self.cleaned_data["secret"]
        if commit:
            hook.save()
        return hook


class WebhookAttemptInline(admin.TabularInline):
    model = WebhookAttempt
    extra = 0
    can_delete = False
    fields = ("at", "ok", "response_code", "error", "duration_ms")
    readonly_fields = fields
    ordering = ("-at", "-id")

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Webhook)
class WebhookAdmin(admin.ModelAdmin):
    form = WebhookForm
    list_display = ("id", "owner", "url", "event_list", "enabled", "pending", "created_at")
    list_filter = ("enabled",)
    search_fields = ("owner__username", "url")
    list_select_related = ("owner",)
    raw_id_fields = ("owner",)

    @admin.display(description="events")
    def event_list(self, hook: Webhook) -> str:
        return ", ".join(hook.events)

    @admin.display(description="deliveries pending")
    def pending(self, hook: Webhook) -> int:
        return hook.deliveries.filter(status=WebhookDelivery.PENDING).count()


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "webhook",
        "event",
        "task",
        "status",
        "attempts",
        "last_response_code",
        "last_error",
        "created_at",
        "next_attempt_at",
        "delivered_at",
    )
    list_filter = ("status", "event")
    search_fields = ("webhook__owner__username", "webhook__url", "task__id")
    list_select_related = ("webhook",)
    ordering = ("-created_at", "-id")
    readonly_fields = [f.name for f in WebhookDelivery._meta.fields]
    inlines = [WebhookAttemptInline]
    actions = ("send_again",)
    show_full_result_count = False

    def has_add_permission(self, request) -> bool:
        return False

    @admin.action(description="Send selected deliveries again now", permissions=["change"])
    def send_again(self, request: HttpRequest, queryset: QuerySet):
        def again(delivery: WebhookDelivery) -> None:
            WebhookDelivery.objects.filter(pk=delivery.pk).update(
                status=WebhookDelivery.PENDING, next_attempt_at=timezone.now(), locked_until=None
            )
            logger.info("webhook delivery %s: sent again by %s", delivery.pk, request.user)

        run_bulk("Send again", queryset.order_by("pk"), again, label=lambda d: f"delivery {d.pk}").report(self, request)
