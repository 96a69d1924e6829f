"""One env-driven settings module.

With no environment the system runs on SQLite in ./var with the ORM broker; every
knob below has an environment variable (README, "Configuration"). Bad values fail
at start with ImproperlyConfigured naming the variable.
"""

from __future__ import annotations

import math
import os
import secrets
import sys
import zoneinfo
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured
from django.utils.translation import gettext_lazy

from config.env import (
    env_bool,
    env_choice,
    env_float,
    env_header,
    env_int,
    env_list,
    env_str,
    parse_database_url,
    private_file,
    sqlite_database,
)

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("VAR_DIR", str(BASE_DIR / "var")))
VAR_DIR.mkdir(parents=True, exist_ok=True)


def _secret_key() -> str:
    key = env_str("DJANGO_SECRET_KEY")
    if key:
        if len(key) < 32:
            raise ImproperlyConfigured("DJANGO_SECRET_KEY must be at least 32 characters")
        return key
    # Out of the box: one generated key shared by every process of this checkout
    # (web, supervisor and django-q2 workers must agree: jobs are signed with it).
    path = VAR_DIR / "secret_key"
    if not path.exists():
        # Readable by its owner only (0600), whatever the umask; written whole, then renamed.
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            os.fchmod(out.fileno(), 0o600)
            out.write(secrets.token_urlsafe(50))
        os.replace(tmp, path)
    return path.read_text().strip()


SECRET_KEY = _secret_key()
DEBUG = env_bool("DJANGO_DEBUG", False)
# --- HTTPS --------------------------------------------------------------------------
# Behind a TLS-terminating proxy: DJANGO_SECURE_PROXY_SSL_HEADER=HTTP_X_FORWARDED_PROTO=https
# (only if the proxy always sets or strips that header). DJANGO_HTTPS=1 turns on secure
# cookies, the redirect to https and HSTS for a year; each has its own variable too.
_HTTPS = env_bool("DJANGO_HTTPS", False)
SECURE_PROXY_SSL_HEADER = env_header("DJANGO_SECURE_PROXY_SSL_HEADER")
SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", _HTTPS)
# Probes and scrapers inside the network may speak plain http.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^metrics$"]
SESSION_COOKIE_SECURE = env_bool("DJANGO_SESSION_COOKIE_SECURE", _HTTPS)
CSRF_COOKIE_SECURE = env_bool("DJANGO_CSRF_COOKIE_SECURE", _HTTPS)
SECURE_HSTS_SECONDS = env_int("DJANGO_SECURE_HSTS_SECONDS", 31536000 if _HTTPS else 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("DJANGO_SECURE_HSTS_PRELOAD", False)

ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1],testserver")
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS")

# Key for secrets at rest (instance passwords, provider tokens). Any string; it is
# stretched into a Fernet key. Defaults to SECRET_KEY so a demo works out of the box;
# production sets its own and keeps it when rotating SECRET_KEY.
SECRETS_KEY = env_str("SECRETS_KEY") or SECRET_KEY

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI and Redoc served locally (no CDN)
    "django_q",
    "tasks",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "tasks.api.middleware.APIRequestLimitMiddleware",  # 413 under /api/ before the body is read
    "tasks.api.throttle.AdminLoginThrottleMiddleware",  # the console's login, throttled as the API's
    "django.contrib.sessions.middleware.SessionMiddleware",
    # The language of human texts: the admin's language switch (cookie), else
    # Accept-Language, else LANGUAGE_CODE (API and admin alike).
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "tasks.admin.localtime.ConsoleTimeZoneMiddleware",  # CONSOLE_TIME_ZONE under /admin/
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- database -------------------------------------------------------------------
_database_url = env_str("DATABASE_URL")
if _database_url:
    DATABASES = {"default": parse_database_url(_database_url, BASE_DIR)}
else:
    DATABASES = {"default": sqlite_database(str(VAR_DIR / "db.sqlite3"))}
IS_MYSQL = DATABASES["default"]["ENGINE"].endswith("mysql")
if not IS_MYSQL and str(DATABASES["default"]["NAME"]) != ":memory:":
    # The SQLite file holds every secret at rest: created readable by its owner only.
    Path(DATABASES["default"]["NAME"]).parent.mkdir(parents=True, exist_ok=True)
    private_file(DATABASES["default"]["NAME"])

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

