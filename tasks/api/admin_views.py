"""The operators' endpoints under /api/v1/admin/ (API.md): staff with the console's
permission of each action (tasks.api.permissions; 403 for others).

Same shapes as the user endpoints (tasks.api.views), with every row visible,
task data (redacted), lease details, force-stop, statistics, provider limits
and live workers.
"""

from __future__ import annotations

import logging

from django.db import transaction
from django.db.models import Count, IntegerField, OuterRef, QuerySet, Subquery, Value
from django.db.models.functions import Coalesce
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import mixins, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from tasks import services, stats
from tasks.api import serializers as s
from tasks.api.filters import AdminInstanceFilter, AdminTaskFilter, ProviderFilter
from tasks.api.views import (
    AUTH,
    DETAIL_ERRORS,
    LIST_ERRORS,
    WRITE_ERRORS,
    APIViewSetMixin,
    BaseInstanceViewSet,
    BaseTaskViewSet,
    TaskViewSet,
    _error,
)
from tasks.engine import dispatch
from tasks.engine.states import EXECUTING, PENDING
from tasks.models import Instance, Provider, Task, Worker

logger = logging.getLogger(__name__)


@extend_schema_view(
    list=extend_schema(
        summary="All tasks (staff)",
        description="Filters of the user list plus `user`, `username` (substring) and `instance_type`.",
        responses={200: s.AdminTaskSerializer(many=True), **LIST_ERRORS},
    ),
    retrieve=extend_schema(
        summary="One task with its timeline, lease and task data (secrets redacted)",
        responses={200: s.AdminTaskDetailSerializer, **DETAIL_ERRORS},
    ),
)
class AdminTaskViewSet(BaseTaskViewSet):
    """Every task, for operators."""

    admin = True
    permission_model = Task
    required_permissions = {  # API.md: the console's permissions
        "cancel": "tasks.change_task",
        "force_stop": "tasks.force_stop_task",  # tasks.admin.permissions
        "stats": "tasks.view_task",
    }
    filterset_class = AdminTaskFilter
    list_serializer = s.AdminTaskSerializer
    detail_serializer = s.AdminTaskDetailSerializer

    @extend_schema(
        summary="Cancel any task",
        description="Like the user cancel; `reason` is required for another user's task and is recorded.",
        request=s.CancelSerializer,
        responses={
            200: s.AdminTaskDetailSerializer,
            **WRITE_ERRORS,
            **DETAIL_ERRORS,
            409: _error("not_cancellable: terminal or already cancelling"),
        },
    )
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        body = s.CancelSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        task = services.cancel_task(request.user, self.object_id, admin=True, reason=body.validated_data["reason"])
        return self.task_response(task)

    @extend_schema(
        summary="Force-stop a task",
        description="Ends any non-terminal task at once as cancelled (error code force_stopped), revokes its "
        "lease, frees its slot and marks the instance for reconciliation. Audited with the reason.",
        request=s.ReasonSerializer,
        responses={
            200: s.AdminTaskDetailSerializer,
            **WRITE_ERRORS,
            **DETAIL_ERRORS,
            409: _error("not_cancellable: already terminal"),
        },
    )
    @action(detail=True, methods=["post"], url_path="force-stop")
    def force_stop(self, request, pk=None):
        body = s.ReasonSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        task = services.force_stop_task(request.user, self.object_id, reason=body.validated_data["reason"])
        return self.task_response(task)

    @extend_schema(
        summary="Retry any task",
        description="As the user retry, for any user's task; the new task's initiator is the operator.",
        request=None,
        responses={
            202: s.TaskAcceptedSerializer,
            **DETAIL_ERRORS,
            409: _error("not_retryable (with `status`), instance_busy (with `active_task`) or invalid_state"),
        },
    )
    @action(detail=True, methods=["post"])
    def retry(self, request, pk=None):
        return TaskViewSet.retry(self, request, pk)

    @extend_schema(
        summary="Task statistics",
        description="Counts by state, type and provider, durations, error rates, queue length and worker "
        "utilisation; see docs/api.md for the exact definitions.",
        responses={200: s.StatsSerializer, **AUTH},
        filters=False,
    )
    @action(detail=False, methods=["get"], pagination_class=None, filterset_class=None)
    def stats(self, request):
        return Response(s.StatsSerializer(stats.task_stats()).data)


