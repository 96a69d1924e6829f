"""The REST API (API.md): thin views over tasks.services.

Authorisation lives in get_queryset (users see their own rows; a row they may
not see is 404, never 403) and in the permission classes (admin endpoints need
staff with the console's permission of the action, tasks.api.permissions: 403
for anyone else, 401 for anonymous callers, as for every endpoint). Every state change goes through tasks.services, whose errors the
exception handler in tasks.api.errors turns into JSON with a stable code.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.db.models import Prefetch, QuerySet
from django.utils import timezone
from django.utils.translation import gettext as _
from django_filters.rest_framework import DjangoFilterBackend
from django_filters.utils import translate_validation
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, status, viewsets
from rest_framework.authtoken.models import Token
from rest_framework.authtoken.views import ObtainAuthToken
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, Throttled
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.permissions import IsAuthenticated
from rest_framework.response import Response

from tasks import services, stats, traffic_counters
from tasks.api import serializers as s
from tasks.api import throttle
from tasks.api.filters import MAX_ID, InstanceFilter, TaskFilter
from tasks.api.parsers import JSONParser, JSONRenderer
from tasks.api.permissions import IsStaff
from tasks.api.queueinfo import QueueInfo
from tasks.engine.states import PENDING, TaskType
from tasks.models import Instance, PortMapping, Provider, Task, TaskEvent, Webhook, WebhookDelivery

logger = logging.getLogger(__name__)

ID_PATTERN = r"[0-9]+"


def _error(description: str) -> OpenApiResponse:
    return OpenApiResponse(s.ErrorSerializer, description=description)


UNAUTHENTICATED = {401: _error("not authenticated (send `Authorization: Token <token>` or a session cookie)")}
FORBIDDEN = {
    403: _error("not allowed: admin endpoints need staff with the action's permission; or a session write without CSRF")
}
AUTH = {**UNAUTHENTICATED, **FORBIDDEN}
NOT_FOUND = {404: _error("no such object, or not one the caller may see")}
BAD_INPUT = {400: _error("invalid input: `field` names the offending parameter or body field")}
TOO_LARGE = {413: _error("request body larger than API_MAX_BODY_BYTES")}
WRITE_ERRORS = {**BAD_INPUT, 415: _error("unsupported media type: send application/json"), **TOO_LARGE}
LIST_ERRORS = {**BAD_INPUT, **AUTH, 404: _error("page past the last one")}
DETAIL_ERRORS = {**AUTH, **NOT_FOUND}


def _parse_id(value) -> int:
    """A path id the database can hold; anything else names nothing (404)."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise NotFound(_("no such object")) from None
    if not 1 <= number <= MAX_ID:
        raise NotFound(_("no such object"))
    return number


class APIViewSetMixin:
    """Shared by the user and admin families: ``admin`` selects the view of the data."""

    admin = False
    filter_backends = [DjangoFilterBackend]

    def get_permissions(self):
        return [IsStaff()] if self.admin else [IsAuthenticated()]

    def get_serializer_context(self):
        context = super().get_serializer_context()
        context.update(admin=self.admin, queue=QueueInfo(), now=timezone.now())
        return context

    def get_object(self):
        # A detail lookup ignores list filters (?status=.. on a detail URL changes nothing).
        obj = self.get_queryset().filter(pk=_parse_id(self.kwargs.get(self.lookup_field))).first()
        if obj is None:
            raise NotFound(_("no such object"))
        self.check_object_permissions(self.request, obj)
        return obj

    @property
    def object_id(self) -> int:
        return _parse_id(self.kwargs.get(self.lookup_field))


# --- tasks ------------------------------------------------------------------------------