# Human texts in English and Simplified Chinese (README "Languages"); codes and
# field names never change. LANGUAGE_CODE is the default when a request asks
# for neither; management commands and workers always write English.
LANGUAGES = [("en", "English"), ("zh-hans", "简体中文")]
LANGUAGE_CODE = env_choice("LANGUAGE_CODE", "en", tuple(code for code, _name in LANGUAGES))
LOCALE_PATHS = [BASE_DIR / "locale"]
TIME_ZONE = "UTC"
# Everything is stored and computed in UTC; the console shows times in this zone (an
# IANA name, e.g. Asia/Shanghai), with the UTC time on hover (tasks.admin.localtime).
CONSOLE_TIME_ZONE = env_str("CONSOLE_TIME_ZONE", "UTC").strip() or "UTC"
try:
    zoneinfo.ZoneInfo(CONSOLE_TIME_ZONE)
except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
    raise ImproperlyConfigured(f"CONSOLE_TIME_ZONE={CONSOLE_TIME_ZONE!r} is not a known time zone") from exc
# One date format across the console, whatever the language (config/formats).
FORMAT_MODULE_PATH = ["config.formats"]
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"

LOGIN_URL = "/admin/login/"

# --- REST framework ---------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_FILTER_BACKENDS": [
        "django_filters.rest_framework.DjangoFilterBackend",
        "rest_framework.filters.OrderingFilter",
    ],
    "DEFAULT_PAGINATION_CLASS": "tasks.api.pagination.PageNumberPagination",
    "PAGE_SIZE": 20,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "tasks.api.errors.exception_handler",
    # Lone surrogates are refused (400) and never crash the renderer (tasks/api/parsers.py).
    "DEFAULT_PARSER_CLASSES": [
        "tasks.api.parsers.JSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_RENDERER_CLASSES": ["tasks.api.parsers.JSONRenderer", "rest_framework.renderers.BrowsableAPIRenderer"],
    # Proxies in front of the panel whose X-Forwarded-For is trusted for the client
    # address (login throttle); 0: REMOTE_ADDR, a client cannot pick its address.
    "NUM_PROXIES": env_int("DJANGO_NUM_PROXIES", 0, minimum=0),
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Cloud-host task system API",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "ENUM_NAME_OVERRIDES": {
        "TaskStatusEnum": "tasks.engine.states.TaskStatus",
        "InstanceStatusEnum": "tasks.engine.states.InstanceStatus",
        "PortMappingStatusEnum": "tasks.models.PortMapping.STATUS_CHOICES",
    },
    "COMPONENT_SPLIT_REQUEST": True,
}

# Largest request body the API accepts (413 above it, before it is read).
API_MAX_BODY_BYTES = env_int("API_MAX_BODY_BYTES", 1024 * 1024, minimum=1024)

# Bearer token /metrics requires (empty: open, e.g. behind a private network).
METRICS_TOKEN = env_str("METRICS_TOKEN")

