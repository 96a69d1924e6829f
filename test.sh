#!/usr/bin/env bash
# Install everything and run the test suite (SQLite unless DATABASE_URL says otherwise).
# Extra arguments go to pytest, e.g. ./test.sh tests/core -x
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup browser monitoring
export SIMULATED_SPEED=${SIMULATED_SPEED:-0.01}
# chromium is installed above: a missing browser must fail the browser test, not skip it.
export REQUIRE_BROWSER=${REQUIRE_BROWSER:-1}
# Most tests run in parallel; the ones that start worker machines (marker
# "processes", MariaDB only) run afterwards, alone: on 2 cores, load from other
# tests would starve their heartbeats and blur their timing measurements.
.venv/bin/pytest -n "${TEST_PROCESSES:-2}" -m "not processes" "$@"
status=0
.venv/bin/pytest -m processes "$@" || status=$?
# 5 = nothing collected (SQLite: every process test is MariaDB-only and skipped, or a path without them)
[ "$status" -eq 0 ] || [ "$status" -eq 5 ] || exit "$status"
