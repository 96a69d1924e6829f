"""FilterSets of the task and instance lists (API.md).

Filters only narrow: who may see what is decided in the views' get_queryset.
Every invalid value is a form error, which DjangoFilterBackend turns into a
400 naming the parameter (tasks.api.errors), never an empty page or a 500.
"""

from __future__ import annotations

from datetime import UTC, datetime

from django import forms
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.utils import timezone
from django.utils.translation import gettext as _
from django_filters import rest_framework as filters
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field

from tasks.engine.states import InstanceStatus, TaskStatus, TaskType
from tasks.lookups import owner_in
from tasks.models import Instance, InstanceType, PortMapping, Provider, Task

# Largest value a BIGINT primary key can hold: larger ids exist nowhere.
MAX_ID = 2**63 - 1
USERNAME_MATCH_LIMIT = 10_000


class CommaChoiceField(forms.Field):
    """``a,b,c`` -> ["a", "b", "c"], each one of ``choices``."""

    def __init__(self, *args, valid: tuple[str, ...] = (), **kwargs):
        self.valid = tuple(valid)
        super().__init__(*args, **kwargs)

    def to_python(self, value):
        if value in (None, ""):
            return []
        items = [item.strip() for item in str(value).split(",") if item.strip()]
        bad = [item for item in items if item not in self.valid]
        if bad:
            raise ValidationError(
                _("unknown value %(bad)s; expected a comma-separated list of: %(valid)s"),
                code="invalid_choice",
                params={"bad": ", ".join(repr(b) for b in bad[:5]), "valid": ", ".join(self.valid)},
            )
        return list(dict.fromkeys(items))


