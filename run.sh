#!/usr/bin/env bash
# Install everything and run the system on this machine: SQLite, the simulated
# provider, the web server on :8000 and the worker tier. Ctrl-C stops both.
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
trap 'kill -TERM $workers 2>/dev/null; wait $workers 2>/dev/null' EXIT INT TERM
echo "web: http://127.0.0.1:$PORT/admin/  api: http://127.0.0.1:$PORT/api/v1/"
.venv/bin/gunicorn config.wsgi:application --bind "${BIND:-127.0.0.1}:$PORT" --workers "${WEB_WORKERS:-2}" \
  --threads 4 --access-logfile - --graceful-timeout 10
