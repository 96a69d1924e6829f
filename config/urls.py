from django.contrib import admin
from django.contrib.staticfiles.views import serve as serve_static
from django.urls import include, path, re_path

from tasks.api.ops import healthz, metrics_view

urlpatterns = [
    path("admin/", admin.site.urls),
    path("i18n/", include("django.conf.urls.i18n")),  # set_language: the admin's language switch
    path("api/v1/", include("tasks.api.urls")),
    path("healthz", healthz, name="healthz"),
    path("metrics", metrics_view, name="metrics"),
    # Static files (admin styles, the API docs' Swagger UI and Redoc) from the apps'
    # directories: the panel runs under gunicorn with no separate web server in front.
    re_path(r"^static/(?P<path>.*)$", serve_static, {"insecure": True}),
]

# JSON 400/403/404/500 under /api/ (Django's pages elsewhere).
handler400 = "tasks.api.errors.bad_request"
handler403 = "tasks.api.errors.permission_denied"
handler404 = "tasks.api.errors.not_found"
handler500 = "tasks.api.errors.server_error"