@extend_schema_field(OpenApiTypes.STR)
class CommaChoiceFilter(filters.Filter):
    """Exact match on any of a comma-separated list of known values."""

    field_class = CommaChoiceField

    def __init__(self, *args, choices: tuple[str, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.extra["valid"] = tuple(choices)

    def filter(self, qs: QuerySet, value):
        if not value:
            return qs
        name = self.field_name
        if len(value) == 1:
            return qs.filter(**{name: value[0]})
        return qs.filter(**{f"{name}__in": value})


class IdField(forms.IntegerField):
    """An object id: a positive integer that fits the database column."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("min_value", 1)
        kwargs.setdefault("max_value", MAX_ID)
        super().__init__(*args, **kwargs)


@extend_schema_field({"type": "integer", "minimum": 1, "maximum": MAX_ID})
class IdFilter(filters.NumberFilter):
    # NumberFilter's DecimalField would accept 1.5 and 1e9999.
    field_class = IdField


class UtcDateTimeField(forms.DateTimeField):
    """ISO 8601 date-time; naive values are UTC; impossible ones are a 400, not a 500."""

    input_formats = ["iso-8601"]

    def to_python(self, value):
        if value in self.empty_values:
            return None
        text = str(value).strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise ValidationError(_("enter an ISO 8601 date-time, e.g. 2026-01-31T12:00:00Z"), code="invalid") from None
        if timezone.is_naive(parsed):
            parsed = parsed.replace(tzinfo=UTC)
        try:
            return parsed.astimezone(UTC)
        except OverflowError:
            # Year 1 with a positive offset or year 9999 with a negative one.
            raise ValidationError(_("date-time out of range"), code="invalid") from None


@extend_schema_field(OpenApiTypes.DATETIME)
class UtcDateTimeFilter(filters.Filter):
    field_class = UtcDateTimeField


class StableOrderingFilter(filters.OrderingFilter):
    """Explicit ordering fields plus a tie-breaker on id in the same direction.

    The tie-breaker follows the direction of the last key (``created_at, id`` or
    ``-created_at, -id``) so the composite indexes on (..., created_at, id) serve
    both directions; a mixed direction would force a filesort on large tables.
    """

    def __init__(self, *args, default: tuple[str, ...] = ("-created_at",), **kwargs):
        self.default = default
        super().__init__(*args, **kwargs)

    def filter(self, qs: QuerySet, value):
        params = [p for p in (value or []) if p] or list(self.default)
        ordering = [self.get_ordering_value(p) for p in params]
        fields = [o.lstrip("-") for o in ordering]
        if "id" not in fields:
            ordering.append("-id" if ordering[-1].startswith("-") else "id")
        return qs.order_by(*ordering)


TASK_ORDERING = (
    ("created_at", "created_at"),
    ("started_at", "started_at"),
    ("completed_at", "completed_at"),
    ("progress", "progress"),
    ("id", "id"),
)


class TaskFilter(filters.FilterSet):
    """Filters of the caller's task list."""

    status = CommaChoiceFilter(
        field_name="status", choices=tuple(TaskStatus.values), help_text="comma-separated task states"
    )
    task_type = CommaChoiceFilter(
        field_name="task_type", choices=tuple(TaskType.values), help_text="comma-separated task types"
    )
    provider = IdFilter(field_name="provider_id", help_text="provider id")
    instance = IdFilter(field_name="instance_id", help_text="instance id")
    created_after = UtcDateTimeFilter(
        field_name="created_at", lookup_expr="gte", help_text="created at or after (ISO 8601)"
    )
    created_before = UtcDateTimeFilter(field_name="created_at", lookup_expr="lt", help_text="created before (ISO 8601)")
    ordering = StableOrderingFilter(
        fields=TASK_ORDERING, help_text="created_at (default -created_at), started_at, completed_at, progress, id"
    )

    class Meta:
        model = Task
        fields: list[str] = []


class AdminTaskFilter(TaskFilter):
    """The user filters plus owner, username substring and instance type."""

    user = IdFilter(field_name="owner_id", help_text="owner's user id")
    username = filters.CharFilter(method="filter_username", max_length=150, help_text="owner's username contains")
    instance_type = CommaChoiceFilter(
        field_name="instance__instance_type", choices=tuple(InstanceType.values), help_text="container or vm"
    )
    ordering = StableOrderingFilter(
        fields=(*TASK_ORDERING, ("owner__username", "username")),
        help_text="created_at (default -created_at), started_at, completed_at, progress, id, username",
    )

    # The owners the username filter matched (None: not used, or too broad to list);
    # the admin list counts from the statistics' per-owner aggregate with them.
    username_owners: list[int] | None = None

    def filter_username(self, qs: QuerySet, name: str, value: str) -> QuerySet:
        # Resolve the (small) user table first and filter tasks on owner ids: the
        # task list then walks the (created_at, id) or (owner, created_at, id) index
        # instead of joining every task row to auth_user to test a LIKE '%..%'.
        # MariaDB turns an IN list of 1000+ values into a derived table and loses
        # that plan, so the ids go in chunks below that size (owner_in).
        value = value.strip()
        if not value:
            return qs
        ids = list(
            get_user_model()
            .objects.filter(username__icontains=value)
            .order_by("id")
            .values_list("id", flat=True)[: USERNAME_MATCH_LIMIT + 1]
        )
        if len(ids) > USERNAME_MATCH_LIMIT:
            # Too broad to list the ids: let the database join instead.
            return qs.filter(owner__username__icontains=value)
        self.username_owners = ids
        if not ids:
            return qs.none()
        return qs.filter(owner_in(ids))


class InstanceFilter(filters.FilterSet):
    """Filters of the instance lists. Deleted instances are listed only when asked for."""

    status = CommaChoiceFilter(
        field_name="status",
        choices=tuple(InstanceStatus.values),
        help_text="comma-separated instance states (deleted ones appear only when named here)",
    )
    provider = IdFilter(field_name="provider_id", help_text="provider id")
    instance_type = CommaChoiceFilter(field_name="instance_type", choices=tuple(InstanceType.values))
    ordering = StableOrderingFilter(
        fields=(("created_at", "created_at"), ("name", "name"), ("status", "status"), ("id", "id")),
        help_text="created_at (default -created_at), name, status, id",
    )

    class Meta:
        model = Instance
        fields: list[str] = []

    def filter_queryset(self, queryset: QuerySet) -> QuerySet:
        if not self.form.cleaned_data.get("status"):
            queryset = queryset.exclude(status=InstanceStatus.DELETED)
        return super().filter_queryset(queryset)


class AdminInstanceFilter(InstanceFilter):
    user = IdFilter(field_name="owner_id", help_text="owner's user id")


class ProviderFilter(filters.FilterSet):
    provider_type = filters.ChoiceFilter(
        field_name="provider_type", choices=Provider._meta.get_field("provider_type").choices
    )
    enabled = filters.BooleanFilter(field_name="enabled")
    ordering = StableOrderingFilter(
        fields=(("name", "name"), ("id", "id")), default=("name",), help_text="name (default), id"
    )

    class Meta:
        model = Provider
        fields: list[str] = []


class PortMappingFilter(filters.FilterSet):
    ordering = StableOrderingFilter(
        fields=(("host_port_start", "host_port"), ("id", "id")), default=("host_port",), help_text="host_port, id"
    )

    class Meta:
        model = PortMapping
        fields: list[str] = []
