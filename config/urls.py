from django.contrib import admin
from django.urls import include, path

from tasks.api.views import healthz, metrics_view

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include("tasks.api.urls")),
    path("healthz", healthz, name="healthz"),
    path("metrics", metrics_view, name="metrics"),
]

# JSON 404/500 under /api/ (Django's pages elsewhere).
handler404 = "tasks.api.errors.not_found"
handler500 = "tasks.api.errors.server_error"
