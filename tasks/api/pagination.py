"""Page-number pagination: ``?page=N&page_size=M`` (M at most 100).

A malformed ``page`` or ``page_size`` is a 400 naming the parameter (DRF would
silently fall back to the default size, or answer 404 for ``page=abc``); a page
past the last one stays DRF's 404.
"""

from __future__ import annotations

from django.core.paginator import Paginator
from django.utils.translation import gettext as _
from rest_framework.exceptions import ValidationError
from rest_framework.pagination import PageNumberPagination as _Base

MAX_PAGE = 10**9


def _positive(params, name: str, maximum: int | None = None) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise ValidationError({name: [_("must be a positive integer")]}) from None
    if value < 1:
        raise ValidationError({name: [_("must be a positive integer")]})
    if maximum is not None:
        value = min(value, maximum)
    return value


class PageNumberPagination(_Base):
    page_size = 20
    page_size_query_param = "page_size"
    max_page_size = 100
    page_query_description = "page number, from 1"
    page_size_query_description = "results per page (default 20, at most 100: larger values are capped)"

    def paginate_queryset(self, queryset, request, view=None, count: int | None = None):
        """``count``: the number of rows when the caller knows it cheaper than COUNT(*)."""
        self._known_count = count
        return super().paginate_queryset(queryset, request, view)

    def django_paginator_class(self, object_list, per_page) -> Paginator:
        paginator = Paginator(object_list, per_page)
        if getattr(self, "_known_count", None) is not None:
            paginator.count = self._known_count  # overrides the cached_property
        return paginator

    def get_page_size(self, request) -> int:
        return _positive(request.query_params, self.page_size_query_param, self.max_page_size) or self.page_size

    def get_page_number(self, request, paginator):
        if request.query_params.get(self.page_query_param) in self.last_page_strings:
            return paginator.num_pages
        # Beyond MAX_PAGE no page can exist; capping keeps the OFFSET arithmetic sane.
        return _positive(request.query_params, self.page_query_param, MAX_PAGE) or 1

    def get_schema_operation_parameters(self, view):
        params = super().get_schema_operation_parameters(view)
        for param in params:
            param["schema"] = {"type": "integer", "minimum": 1}
        return params
