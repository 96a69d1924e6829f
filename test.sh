#!/usr/bin/env bash
# Install everything and run the test suite (SQLite unless DATABASE_URL says otherwise).
# Extra arguments go to pytest, e.g. ./test.sh tests/core -x
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup browser
export SIMULATED_SPEED=${SIMULATED_SPEED:-0.01}
exec .venv/bin/pytest -n "${TEST_PROCESSES:-2}" "$@"