# --- task system ------------------------------------------------------------------
# Lease: a running task's worker renews it every TASK_HEARTBEAT_SECONDS; recovery
# acts only once it is TASK_LEASE_SECONDS old. Worst-case detection of a dead
# worker: TASK_LEASE_SECONDS + TASK_SWEEP_SECONDS.
TASK_LEASE_SECONDS = env_float("TASK_LEASE_SECONDS", 15.0, minimum=1.0)
TASK_HEARTBEAT_SECONDS = env_float("TASK_HEARTBEAT_SECONDS", 3.0, minimum=0.1)
TASK_CANCEL_POLL_SECONDS = env_float("TASK_CANCEL_POLL_SECONDS", 0.5, minimum=0.05, maximum=5.0)
TASK_DISPATCH_TIMEOUT_SECONDS = env_float("TASK_DISPATCH_TIMEOUT_SECONDS", 10.0, minimum=1.0)
TASK_HARD_KILL_GRACE_SECONDS = env_int("TASK_HARD_KILL_GRACE_SECONDS", 10, minimum=1)
# A job may go on with the tasks its own finish admitted on the same provider
# (hand-over, no broker round trip) for this long after it started.
TASK_HANDOFF_SECONDS = env_int("TASK_HANDOFF_SECONDS", 30, minimum=0)
TASK_SWEEP_SECONDS = env_float("TASK_SWEEP_SECONDS", 1.0, minimum=0.1)
# A provider held as unreachable (tasks.engine.health) is probed this often by the worker tier.
PROVIDER_PROBE_SECONDS = env_float("PROVIDER_PROBE_SECONDS", 15.0, minimum=1.0)
# The console's health strip and "stuck" filter: a running task is stuck when it has run
# STUCK_P95_FACTOR times its type's p95, or has reported no step for this many minutes.
STUCK_NO_PROGRESS_MINUTES = env_int("STUCK_NO_PROGRESS_MINUTES", 10, minimum=1)
STUCK_P95_FACTOR = env_float("STUCK_P95_FACTOR", 3.0, minimum=1.0)
# A host port the host refused to bind ("address already in use": something outside the
# panel holds it) is skipped by automatic allocation for this long; a create that hit one
# retries on another block, at most TASK_CREATE_PORT_ATTEMPTS blocks in all.
HOST_PORT_BUSY_SECONDS = env_int("HOST_PORT_BUSY_SECONDS", 3600, minimum=0)
TASK_CREATE_PORT_ATTEMPTS = env_int("TASK_CREATE_PORT_ATTEMPTS", 3, minimum=1, maximum=10)
# django-q2's own admin pages (schedules, successes, failures, queued jobs) are hidden
# from the console unless this is set: the task list is where operators look.
SHOW_DJANGO_Q_ADMIN = env_bool("SHOW_DJANGO_Q_ADMIN", False)
# Retention (tasks.purge.retention_job, a django-q2 schedule): finished tasks older
# than this many days are purged in short batches; 0 keeps everything.
TASK_RETENTION_DAYS = env_int("TASK_RETENTION_DAYS", 90, minimum=0)
TASK_RETENTION_EVERY_MINUTES = env_int("TASK_RETENTION_EVERY_MINUTES", 10, minimum=1, maximum=1440)
TASK_RETENTION_BATCH_SIZE = env_int("TASK_RETENTION_BATCH_SIZE", 1000, minimum=1, maximum=100000)
TASK_RETENTION_MAX_SECONDS = env_float("TASK_RETENTION_MAX_SECONDS", 60.0, minimum=1.0)
# Traffic counters (tasks.traffic_counters): how often running instances are sampled
# (0: only at start/stop/restart/reset/delete), and what a GB of max_traffic_gb is.
TRAFFIC_SAMPLE_MINUTES = env_int("TRAFFIC_SAMPLE_MINUTES", 5, minimum=0, maximum=1440)
# Graceful shutdown: running tasks get this long to finish; what still runs then is
# handed back (pending again) and resumed by another worker.
TASK_SHUTDOWN_GRACE_SECONDS = env_float("TASK_SHUTDOWN_GRACE_SECONDS", 300.0, minimum=0.0)
# A task whose worker is lost is resumed; after this many lost attempts it ends failed/worker_lost.
TASK_MAX_ATTEMPTS = env_int("TASK_MAX_ATTEMPTS", 3, minimum=1, maximum=100)
TASK_PROGRESS_MIN_INTERVAL = env_float("TASK_PROGRESS_MIN_INTERVAL", 0.25, minimum=0.0)
TASK_MAX_TIMEOUT_SECONDS = env_int("TASK_MAX_TIMEOUT_SECONDS", 86400, minimum=60)
if TASK_HEARTBEAT_SECONDS * 2 > TASK_LEASE_SECONDS:
    raise ImproperlyConfigured(
        "TASK_HEARTBEAT_SECONDS must be at most half of TASK_LEASE_SECONDS, "
        f"got {TASK_HEARTBEAT_SECONDS} and {TASK_LEASE_SECONDS}"
    )
# MySQL/MariaDB read and write timeouts (whole seconds): a statement whose answer
# does not come (a half-open connection, a hung server) raises instead of hanging
# its caller. Below the lease minus a heartbeat, so a heartbeat stuck on one fails
# before the lease it could not renew runs out. The worker's local lease deadline
# (providers.base.LeaseClock) stops its operation in time even without it.
_db_io_limit = TASK_LEASE_SECONDS - TASK_HEARTBEAT_SECONDS
DB_READ_TIMEOUT_SECONDS = env_int("DB_READ_TIMEOUT_SECONDS", max(1, math.ceil(_db_io_limit) - 1), minimum=1)
DB_WRITE_TIMEOUT_SECONDS = env_int("DB_WRITE_TIMEOUT_SECONDS", DB_READ_TIMEOUT_SECONDS, minimum=1)
if IS_MYSQL:
    if max(DB_READ_TIMEOUT_SECONDS, DB_WRITE_TIMEOUT_SECONDS) >= _db_io_limit:
        raise ImproperlyConfigured(
            "DB_READ_TIMEOUT_SECONDS and DB_WRITE_TIMEOUT_SECONDS must be below TASK_LEASE_SECONDS"
            f" - TASK_HEARTBEAT_SECONDS ({_db_io_limit:g})"
        )
