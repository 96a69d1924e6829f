"""/api/v1/ routes (API.md)."""

from __future__ import annotations

from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView
from rest_framework.routers import DefaultRouter

from tasks.api import admin_views, live_views, views

router = DefaultRouter()
router.register("tasks", views.TaskViewSet, basename="task")
router.register("instances", views.InstanceViewSet, basename="instance")
router.register("providers", views.ProviderViewSet, basename="provider")
router.register("webhooks", views.WebhookViewSet, basename="webhook")
router.register("admin/tasks", admin_views.AdminTaskViewSet, basename="admin-task")
router.register("admin/instances", admin_views.AdminInstanceViewSet, basename="admin-instance")
router.register("admin/providers", admin_views.AdminProviderViewSet, basename="admin-provider")
router.register("admin/workers", admin_views.AdminWorkerViewSet, basename="admin-worker")

urlpatterns = [
    path("auth/token/", views.TokenView.as_view(), name="api-token"),
    path("schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    path("redoc/", SpectacularRedocView.as_view(url_name="api-schema"), name="api-redoc"),
    # Async views (served by the ASGI server; config/asgi.py routes them): before the
    # router, whose tasks/{pk}/ would take "stream" for an id.
    path("tasks/stream/", live_views.stream, name="task-stream"),
    re_path(r"^tasks/(?P<pk>[0-9]+)/wait/$", live_views.wait, name="task-wait"),
    path("", include(router.urls)),
]
