"""List helpers of the console: exact search by id or uuid, the state-group filter,
a paginator that can be told its count, and precise time columns."""

from __future__ import annotations

import uuid as uuid_lib

from django.contrib import admin
from django.core.paginator import Paginator
from django.db.models import Q
from django.utils.functional import cached_property
from django.utils.translation import gettext_lazy as _

from tasks.admin.common import exact_time
from tasks.engine.states import ACTIVE, FAILED, FINAL, TIMEOUT


def search_by_identity(term: str) -> Q | None:
    """A task/instance id ("42" or "#42") or a uuid (with or without dashes), exactly."""
    term = term.strip()
    if term.lstrip("#").isdigit():
        return Q(pk=int(term.lstrip("#")))
    try:
        return Q(uuid=uuid_lib.UUID(term))
    except ValueError:
        return None


def moment_field(field: str, description: str):
    @admin.display(description=description, ordering=field)
    def show(self, obj) -> str:
        return exact_time(getattr(obj, field))

    return show


class KnownCountPaginator(Paginator):
    """A paginator that can be told the count instead of running COUNT(*)."""

    def __init__(self, *args, known_count: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.known_count = known_count

    @cached_property
    def count(self) -> int:
        return self.known_count if self.known_count is not None else super().count


class StateGroupFilter(admin.SimpleListFilter):
    title = _("state group")
    parameter_name = "state"

    GROUPS = {
        "active": (_("Active (pending, running, cancelling)"), ACTIVE),
        "finished": (_("Finished"), FINAL),
        "problem": (_("Failed or timed out"), frozenset({FAILED, TIMEOUT})),
    }

    def lookups(self, request, model_admin):
        return [(key, group[0]) for key, group in self.GROUPS.items()]

    def queryset(self, request, queryset):
        group = self.GROUPS.get(self.value() or "")
        return queryset.filter(status__in=group[1]) if group else queryset