# Only in the worker tier (run_workers and the pool it starts), whose
# leases depend on it: a migration, a purge or a report elsewhere may rightly run longer.
WORKER_TIER_PROCESS = len(sys.argv) > 1 and sys.argv[1] in ("run_workers", "run_pool", "qcluster")
if IS_MYSQL and WORKER_TIER_PROCESS:
    DATABASES["default"]["OPTIONS"].setdefault("read_timeout", DB_READ_TIMEOUT_SECONDS)
    DATABASES["default"]["OPTIONS"].setdefault("write_timeout", DB_WRITE_TIMEOUT_SECONDS)
    # (A reconnect after a timed-out statement must not hang longer than one either.)
    _connect = DATABASES["default"]["OPTIONS"].get("connect_timeout", DB_READ_TIMEOUT_SECONDS)
    DATABASES["default"]["OPTIONS"]["connect_timeout"] = min(_connect, DB_READ_TIMEOUT_SECONDS)
# How often a process measures its clock's offset from the database server's
# (tasks.engine.clock): leases, recovery, timeouts and re-dispatch use the server's time.
DB_CLOCK_REFRESH_SECONDS = env_float("DB_CLOCK_REFRESH_SECONDS", 10.0, minimum=0.0)
# Re-dispatch of an admitted task nobody claims backs off: TASK_DISPATCH_TIMEOUT_SECONDS,
# then twice as long after each copy, up to this.
TASK_REDISPATCH_MAX_SECONDS = env_float("TASK_REDISPATCH_MAX_SECONDS", 600.0, minimum=1.0)
# Backoff of retryable provider errors: waits of base x 1, 2, 4 (3 retries).
TASK_RETRY_BASE_SECONDS = env_float("TASK_RETRY_BASE_SECONDS", 2.0, minimum=0.0)
# Time budget of the undo of a failed or cancelled create (removing the partial guest).
TASK_CLEANUP_SECONDS = env_float("TASK_CLEANUP_SECONDS", 60.0, minimum=1.0)
# Scale of the simulated provider's delays: 1.0 is realistic (create ~30 s), tests use ~0.01.
SIMULATED_SPEED = env_float("SIMULATED_SPEED", 1.0, minimum=0.0)
# Name of this worker machine (several machines: give each its own).
WORKER_NODE = env_str("WORKER_NODE") or os.uname().nodename
# A worker's registry row (admin "workers") is refreshed by its claims at most this often.
WORKER_REGISTRY_INTERVAL_SECONDS = env_float("WORKER_REGISTRY_INTERVAL_SECONDS", 1.0, minimum=0.0)
# Extra operation modules imported after the built-in ones (they may override a type).
TASK_EXTRA_OPERATIONS = env_list("TASK_EXTRA_OPERATIONS")
# Which providers this machine's worker tier serves: empty = all; else names or ids.
WORKER_PROVIDERS = env_list("WORKER_PROVIDERS")
# The pool: WORKER_POOL_MIN workers while idle, growing while admitted jobs wait for a
# worker up to WORKER_CONCURRENCY (0: the sum of the limits of the providers served),
# an extra cluster stopped after WORKER_POOL_IDLE_SECONDS without work.
WORKER_CONCURRENCY = env_int("WORKER_CONCURRENCY", 0, minimum=0, maximum=512)
WORKER_POOL_MIN = env_int("WORKER_POOL_MIN", 2, minimum=1, maximum=512)
WORKER_POOL_IDLE_SECONDS = env_float("WORKER_POOL_IDLE_SECONDS", 60.0, minimum=1.0)