@extend_schema_view(
    list=extend_schema(
        summary="All instances (staff)",
        description="Deleted instances are left out unless `status` names them.",
        responses={200: s.AdminInstanceSerializer(many=True), **LIST_ERRORS},
    ),
    retrieve=extend_schema(summary="Any instance", responses={200: s.AdminInstanceSerializer, **DETAIL_ERRORS}),
)
class AdminInstanceViewSet(BaseInstanceViewSet):
    """Any instance, for operators: the same actions as users have."""

    admin = True
    permission_model = Instance  # view_instance to read; change_instance for every action
    filterset_class = AdminInstanceFilter
    serializer_class = s.AdminInstanceSerializer


def _slot_count(statuses) -> Coalesce:
    counts = (
        Task.objects.filter(provider=OuterRef("pk"), status__in=statuses)
        .order_by()
        .values("provider")
        .annotate(n=Count("id"))
        .values("n")
    )
    return Coalesce(Subquery(counts, output_field=IntegerField()), Value(0))


@extend_schema_view(
    list=extend_schema(
        summary="Providers (staff)", responses={200: s.AdminProviderSerializer(many=True), **LIST_ERRORS}
    ),
    retrieve=extend_schema(summary="One provider", responses={200: s.AdminProviderSerializer, **DETAIL_ERRORS}),
    partial_update=extend_schema(
        summary="Change a provider's limits",
        description="Only allow_concurrent_tasks, max_concurrent_tasks (1-256), task_poll_interval (1-3600 s), "
        "enable_task_polling and enabled. Takes effect at the next admission, which this request triggers: "
        "a raised limit or a re-enabled provider admits waiting tasks at once. Running tasks are untouched.",
        request=s.ProviderPatchSerializer,
        responses={200: s.AdminProviderSerializer, **WRITE_ERRORS, **DETAIL_ERRORS},
    ),
)
class AdminProviderViewSet(APIViewSetMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    admin = True
    permission_model = Provider  # view_provider to read, change_provider to PATCH
    serializer_class = s.AdminProviderSerializer
    filterset_class = ProviderFilter
    http_method_names = ["get", "patch", "head", "options"]

    def get_queryset(self) -> QuerySet:
        return Provider.objects.annotate(running=_slot_count(EXECUTING), pending=_slot_count([PENDING]))

    def partial_update(self, request, pk=None):
        provider = self.get_object()
        body = s.AdminProviderSerializer(provider, data=request.data, partial=True)
        body.is_valid(raise_exception=True)
        changes = dict(body.validated_data)
        if changes:
            with transaction.atomic():
                locked = Provider.objects.select_for_update().get(pk=provider.pk)
                for name, value in changes.items():
                    setattr(locked, name, value)
                locked.save(update_fields=[*changes, "updated_at"])
                provider_id = locked.pk
                transaction.on_commit(lambda: dispatch.admit_soon(provider_id))
            logger.info("provider %s: %s set by %s", provider.pk, changes, request.user.get_username())
        return Response(self.get_serializer(self.get_object()).data)


@extend_schema_view(
    list=extend_schema(
        summary="Live workers (staff)",
        description="Worker processes whose heartbeat is recent (3 heartbeat periods + 10 s).",
        responses={200: s.WorkerSerializer(many=True), **LIST_ERRORS},
        filters=False,
    ),
)
class AdminWorkerViewSet(APIViewSetMixin, mixins.ListModelMixin, viewsets.GenericViewSet):
    admin = True
    permission_model = Worker
    serializer_class = s.WorkerSerializer
    filterset_class = None
    filter_backends: list = []

    def get_queryset(self) -> QuerySet:
        return Worker.objects.filter(last_heartbeat__gte=stats.live_worker_cutoff()).order_by("queue", "name", "id")