class BaseTaskViewSet(APIViewSetMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    filterset_class = TaskFilter
    list_serializer = s.TaskSerializer
    detail_serializer = s.TaskDetailSerializer

    def get_queryset(self) -> QuerySet:
        if getattr(self, "swagger_fake_view", False):  # schema generation: no request user
            return Task.objects.none()
        qs = services.visible_tasks(self.request.user, admin=self.admin).select_related(
            "provider", "instance", "owner", "initiator"
        )
        if self.action == "list":
            return qs.defer("task_data")
        return qs.prefetch_related(Prefetch("events", queryset=TaskEvent.objects.order_by("at", "id")))

    def get_serializer_class(self):
        return self.list_serializer if self.action == "list" else self.detail_serializer

    def task_response(self, task: Task, code: int = status.HTTP_200_OK) -> Response:
        task = self.get_queryset().get(pk=task.pk)
        return Response(self.detail_serializer(task, context=self.get_serializer_context()).data, status=code)

    def list(self, request, *args, **kwargs):
        filterset = self.filterset_class(request.query_params, queryset=self.get_queryset(), request=request)
        if not filterset.is_valid():
            raise translate_validation(filterset.errors)
        # Late row lookup: page through ids on the task table alone (the filters and
        # the ordering are served by its indexes), then load the page's rows with their
        # joins. Paging the joined query lets MariaDB pick the join order itself, and
        # at a million rows it may start from auth_user and sort everything.
        ids_query = filterset.qs.values_list("id", flat=True)  # runs the filters (username: its owners)
        ids = self.paginate_queryset(ids_query, count=self._cheap_count(filterset))
        rows = {task.pk: task for task in self.get_queryset().filter(pk__in=ids)}
        page = [rows[pk] for pk in ids if pk in rows]
        context = self.get_serializer_context()
        # Queue figures for the pending rows of this page only, sharing per-provider parts.
        context["queue"].prefetch(t for t in page if t.status == PENDING)
        return self.get_paginated_response(self.list_serializer(page, many=True, context=context).data)

    def paginate_queryset(self, queryset, count: int | None = None):
        return self.paginator.paginate_queryset(queryset, self.request, view=self, count=count)

    def _cheap_count(self, filterset) -> int | None:
        """The admin list's count from the stats aggregate when only state, type or owner narrow it.

        COUNT(*) over most of a million rows takes 0.1 to 1 s on MariaDB, and
        over the tasks of the 1,000 users a username fragment matches 100 ms;
        the aggregate answers exactly in milliseconds. Owners combine with
        states (not types); any other filter (provider, instance, dates) is
        selective or needs the rows: plain COUNT.
        """
        if not self.admin:
            return None
        data = filterset.form.cleaned_data
        used = {name for name, value in data.items() if value not in (None, "", [])}
        if not used <= {"status", "task_type", "ordering", "user", "username"}:
            return None
        owners = None
        if "user" in used and "username" in used:
            return None
        if "user" in used:
            owners = [data["user"]]
        elif "username" in used:
            owners = filterset.username_owners
            if owners is None:  # a fragment matching too many users to list: the query joins instead
                return None
        return stats.count_tasks(
            statuses=data.get("status") or None, task_types=data.get("task_type") or None, owners=owners
        )


@extend_schema_view(
    list=extend_schema(
        summary="The caller's tasks",
        description="Newest first unless `ordering` says otherwise; `status` and `task_type` take comma lists.",
        responses={200: s.TaskSerializer(many=True), **LIST_ERRORS},
    ),
    retrieve=extend_schema(
        summary="One of the caller's tasks, with its timeline",
        responses={200: s.TaskDetailSerializer, **DETAIL_ERRORS},
    ),
)
class TaskViewSet(BaseTaskViewSet):
    """The caller's own tasks."""

    @extend_schema(
        summary="Cancel a task",
        description="A pending task ends cancelled at once; a running one goes to cancelling and its worker "
        "stops at the next safe point. 409 `not_cancellable` once terminal, or for a running delete.",
        request=s.CancelSerializer,
        responses={
            200: s.TaskDetailSerializer,
            **WRITE_ERRORS,
            **DETAIL_ERRORS,
            409: _error("not_cancellable: terminal, or not cancellable by users"),
        },
    )
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        body = s.CancelSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        task = services.cancel_task(request.user, self.object_id, reason=body.validated_data["reason"])
        return self.task_response(task)

    @extend_schema(
        summary="Retry a task",
        description="A failed, timed-out or cancelled task is asked again: a new task of the same type on the "
        "same instance with the same parameters, its `retry_of` naming this one. 409 `not_retryable` for a "
        "completed or still active task or one whose instance is gone; `instance_busy` or `invalid_state` as "
        "for a new request.",
        request=None,
        responses={
            202: s.TaskAcceptedSerializer,
            **DETAIL_ERRORS,
            409: _error("not_retryable (with `status`), instance_busy (with `active_task`) or invalid_state"),
        },
    )
    @action(detail=True, methods=["post"])
    def retry(self, request, pk=None):
        task = services.retry_task(request.user, self.object_id, admin=self.admin)
        task = self.get_queryset().get(pk=task.pk)
        return Response(
            {"task": self.list_serializer(task, context=self.get_serializer_context()).data},
            status=status.HTTP_202_ACCEPTED,
        )

    @extend_schema(
        summary="Read the new password once",
        description="The password a completed create or reset-password task produced, to its owner, once. "
        "410 once read, expired, or when the task produced none; 409 while the task has not finished.",
        responses={
            200: s.PasswordSerializer,
            **DETAIL_ERRORS,
            409: _error("invalid_state: the task has not finished yet"),
            410: _error("gone: already read, expired, or never produced"),
        },
    )
    @action(detail=True, methods=["get"])
    def password(self, request, pk=None):
        password = services.read_password_once(request.user, self.object_id)
        response = Response({"password": password})
        response["Cache-Control"] = "no-store"
        return response


# --- instances ----------------------------------------------------------------------------


def _operation(task_type: str):
    """A POST action that queues ``task_type`` on the instance."""

    def handler(self, request, pk=None):
        body = s.OperationSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        task = services.request_operation(
            request.user,
            self.object_id,
            task_type,
            admin=self.admin,
            timeout_seconds=body.validated_data.get("timeout_seconds"),
        )
        return self.accepted(task)

    handler.__name__ = task_type.replace("-", "_")
    handler = action(detail=True, methods=["post"], url_path=task_type, url_name=task_type)(handler)
    return extend_schema(
        summary=f"Queue {task_type}",
        request=s.OperationSerializer,
        responses={
            202: s.TaskAcceptedSerializer,
            **WRITE_ERRORS,
            **DETAIL_ERRORS,
            409: _error("instance_busy (with `active_task`) or invalid_state (with `status`)"),
        },
    )(handler)


class BaseInstanceViewSet(APIViewSetMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    filterset_class = InstanceFilter
    serializer_class = s.InstanceSerializer

    def get_queryset(self) -> QuerySet:
        if getattr(self, "swagger_fake_view", False):
            return Instance.objects.none()
        live_ports = PortMapping.objects.exclude(status=PortMapping.STATUS_DELETED).order_by("host_port_start", "id")
        return (
            services.visible_instances(self.request.user, admin=self.admin)
            .select_related("provider", "owner")
            .prefetch_related(
                Prefetch("port_mappings", queryset=live_ports, to_attr="live_ports"),
                Prefetch("traffic", queryset=traffic_counters.this_month(), to_attr="traffic_this_month"),
            )
        )

    def accepted(self, task: Task, **extra) -> Response:
        task = Task.objects.select_related("provider", "instance", "owner", "initiator").get(pk=task.pk)
        context = self.get_serializer_context()
        return Response(
            {"task": s.TaskSerializer(task, context=context).data, **extra}, status=status.HTTP_202_ACCEPTED
        )

    @extend_schema(
        summary="Queue the delete of an instance",
        request=s.OperationSerializer,
        responses={
            202: s.TaskAcceptedSerializer,
            **WRITE_ERRORS,
            **DETAIL_ERRORS,
            409: _error("instance_busy (with `active_task`) or invalid_state (with `status`)"),
        },
    )
    def destroy(self, request, pk=None):
        body = s.OperationSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        task = services.request_operation(
            request.user,
            self.object_id,
            TaskType.DELETE,
            admin=self.admin,
            timeout_seconds=body.validated_data.get("timeout_seconds"),
        )
        return self.accepted(task)

    start = _operation(TaskType.START)
    stop = _operation(TaskType.STOP)
    restart = _operation(TaskType.RESTART)
    reset = _operation(TaskType.RESET)
    reset_password = _operation(TaskType.RESET_PASSWORD)

    @extend_schema(
        methods=["GET"],
        summary="The instance's port mappings",
        responses={200: s.PortMappingSerializer(many=True), **LIST_ERRORS, **NOT_FOUND},
        filters=False,
    )
    @extend_schema(
        methods=["POST"],
        summary="Queue a new port mapping",
        description="`host_port` absent: the first free run of `count` ports in the provider's range.",
        request=s.PortCreateSerializer,
        responses={
            202: s.PortAcceptedSerializer,
            **WRITE_ERRORS,
            **DETAIL_ERRORS,
            409: _error("port_conflict, instance_busy (with `active_task`) or invalid_state"),
        },
    )
    @action(detail=True, methods=["get", "post"], url_path="ports", filterset_class=None)
    def ports(self, request, pk=None):
        if request.method == "GET":
            instance = self.get_object()
            mappings = PortMapping.objects.filter(instance=instance).exclude(status=PortMapping.STATUS_DELETED)
            page = self.paginate_queryset(mappings.order_by("host_port_start", "id"))
            return self.get_paginated_response(s.PortMappingSerializer(page, many=True).data)
        body = s.PortCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        task, mapping = services.create_port(
            request.user,
            self.object_id,
            protocol=data["protocol"],
            guest_port=data["guest_port"],
            host_port=data.get("host_port"),
            count=data["count"],
            description=data["description"],
            admin=self.admin,
            timeout_seconds=data.get("timeout_seconds"),
        )
        return self.accepted(task, port=s.PortMappingSerializer(mapping).data)

    @extend_schema(
        summary="Queue the removal of a port mapping",
        request=s.OperationSerializer,
        parameters=[OpenApiParameter("port_id", OpenApiTypes.INT, OpenApiParameter.PATH)],
        responses={
            202: s.TaskAcceptedSerializer,
            **WRITE_ERRORS,
            **DETAIL_ERRORS,
            409: _error("instance_busy (with `active_task`) or invalid_state"),
        },
    )
    @action(detail=True, methods=["delete"], url_path=rf"ports/(?P<port_id>{ID_PATTERN})", url_name="port")
    def delete_port(self, request, pk=None, port_id=None):
        body = s.OperationSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        task = services.delete_port(
            request.user,
            self.object_id,
            _parse_id(port_id),
            admin=self.admin,
            timeout_seconds=body.validated_data.get("timeout_seconds"),
        )
        return self.accepted(task)


@extend_schema_view(
    list=extend_schema(
        summary="The caller's instances",
        description="Deleted instances are left out unless `status` names them.",
        responses={200: s.InstanceSerializer(many=True), **LIST_ERRORS},
    ),
    retrieve=extend_schema(
        summary="One of the caller's instances", responses={200: s.InstanceSerializer, **DETAIL_ERRORS}
    ),
)
class InstanceViewSet(BaseInstanceViewSet):
    """The caller's instances and their operations."""

    @extend_schema(
        summary="Create an instance",
        description="Reserves quota, provider capacity and the default port block, and queues the create task.",
        request=s.InstanceCreateSerializer,
        responses={
            202: s.InstanceAcceptedSerializer,
            **WRITE_ERRORS,
            **AUTH,
            409: _error("quota_exceeded, capacity_exceeded, name_taken or provider_disabled"),
        },
    )
    def create(self, request):
        body = s.InstanceCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = dict(body.validated_data)
        instance, task = services.create_instance(
            request.user,
            provider=data.pop("provider"),
            name=data.pop("name", None) or None,
            initiator=request.user,
            **data,
        )
        instance = self.get_queryset().get(pk=instance.pk)
        return self.accepted(task, instance=self.get_serializer(instance).data)


# --- providers and workers ---------------------------------------------------------------


@extend_schema_view(
    list=extend_schema(summary="Enabled providers", responses={200: s.ProviderSerializer(many=True), **LIST_ERRORS}),
    retrieve=extend_schema(summary="One enabled provider", responses={200: s.ProviderSerializer, **DETAIL_ERRORS}),
)
class ProviderViewSet(APIViewSetMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Providers a user may create instances on."""

    serializer_class = s.ProviderSerializer
    filterset_class = None
    filter_backends: list = []

    def get_queryset(self) -> QuerySet:
        return Provider.objects.filter(enabled=True).order_by("name", "id")


class TokenView(ObtainAuthToken):
    """POST /api/v1/auth/token/ (DRF's view, throttled; its errors in the API's JSON shape);
    DELETE revokes the caller's token."""

    parser_classes = (JSONParser, FormParser, MultiPartParser)
    renderer_classes = (JSONRenderer,)

    def get_permissions(self):
        return [IsAuthenticated()] if self.request.method == "DELETE" else []

    @extend_schema(
        summary="Get an API token",
        description="`{username, password}` -> `{token}`; send it as `Authorization: Token <token>`. After "
        f"{settings.LOGIN_THROTTLE_ATTEMPTS} failed attempts for one username or from one client address within "
        f"{settings.LOGIN_THROTTLE_WINDOW_SECONDS} s: 429 with `Retry-After`, before any password is checked.",
        request=s.TokenRequestSerializer,
        responses={200: s.TokenSerializer, **WRITE_ERRORS, **TOO_LARGE, 429: _error("throttled: see Retry-After")},
        auth=[],
    )
    def post(self, request, *args, **kwargs):
        username = request.data.get("username") if hasattr(request.data, "get") else None
        attempt = throttle.Attempt(username, throttle.client_address(request))
        wait = attempt.begin()
        if wait is not None:
            # Refused before the hash: a flood of wrong passwords costs no CPU.
            if attempt.first_refusal:
                logger.warning(
                    "login throttled until the window ends: %s, username %s",
                    throttle.client_address(request),
                    ascii(username)[:80],
                )
            raise Throttled(wait=wait, detail=_("too many failed login attempts"))
        response = super().post(request, *args, **kwargs)  # 400 on wrong credentials: the attempt stays counted
        attempt.succeeded()
        return response

    @extend_schema(
        summary="Revoke the caller's token",
        description="Deletes the token of the calling user (every client using it is logged out); "
        "a new POST issues a fresh one.",
        request=None,
        responses={204: None, **UNAUTHENTICATED},
    )
    def delete(self, request, *args, **kwargs):
        deleted, _ = Token.objects.filter(user=request.user).delete()
        logger.info("user %s revoked their API token (%s)", request.user.pk, "deleted" if deleted else "none held")
        return Response(status=status.HTTP_204_NO_CONTENT)


# --- webhooks ------------------------------------------------------------------------------


@extend_schema_view(
    list=extend_schema(summary="The caller's webhooks", responses={200: s.WebhookSerializer(many=True), **LIST_ERRORS}),
    retrieve=extend_schema(
        summary="One of the caller's webhooks", responses={200: s.WebhookSerializer, **DETAIL_ERRORS}
    ),
    create=extend_schema(
        summary="Add a webhook",
        description='Each delivery POSTs `{"event", "task"}` with `X-Webhook-Signature: sha256=<hex HMAC-SHA256 '
        "of the body with the secret>`, `X-Webhook-Event` and `X-Webhook-Delivery` (the same on a retry). "
        "Failed deliveries are retried with backoff for a day. URLs whose host is or resolves to a loopback, "
        "private or link-local address are refused (unless the server allows them).",
        request=s.WebhookSerializer,
        responses={
            201: s.WebhookSerializer,
            **WRITE_ERRORS,
            **AUTH,
            409: _error("quota_exceeded: the caller has WEBHOOKS_PER_USER webhooks already"),
        },
    ),
    destroy=extend_schema(summary="Remove a webhook", responses={204: None, **DETAIL_ERRORS}),
)
class WebhookViewSet(
    APIViewSetMixin,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    """The caller's webhooks."""

    serializer_class = s.WebhookSerializer
    filterset_class = None
    filter_backends: list = []

    def get_queryset(self) -> QuerySet:
        if getattr(self, "swagger_fake_view", False):
            return Webhook.objects.none()
        return Webhook.objects.filter(owner=self.request.user).order_by("id")

    def perform_create(self, serializer):
        from django.conf import settings

        from tasks import webhooks
        from tasks.errors import QuotaExceeded

        data = serializer.validated_data
        url = webhooks.validate_url(data["url"])
        events = webhooks.validate_events(data.get("events"))
        if Webhook.objects.filter(owner=self.request.user).count() >= settings.WEBHOOKS_PER_USER:
            raise QuotaExceeded(f"at most {settings.WEBHOOKS_PER_USER} webhooks per user", field="webhooks")
        hook = Webhook(owner=self.request.user, url=url, events=events)
        hook.secret = data["secret"]
        hook.save()
        serializer.instance = hook

    @extend_schema(
        summary="Recent deliveries of a webhook",
        description="Newest first: each event sent (or being retried) with its attempts and last answer.",
        responses={200: s.WebhookDeliverySerializer(many=True), **LIST_ERRORS, **NOT_FOUND},
    )
    @action(detail=True, methods=["get"])
    def deliveries(self, request, pk=None):
        hook = self.get_object()
        rows = WebhookDelivery.objects.filter(webhook=hook).order_by("-created_at", "-id")
        page = self.paginate_queryset(rows)
        return self.get_paginated_response(s.WebhookDeliverySerializer(page, many=True).data)