# --- django-q2 ----------------------------------------------------------------------
# Each provider has its own queue (broker key ``provider-<id>``). The run_workers
# supervisor runs one django-q2 cluster per machine (the pool) serving all of them,
# plus extra clusters while busy: it starts each with Q_CLUSTER_WORKERS=<n> and
# WORKER_QUEUES_FILE=<the list of provider queues>, read by the brokers of
# tasks/engine/broker.py. Q_SCHEDULER=0 keeps an extra cluster out of the schedules.
Q_BROKER = env_choice("Q_BROKER", "orm", ("orm", "redis"))
REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")
_q_workers = env_int("Q_CLUSTER_WORKERS", 1, minimum=1, maximum=512)
# ORM broker: a pool that finds nothing backs off from Q_POLL_SECONDS to this.
Q_POLL_IDLE_SECONDS = env_float("Q_POLL_IDLE_SECONDS", 0.25, minimum=0.01)
Q_CLUSTER = {
    "name": "cloudhost",
    "workers": _q_workers,
    "recycle": 500,
    # Per job (dispatch.job_seconds): the first task's timeout + TASK_HARD_KILL_GRACE_SECONDS
    # + TASK_HANDOFF_SECONDS; this is the ceiling.
    "timeout": TASK_MAX_TIMEOUT_SECONDS + TASK_HARD_KILL_GRACE_SECONDS + TASK_HANDOFF_SECONDS,
    # Re-delivery of an unacknowledged job must come after any hard timeout, or a
    # running job would be handed out twice (a no-op for us, but wasted).
    "retry": TASK_MAX_TIMEOUT_SECONDS + 2 * TASK_HARD_KILL_GRACE_SECONDS + TASK_HANDOFF_SECONDS + 60,
    "max_attempts": 1,
    "ack_failures": True,
    # -1: django-q2 stores no success rows (the Task row is the record); its own
    # default (250) costs a SELECT ... FOR UPDATE over kept rows on every result.
    "save_limit": env_int("Q_SAVE_LIMIT", -1, minimum=-1),
    # Prefetch as little as django-q2 allows: a job held by a busy cluster waits
    # (until re-sent) while another cluster may be idle.
    "queue_limit": 1,
    "bulk": 1,
    "poll": env_float("Q_POLL_SECONDS", 0.05, minimum=0.01),
    "scheduler": env_bool("Q_SCHEDULER", True),
    "catch_up": False,
    "label": gettext_lazy("Background jobs"),  # the django-q2 section of the admin
    "ALT_CLUSTERS": {},  # (django-q2 pops it when Q_CLUSTER_NAME is set, as the benchmark's baselines do)
}
if Q_BROKER == "orm":
    Q_CLUSTER["orm"] = "default"
    # django-q2's ORM broker with precompiled SQL, no ping per poll and one poll over
    # every provider queue (tasks/engine/broker.py); django_q.brokers.orm.ORM is
    # django-q2's own (the benchmark's baseline).
    ORM_BROKERS = ("tasks.engine.broker.OrmBroker", "django_q.brokers.orm.ORM")
    Q_CLUSTER["broker_class"] = env_str("Q_BROKER_CLASS", ORM_BROKERS[0]).strip()
    if Q_CLUSTER["broker_class"] not in ORM_BROKERS:
        raise ImproperlyConfigured(
            f"Q_BROKER_CLASS={Q_CLUSTER['broker_class']!r} must be one of: {', '.join(ORM_BROKERS)}"
        )
else:
    Q_CLUSTER["redis"] = REDIS_URL
    REDIS_BROKERS = ("tasks.engine.broker.RedisBroker", "django_q.brokers.redis_broker.Redis")
    Q_CLUSTER["broker_class"] = env_str("Q_BROKER_CLASS", REDIS_BROKERS[0]).strip()
    if Q_CLUSTER["broker_class"] not in REDIS_BROKERS:
        raise ImproperlyConfigured(
            f"Q_BROKER_CLASS={Q_CLUSTER['broker_class']!r} must be one of: {', '.join(REDIS_BROKERS)}"
        )

# --- caches ---------------------------------------------------------------------------
# "throttle": the login throttle's counters (tasks/api/throttle.py), shared by every web
# process: Redis when the system runs on Redis, else files in VAR_DIR (one machine).
LOGIN_THROTTLE_STORE = env_choice(
    "LOGIN_THROTTLE_STORE", "redis" if Q_BROKER == "redis" else "file", ("redis", "file", "memory")
)
_THROTTLE_CACHES = {
    "redis": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL},
    "file": {
        "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
        "LOCATION": str(VAR_DIR / "throttle"),
        "OPTIONS": {"MAX_ENTRIES": 5000},
    },
    "memory": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "throttle"},
}
CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    "throttle": {**_THROTTLE_CACHES[LOGIN_THROTTLE_STORE], "KEY_PREFIX": "cloudhost", "TIMEOUT": 180},
}
# POST /api/v1/auth/token/: this many failed attempts per username or client address per window.
LOGIN_THROTTLE_ATTEMPTS = env_int("LOGIN_THROTTLE_ATTEMPTS", 10, minimum=1)
LOGIN_THROTTLE_WINDOW_SECONDS = env_int("LOGIN_THROTTLE_WINDOW_SECONDS", 60, minimum=1)

