import gc
import os

from django.core.wsgi import get_wsgi_application
from django.urls import get_resolver

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
application = get_wsgi_application()

# Import the URLconf now (and with it DRF, the views and serializers) instead of
# at the first request, then take every object that exists so far out of the
# cyclic garbage collector's reach: modules, classes and functions live as long
# as the process. Otherwise a full collection walks them all, 25-45 ms on a
# small VM, inside one request in ten to twenty of the busy API lists (seen in
# bench/api_scale). Objects created later are collected as usual.
get_resolver().url_patterns  # noqa: B018 (the property loads the URLconf)
gc.collect()
gc.freeze()
