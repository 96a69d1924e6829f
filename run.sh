#!/usr/bin/env bash
# Install everything and run the system on this machine: SQLite, the simulated
# provider, the web server on :8000 and the worker tier (which also delivers
# webhooks). Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup
PY=.venv/bin/python
$PY manage.py migrate --noinput -v0
$PY manage.py collectstatic --noinput -v0
$PY manage.py demo
PORT=${PORT:-8000}
$PY manage.py run_workers &
workers=$!
echo "web: http://127.0.0.1:$PORT/admin/  api: http://127.0.0.1:$PORT/api/v1/"
# ASGI (uvicorn workers): the live endpoints (task stream, wait) hold no thread while
# they wait; the rest of the site runs on WEB_THREADS threads per process (config/asgi.py).
.venv/bin/gunicorn config.asgi:application -k uvicorn_worker.UvicornWorker --bind "${BIND:-127.0.0.1}:$PORT" \
  --workers "${WEB_WORKERS:-2}" --access-logfile - --graceful-timeout 10 &
web=$!
# Both run in the background so that a TERM to this script (systemd, timeout,
# kill) stops them at once: bash runs traps during `wait`, not while a
# foreground child runs. Ctrl-C reaches all of them anyway.
stop() { trap - EXIT INT TERM; kill -TERM "$web" "$workers" 2>/dev/null; wait "$web" "$workers" 2>/dev/null; }
trap stop EXIT INT TERM
wait -n "$web" "$workers"
