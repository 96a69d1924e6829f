"""List helpers of the console: changelists that page by an index, counts that do not
scan, searches that resolve small tables first, the state-group filter, fixed-choice
filters, and precise time columns.

How a big list stays fast (docs/admin.md, "Lists at a million rows"):

- ``IndexedChangeList`` pages through ids first: ``SELECT id FROM <table> WHERE
  <filters> ORDER BY <index order> LIMIT 50 OFFSET n`` reads the table alone, in the
  order of one of its indexes; then the page's rows are loaded by primary key with
  their joins. Paging the joined query lets MariaDB pick the join order itself, and
  at a million tasks it started from ``auth_user`` and sorted everything.
- The count is exact when the admin knows it without scanning (``exact_count``:
  tasks' statistics base), else a bounded count: at most ``count_limit`` rows are
  read, and a larger result shows as "10000+" (``ResultCount``).
- Past the middle of an exactly counted list, pages are read from the other end.
- The tie-breaker of the ordering follows the direction of the first key, so
  ``created_at DESC, id DESC`` (or both ascending) is one index read backwards or
  forwards, never a sort.
- Facet counts ("show counts") are off unless an admin turns them on: they count
  every row of the filtered list once per filter choice.
"""

from __future__ import annotations

import heapq
import uuid as uuid_lib
from typing import NamedTuple

from django.contrib import admin
from django.contrib.admin.options import IncorrectLookupParameters
from django.contrib.admin.views.main import ChangeList
from django.contrib.auth import get_user_model
from django.core.paginator import Paginator
from django.db.models import F, Q, QuerySet
from django.utils.functional import cached_property
from django.utils.translation import gettext_lazy as _

from tasks.admin.common import change_url, exact_time
from tasks.engine.states import ACTIVE, FAILED, FINAL, TIMEOUT
from tasks.lookups import IntegerIn

# A search term matching more users (or instances) than this is too broad to list
# their ids: it is matched with a join instead (still ordered by the list's index).
MATCH_LIMIT = 10_000
# At most this many branches are read one by one (IndexedListMixin.index_branches).
MAX_BRANCHES = 20


# ------------------------------------------------------------------ search


def identity(term: str) -> int | uuid_lib.UUID | None:
    """An id ("42" or "#42") or a uuid (with or without dashes) in a search term."""
    term = term.strip()
    if term.lstrip("#").isdigit():
        return int(term.lstrip("#"))
    try:
        return uuid_lib.UUID(term)
    except ValueError:
        return None


def search_by_identity(term: str, pk: str = "pk", uuid: str = "uuid") -> Q | None:
    """A task/instance id or uuid, exactly (``pk``, ``uuid``: the fields to match)."""
    value = identity(term)
    if value is None:
        return None
    return Q(**{uuid if isinstance(value, uuid_lib.UUID) else pk: value})


def ids_matching(queryset: QuerySet, field: str, term: str, limit: int = MATCH_LIMIT) -> list[int] | None:
    """Ids of the rows of a small table whose ``field`` contains ``term``; None if more than ``limit``."""
    ids = list(
        queryset.filter(**{f"{field}__icontains": term}).order_by("pk").values_list("pk", flat=True)[: limit + 1]
    )
    return None if len(ids) > limit else ids


def users_matching(term: str) -> list[int] | None:
    """Ids of the users whose username contains ``term`` (the user table, not a join)."""
    return ids_matching(get_user_model().objects.all(), "username", term)


def related_match(column: str, ids: list[int] | None, fallback: Q) -> Q:
    """``column IN ids`` when the small table's matches were listed (integers written into
    the SQL, tasks.lookups), else ``fallback`` (a join)."""
    if ids is None:
        return fallback
    if not ids:
        return Q(pk__in=[])
    return Q(IntegerIn(F(column), ids))


# ------------------------------------------------------------------ counting and paging


class ResultCount(int):
    """A list's row count: exact, or a lower bound shown as "10000+".

    The admin's templates print ``cl.result_count`` (paginator, "N results" of a
    search, "Select all N"); an int with its own text keeps them all honest.
    """

    exact: bool = True

    def __new__(cls, value: int, *, exact: bool = True) -> ResultCount:
        count = super().__new__(cls, value)
        count.exact = exact
        return count

    def __str__(self) -> str:
        return str(int(self)) if self.exact else f"{int(self)}+"

    __repr__ = __str__


