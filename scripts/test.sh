#!/usr/bin/env bash
# README command 2: set up and run the whole test suite (unit, integration with real MLflow
# and MLServer processes on free ports, the real-data quality check when the data is there,
# and the Docker stack when an engine is available), then list the 15 slowest tests. Extra
# arguments go to pytest. VENV and PYTHON / PYTHON_VERSION choose the environment and the
# Python, as for scripts/setup.sh.
#
# Test files run in TEST_WORKERS parallel pytest workers (default 3; 0 runs them in this
# process): most of an integration test's time is spent waiting for the servers it starts, so
# three workers finish the suite far sooner even on two cores. A file's tests stay in one
# worker (--dist loadfile), with the servers its module fixtures start.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv}"
scripts/setup.sh dev
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
"$venv/bin/python" --version
status=0
workers="${TEST_WORKERS:-3}"
parallel=()
[ "$workers" != 0 ] && parallel=(-n "$workers" --dist loadfile)
"$venv/bin/python" -m pytest "${parallel[@]}" --durations=15 "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "test: pytest collected no tests; that is a failure, not a pass" >&2
fi
exit "$status"