SILENCED_SYSTEM_CHECKS = ["models.W037"]  # MariaDB: django_q's partial index is created plain

# --- logging -----------------------------------------------------------------------------
LOG_LEVEL = env_choice("LOG_LEVEL", "info", ("debug", "info", "warning", "error")).upper()
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django.db.backends": {"level": "INFO"},
        "django-q": {"level": env_choice("Q_LOG_LEVEL", "warning", ("debug", "info", "warning", "error")).upper()},
    },
}

# --- quotas -------------------------------------------------------------------------------
DEFAULT_QUOTA_INSTANCES = env_int("DEFAULT_QUOTA_INSTANCES", 10, minimum=0)
DEFAULT_QUOTA_CPU = env_int("DEFAULT_QUOTA_CPU", 16, minimum=0)
DEFAULT_QUOTA_MEMORY_MB = env_int("DEFAULT_QUOTA_MEMORY_MB", 32768, minimum=0)
DEFAULT_QUOTA_DISK_MB = env_int("DEFAULT_QUOTA_DISK_MB", 512000, minimum=0)
# Host ports of all a user's mappings (ranges port by port, default blocks included).
DEFAULT_QUOTA_PORTS = env_int("DEFAULT_QUOTA_PORTS", 50, minimum=0)
# How long a new password stays readable (once) through the API.
PASSWORD_READ_WINDOW_SECONDS = env_int("PASSWORD_READ_WINDOW_SECONDS", 3600, minimum=60)

# --- live updates (tasks.live: GET /api/v1/tasks/stream/ and .../wait/) -------------------
# ORM broker: how often each web process polls new TaskEvent rows while anyone watches.
LIVE_POLL_SECONDS = env_float("LIVE_POLL_SECONDS", 0.25, minimum=0.02, maximum=5.0)
# An event id is trusted to have no lower, still uncommitted neighbour after this long.
LIVE_GAP_SECONDS = env_float("LIVE_GAP_SECONDS", 5.0, minimum=0.5)
LIVE_BATCH = env_int("LIVE_BATCH", 2000, minimum=10)
# Comment line sent to an idle stream this often (keeps proxies from closing it).
LIVE_KEEPALIVE_SECONDS = env_float("LIVE_KEEPALIVE_SECONDS", 15.0, minimum=0.1)
# The feed stops this long after its last watcher left (an idle process costs nothing).
LIVE_IDLE_SECONDS = env_float("LIVE_IDLE_SECONDS", 30.0, minimum=0.0)
# Messages queued for one slow stream before it is closed (the client resumes with Last-Event-ID).
LIVE_QUEUE_SIZE = env_int("LIVE_QUEUE_SIZE", 1000, minimum=10)
LIVE_CHANNEL = env_str("LIVE_CHANNEL")
# Threads per web process for the ordinary (WSGI) views under the ASGI server (config/asgi.py).
WEB_THREADS = env_int("WEB_THREADS", 8, minimum=1, maximum=256)

# --- webhooks (tasks.webhooks, delivered by the worker tier) -------------------------------
WEBHOOK_ALLOW_PRIVATE_TARGETS = env_bool("WEBHOOK_ALLOW_PRIVATE_TARGETS", False)
WEBHOOK_TIMEOUT_SECONDS = env_float("WEBHOOK_TIMEOUT_SECONDS", 5.0, minimum=0.5, maximum=30.0)
# Deliveries are retried for this long after the event...
WEBHOOK_RETRY_SECONDS = env_int("WEBHOOK_RETRY_SECONDS", 86400, minimum=60)
# ...with waits of 10 s, 30 s, 1, 2, 5, 10, 20, 30 min, then hourly, each times this scale
# (benchmarks and tests compress time with a small scale).
WEBHOOK_BACKOFF_SCALE = env_float("WEBHOOK_BACKOFF_SCALE", 1.0, minimum=0.0001)
WEBHOOK_POLL_SECONDS = env_float("WEBHOOK_POLL_SECONDS", 1.0, minimum=0.05)
WEBHOOK_CONCURRENCY = env_int("WEBHOOK_CONCURRENCY", 8, minimum=1, maximum=64)
WEBHOOK_BATCH = env_int("WEBHOOK_BATCH", 200, minimum=1)
WEBHOOKS_PER_USER = env_int("WEBHOOKS_PER_USER", 10, minimum=1)
# This machine's worker tier delivers webhooks (a thread of run_workers); any number may.
WEBHOOK_DELIVERY = env_bool("WEBHOOK_DELIVERY", True)
