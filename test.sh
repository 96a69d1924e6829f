#!/usr/bin/env bash
# Install everything and run the test suite (SQLite unless DATABASE_URL says otherwise).
# Extra arguments go to pytest, e.g. ./test.sh tests/core -x
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup browser
export SIMULATED_SPEED=${SIMULATED_SPEED:-0.01}
# chromium is installed above: a missing browser must fail the browser test, not skip it.
export REQUIRE_BROWSER=${REQUIRE_BROWSER:-1}
exec .venv/bin/pytest -n "${TEST_PROCESSES:-2}" --dist loadgroup "$@"