class KnownCountPaginator(Paginator):
    """A paginator that can be told the count instead of running COUNT(*)."""

    def __init__(self, *args, known_count: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.known_count = known_count

    @cached_property
    def count(self) -> int:
        return self.known_count if self.known_count is not None else super().count


def bounded_count(queryset: QuerySet, limit: int) -> ResultCount:
    """``SELECT COUNT(*) FROM (SELECT id ... LIMIT limit+1)``: reads at most limit+1 rows."""
    found = queryset.order_by().values("pk")[: limit + 1].count()
    return ResultCount(found) if found <= limit else ResultCount(limit, exact=False)


class Branches(NamedTuple):
    """A filtered list as a union of conditions, each one index read in the list's order
    (IndexedListMixin.index_branches). ``disjoint``: no row is in two of them, so their
    counts add up."""

    conditions: list[Q]
    disjoint: bool = True


class IndexedChangeList(ChangeList):
    """A changelist that reads ids first in index order, then the page's rows (module doc)."""

    def url_for_result(self, result) -> str:
        return change_url(self.opts, getattr(result, self.pk_attname))

    def get_ordering(self, request, queryset):
        """Django's ordering, each field once, ending with the primary key in the direction
        of the first key: ``created_at DESC, id DESC`` (or both ascending) is one index read.

        Django appends the default ordering after a clicked column's and a "-pk" whatever
        the direction; ``created_at ASC, id DESC`` would sort the whole table.
        """
        ordering = super().get_ordering(request, queryset)
        if not ordering or not all(isinstance(key, str) for key in ordering):
            return ordering
        pk_names = {"pk", self.lookup_opts.pk.attname}
        seen: set[str] = set()
        kept = []
        for key in ordering:
            name = key.lstrip("-")
            if name not in seen and name not in pk_names:
                seen.add(name)
                kept.append(key)
        direction = "-" if ordering[0].startswith("-") else ""
        return [*kept, f"{direction}pk"]

    def get_results(self, request):
        model_admin = self.model_admin
        per_page = self.list_per_page
        self.branches = self.index_branches(request)
        count = model_admin.exact_count(request, self)
        if count is None:
            # Enough to reach the requested page and a few beyond it.
            page = max(1, self.page_num)
            limit = min(max(model_admin.count_limit, (page + 5) * per_page), model_admin.count_ceiling)
            count = self.bounded_count(limit)
        elif not isinstance(count, ResultCount):
            count = ResultCount(count)
        paginator = KnownCountPaginator(self.queryset, per_page, known_count=int(count))
        can_show_all = count.exact and count <= self.list_max_show_all
        multi_page = count > per_page
        if (self.show_all and can_show_all) or not multi_page:
            start, stop = 0, max(per_page, self.list_max_show_all if self.show_all else per_page)
        else:
            if self.page_num < 1 or self.page_num > paginator.num_pages:
                raise IncorrectLookupParameters
            start = (self.page_num - 1) * per_page
            stop = start + per_page
        ids = self.page_ids(start, stop, count)
        rows = self.apply_select_related(self.root_queryset).filter(pk__in=ids).order_by().in_bulk()
        self.result_count = count
        self.show_full_result_count = False
        self.show_admin_actions = True
        self.full_result_count = None
        self.result_list = [rows[pk] for pk in ids if pk in rows]
        self.can_show_all = can_show_all
        self.multi_page = multi_page
        self.paginator = paginator

    def page_ids(self, start: int, stop: int, count: ResultCount) -> list[int]:
        """The ids of rows start..stop in the list's order.

        Past the middle of an exactly counted list, the page is read from the other
        end (the ordering reversed, the same index read the other way): the last page
        of a million tasks reads 50 index entries, not a million. A list the admin
        splits into branches (``index_branches``) is read branch by branch and merged.
        """
        ids = self.queryset.values_list("pk", flat=True)
        keys = self.ordering_keys()
        if self.branches is not None:
            return self.merged_ids(self.branches.conditions, keys, start, stop)
        if count.exact and start > count // 2 and keys:
            flipped = [k[1:] if k.startswith("-") else f"-{k}" for k in keys]
            found = list(ids.order_by(*flipped)[max(0, count - stop) : count - start])
            found.reverse()
            return found
        return list(ids[start:stop])

    def ordering_keys(self) -> list[str]:
        """The list's ordering as field names ("-created_at", "-pk"), or [] if it has expressions."""
        keys = list(dict.fromkeys(self.queryset.query.order_by))
        return keys if all(isinstance(k, str) for k in keys) else []

    def index_branches(self, request) -> Branches | None:
        """The admin's branches, when the list's order allows merging them (one direction)."""
        branches = self.model_admin.index_branches(request)
        keys = self.ordering_keys()
        if not branches or not keys or len({k.startswith("-") for k in keys}) > 1:
            return None
        return branches if len(branches.conditions) <= MAX_BRANCHES else None

    def bounded_count(self, limit: int) -> ResultCount:
        """A bounded count; over disjoint branches, the sum of theirs (each an index prefix:
        ``to_status = x`` alone has no index of its own, ``kind = k AND to_status = x`` has)."""
        if self.branches is None or not self.branches.disjoint:
            return bounded_count(self.queryset, limit)
        total = 0
        for condition in self.branches.conditions:
            total += bounded_count(self.queryset.filter(condition), limit - total)
            if total >= limit:
                return ResultCount(limit, exact=False)
        return ResultCount(total)

    def merged_ids(self, branches: list[Q], keys: list[str], start: int, stop: int) -> list[int]:
        """Rows start..stop of the union of ``branches``: the first ``stop`` of each, in the
        list's order (each one index read, no sort), merged here."""
        fields = [k.lstrip("-") for k in keys]  # the primary key last (get_ordering)
        streams = [self.queryset.filter(branch).values_list(*fields)[:stop] for branch in branches]
        descending = keys[0].startswith("-")
        merged = heapq.merge(*(list(stream) for stream in streams), reverse=descending)
        seen: set[int] = set()
        ids = []
        for row in merged:
            if row[-1] not in seen:  # a row in two branches (an owner's task on a matched instance)
                seen.add(row[-1])
                ids.append(row[-1])
            if len(ids) >= stop:
                break
        return ids[start:stop]


class IndexedListMixin:
    """ModelAdmin side of IndexedChangeList: lists at a million rows (module doc).

    ``ordering`` must be served by an index (with the primary key as the last key in
    the same direction); ``sortable_by`` should name only columns whose ordering is.
    """

    # Rows a bounded count reads (more show as "10000+"), or enough to reach five pages
    # past the requested one, but never more than count_ceiling: pages deeper than
    # that are the admin's "invalid parameters" page (narrow the filter instead).
    count_limit = 10_000
    count_ceiling = 200_000
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER

    def get_changelist(self, request, **kwargs):
        return IndexedChangeList

    def exact_count(self, request, changelist: ChangeList) -> int | None:
        """The list's exact count when it is known without scanning; None: a bounded count."""
        return None

    def index_branches(self, request) -> Branches | None:
        """Conditions whose union is the filtered list, each one index read in the list's
        order (``status = x`` for each status of ``status IN (...)``), or None.

        A filter on several values of an index's first column (``status IN``, ``owner
        IN``) or on a column followed by another in the index (provider, then status)
        would make the database sort every matching row; read branch by branch, each
        stops after a page.
        """
        return None


# ------------------------------------------------------------------ filters and columns


def moment_field(field: str, description: str):
    @admin.display(description=description, ordering=field)
    def show(self, obj) -> str:
        return exact_time(getattr(obj, field))

    return show


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
        return queryset.filter(status__in=sorted(group[1])) if group else queryset


def choices_filter(field: str, title: str, choices: list[tuple[str, str]]) -> type[admin.SimpleListFilter]:
    """A filter on ``field`` with fixed choices: no ``SELECT DISTINCT`` over the table to list them
    (what the stock filter of a field without choices does, at every page view)."""
    values = {value for value, _ in choices}

    class FixedChoices(admin.SimpleListFilter):
        parameter_name = field

        def lookups(self, request, model_admin):
            return choices

        def queryset(self, request, queryset):
            value = self.value()
            return queryset.filter(**{field: value}) if value in values else queryset

    FixedChoices.title = title
    FixedChoices.__name__ = FixedChoices.__qualname__ = f"{field.title().replace('_', '')}Filter"
    return FixedChoices


class ReachableFilter(admin.SimpleListFilter):
    """Providers held as unreachable (tasks.engine.health), their queue waiting for an answer."""

    title = _("reachability")
    parameter_name = "reachable"

    def lookups(self, request, model_admin):
        return [("no", _("Held unreachable")), ("yes", _("Reachable"))]

    def queryset(self, request, queryset):
        if self.value() == "no":
            return queryset.filter(unreachable_since__isnull=False)
        if self.value() == "yes":
            return queryset.filter(unreachable_since__isnull=True)
        return queryset
